"""Test session setup: an isolated state folder and the embedded stack's environment, set
before anything imports Airflow. Converted base models are shared with the demo
(``.llmops/models``) so they are converted once per machine."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.reliability_report", "pytester"]

ROOT = Path(__file__).resolve().parents[1]
_loaded = [
    name
    for name in ("conftest", "tests.conftest")
    if name != __name__ and getattr(sys.modules.get(name), "__file__", None) == __file__
]
if _loaded:
    # pytest loads this file as "conftest"; importing it again as "tests.conftest" would make a
    # second state folder and point the environment at it in the middle of the session.
    raise ImportError(f"tests/conftest.py is loaded already (as {_loaded[0]}): import helpers from tests.* modules")
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

(ROOT / ".llmops").mkdir(exist_ok=True)
TEST_HOME = Path(tempfile.mkdtemp(prefix="tests-", dir=ROOT / ".llmops"))
os.environ.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["LLMOPS_ENV"] = "local"

from devtools.localstack import apply_environment  # noqa: E402

STACK_ENV = apply_environment(TEST_HOME)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if hasattr(config, "workerinput"):
        # A pytest-xdist worker: its tmp_path folders go under its own state folder, as in a
        # single process (the stack loads models only from there), not under the controller's.
        config.option.basetemp = str(TEST_HOME / "tmp" / "pytest")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LLMOPS_KEEP_TEST_HOME") != "1":
        shutil.rmtree(TEST_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    return STACK_ENV


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings whose store is a fresh folder for this test."""
    from llmops.config import load_settings

    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path))
    return load_settings("local")


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from llmops.config import load_settings
    from llmops.models import resolve_model

    return resolve_model(load_settings("local").models.base, load_settings("local").models.cache_dir)


@pytest.fixture(scope="session")
def airflow_db(stack_env) -> dict[str, str]:
    from devtools.localstack import migrate_db

    migrate_db(stack_env)
    return stack_env

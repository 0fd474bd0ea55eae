"""Helpers for tests that run DAGs in process with ``dag.test()``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

FAST_EVALUATION = {"max_test_items": 4, "max_new_tokens": 8, "batch_size": 8, "bootstrap_resamples": 200}
# A rollout through shadow and two A/B steps, a few requests each, with guardrails a tiny model meets.
FAST_ROLLOUT = {
    "traffic_steps": [0.5, 1.0],
    "replay_requests": 6,
    "step_requests": 4,
    "shadow": {"min_pairs": 4, "min_win_rate": 0.4, "max_error_rate": 0.0, "max_latency_ratio": 20.0},
    "guardrails": {"min_invocations": 2, "max_error_rate": 0.0, "max_p99_latency_ms": 60000, "max_judge_drop": 1.0},
}
MODEL_NAME = "python-docs-assistant"


def fast_config(folder: Path, gate: dict | None = None) -> Path:
    """The local config with a short evaluation (and ``gate``, when given), written to ``folder``:
    DAG tests check the pipeline's behaviour, not the model's quality."""
    from llmops.config import INCLUDE_DIR

    config = yaml.safe_load((INCLUDE_DIR / "config" / "local.yaml").read_text())
    config["evaluation"] = {**config["evaluation"], **FAST_EVALUATION}
    if gate is not None:
        config["evaluation"]["gate"] = gate
    path = folder / f"config-{len(list(folder.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# A failed task's retry runs after this instead of the DAG's minute: dag.test() sleeps through the
# delay, and no test is about its length.
TEST_RETRY_DELAY = timedelta(seconds=1)


@contextmanager
def parsed_dag(dag_id: str, **env: str) -> Iterator:
    """A DAG of ``dags/`` parsed with ``env`` set (its settings are read at parse time), its
    tasks' retry delay ``TEST_RETRY_DELAY``, its asset names freed (``free_asset_names``). Needs
    the ``airflow_db`` fixture."""
    from airflow.dag_processing.dagbag import DagBag

    from llmops.config import PROJECT_ROOT, get_settings

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py"))
        assert not bag.import_errors, bag.import_errors
        dag = bag.dags[dag_id]
        for task in dag.tasks:
            task.retry_delay = TEST_RETRY_DELAY
        free_asset_names(dag)
        try:
            yield dag
        finally:
            get_settings.cache_clear()


def free_asset_names(dag) -> None:
    """Free the names of ``dag``'s assets in the session's Airflow database, so that its next run
    activates them with this store's URIs. Tests with stores of their own share one database, and
    Airflow keeps a name active under one URI only: a task whose inlet or outlet is inactive fails
    (which tests ran before in the same process depends on the order and on pytest-xdist)."""
    from airflow.models.asset import AssetActive
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    names = {a.name for task in dag.tasks for a in (*task.inlets, *task.outlets) if hasattr(a, "uri")}
    with create_session() as session:
        session.execute(delete(AssetActive).where(AssetActive.name.in_(names)))


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


@contextmanager
def rollout_stack(root: Path, training_job: Path, dataset: dict) -> Iterator[dict]:
    """A state folder under ``root`` with two registered versions of the same adapter
    (``training_job``, trained on ``dataset``), the prompt catalog synced, a running local gateway
    and a config with the short rollout policy ``FAST_ROLLOUT``. Yields ``home``, ``url``,
    ``tracking``, ``gateway_state`` and ``env`` (the variables the DAG's tasks read)."""
    from llmops.config import INCLUDE_DIR
    from llmops.prompts import sync_prompts
    from llmops.tracking import record_training
    from tests.gateways import running_gateway

    home = root / "home"
    home.mkdir()
    config = yaml.safe_load((INCLUDE_DIR / "config" / "local.yaml").read_text())
    config["serving"] = {**config["serving"], "replay_max_new_tokens": 8, "rollout": FAST_ROLLOUT}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    tracking = f"sqlite:///{home}/mlflow.db"
    sync_prompts(tracking)
    for run in ("train-1", "train-2"):
        record_training(
            tracking,
            (home / "artifacts").as_uri(),
            MODEL_NAME,
            training_job,
            dataset,
            {"peft_method": "lora"},
            {"dag_id": "llm_finetune", "run_id": run, "git_sha": "test"},
        )
    with running_gateway(root / "gateway") as (url, _):
        yield {
            "home": str(home),
            "url": url,
            "tracking": tracking,
            "gateway_state": root / "gateway",
            "env": {
                "LLMOPS_HOME": str(home),
                "MLFLOW_TRACKING_URI": tracking,
                "LLMOPS_CONFIG_FILE": str(root / "config.yaml"),
                "LLMOPS_GATEWAY_URL": url,
            },
        }

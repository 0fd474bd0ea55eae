"""Helpers for tests that run DAGs in process with ``dag.test()``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

FAST_EVALUATION = {"max_test_items": 4, "max_new_tokens": 8, "batch_size": 8, "bootstrap_resamples": 200}


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


@contextmanager
def parsed_dag(dag_id: str, **env: str) -> Iterator:
    """A DAG of ``dags/`` parsed with ``env`` set (its settings are read at parse time)."""
    from airflow.dag_processing.dagbag import DagBag

    from llmops.config import PROJECT_ROOT, get_settings

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags" / f"{dag_id}.py"))
        assert not bag.import_errors, bag.import_errors
        try:
            yield bag.dags[dag_id]
        finally:
            get_settings.cache_clear()


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}

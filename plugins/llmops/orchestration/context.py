"""The run a task belongs to, as one object: what every ``llm_finetune`` task asks of Airflow.

``RunContext.current(settings)`` inside a task gives the DAG and run ids, the store's storage
options, the lineage every artifact carries (DAG, run, git SHA), the run's job names (the same for
every retry) and the task logger, so each task body is one call into the library.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from llmops.config import Settings
from llmops.data.stages import git_sha
from llmops.finetune import job_name
from llmops.orchestration import storage_options_for


@dataclass(frozen=True)
class RunContext:
    settings: Settings
    airflow: Mapping[str, Any]  # the task's Airflow context

    @classmethod
    def current(cls, settings: Settings) -> RunContext:
        """The context of the task running now."""
        from airflow.sdk import get_current_context

        return cls(settings, get_current_context())

    @property
    def dag_id(self) -> str:
        return self.airflow["dag"].dag_id

    @property
    def run_id(self) -> str:
        return self.airflow["run_id"]

    @property
    def ti(self):
        return self.airflow["ti"]

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.airflow["params"])

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger("airflow.task")

    @cached_property
    def storage_options(self) -> dict | None:
        """For the store (``settings.store_uri``); built on first use, as it may make a client."""
        return storage_options_for(self.settings.store_uri, self.settings)

    @cached_property
    def lineage(self) -> dict[str, str]:
        return {"dag_id": self.dag_id, "run_id": self.run_id, "git_sha": git_sha()}

    def job_name(self, prefix: str = "llmops-ft") -> str:
        return job_name(self.dag_id, self.run_id, prefix=prefix)

"""Each DAG run's own partition of the store: ``<store>/runs/<dag_id>/<run_id>/``. A task writes
what it makes there, so a re-run of the task overwrites only its own run's files."""

from __future__ import annotations

import re

from llmops import storage
from llmops.config import Settings


def run_folder(settings: Settings, run_id: str, dag_id: str = "llm_data_prep") -> str:
    """The run's own partition in the store; run ids hold ':' and '+', which S3 keys and shells
    dislike, so they are made path-safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")
    return storage.join(settings.runs_uri(), dag_id, safe)

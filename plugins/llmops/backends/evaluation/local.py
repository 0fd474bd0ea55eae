"""The local evaluation backend: the SageMaker Processing job's twin on this machine.

It runs ``python -m training.evaluate`` in a job folder laid out as the Processing job's
(``input/``, ``output/``) and writes predictions, summary and log to the store at
``evaluation-jobs/<job>/output/``. A job whose inputs (hashed) already produced outputs is not run
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from llmops import storage
from llmops.backends.evaluation.job import EvaluationJobResult, EvaluationJobSpec
from llmops.backends.process import run_process
from llmops.config import PROJECT_ROOT


class LocalEvaluationBackend:
    """Runs ``python -m training.evaluate`` in the SageMaker Processing layout, in a subprocess, and
    copies its outputs to ``evaluation-jobs/<job>/output/`` in the store. A job whose outputs exist
    is not run again."""

    name = "local"

    def __init__(self, store_uri: str, work_dir: str | os.PathLike[str], storage_options: dict | None = None):
        self.jobs_uri = storage.join(store_uri, "evaluation-jobs")
        self.work_dir = Path(work_dir)
        self.storage_options = storage_options

    def output_uri(self, job_name: str, name: str) -> str:
        return storage.join(self.jobs_uri, job_name, "output", name)

    def inputs_sha256(self, spec: EvaluationJobSpec) -> str:
        """What the job's outputs depend on: the items, the models and the settings."""
        digest = hashlib.sha256(storage.read_bytes(spec.items_uri, self.storage_options))
        digest.update(
            json.dumps(
                {"models": spec.models, "embedding_model": spec.embedding_model, "settings": spec.settings},
                sort_keys=True,
            ).encode()
        )
        return digest.hexdigest()

    def run(self, spec: EvaluationJobSpec, on_line: Callable[[str], None] = print) -> EvaluationJobResult:
        predictions_uri = self.output_uri(spec.job_name, "predictions.jsonl")
        summary_uri = self.output_uri(spec.job_name, "summary.json")
        log_uri = self.output_uri(spec.job_name, "evaluation.log")
        inputs = self.inputs_sha256(spec)
        if storage.exists(summary_uri, self.storage_options) and storage.exists(predictions_uri, self.storage_options):
            summary = storage.read_json(summary_uri, self.storage_options)
            if summary.get("inputs_sha256") == inputs:
                on_line(f"evaluation job {spec.job_name} already completed on these inputs; reusing its outputs")
                return EvaluationJobResult(spec.job_name, self.name, predictions_uri, summary, log_uri, reused=True)
            # Same job name, different inputs (a champion moved, the catalog changed): the old
            # outputs describe other models, so they go before anything is run again.
            on_line(f"evaluation job {spec.job_name} ran on other inputs before; evaluating again")
            storage.delete(summary_uri, storage_options=self.storage_options)

        job_dir = self.work_dir / spec.job_name
        if job_dir.exists():
            shutil.rmtree(job_dir)  # a half-finished earlier attempt: start clean
        try:
            return self._run(spec, job_dir, inputs, predictions_uri, summary_uri, log_uri, on_line)
        finally:
            log_path = job_dir / "evaluation.log"
            if log_path.is_file():
                storage.write_bytes(log_uri, log_path.read_bytes(), self.storage_options)
            # The inputs hold a copy of every model: never leave them behind on the worker.
            shutil.rmtree(job_dir, ignore_errors=True)

    def _run(self, spec, job_dir: Path, inputs: str, predictions_uri, summary_uri, log_uri, on_line):
        models = []
        for label, model in spec.models.items():
            entry = {"label": label, "base": str(model["base"]), "adapter": None}
            if model.get("artifact_uri"):
                tarball = job_dir / "input" / "models" / label / "model.tar.gz"
                tarball.parent.mkdir(parents=True, exist_ok=True)
                tarball.write_bytes(storage.read_bytes(model["artifact_uri"], self.storage_options))
                entry["adapter"] = str(tarball.relative_to(job_dir))
            models.append(entry)
        config_path = job_dir / "input" / "config" / "evaluation.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(
            json.dumps({**spec.settings, "models": models, "embedding_model": spec.embedding_model}, indent=2)
        )
        items_path = job_dir / "input" / "items" / "items.jsonl"
        items_path.parent.mkdir(parents=True, exist_ok=True)
        items_path.write_bytes(storage.read_bytes(spec.items_uri, self.storage_options))

        env = {
            **os.environ,
            "LLMOPS_PROCESSING_DIR": str(job_dir),
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
            "TOKENIZERS_PARALLELISM": "false",
        }
        log_path = job_dir / "evaluation.log"
        run_process(
            [sys.executable, "-m", "training.evaluate"],
            env,
            log_path,
            spec.timeout_s,
            on_line,
            f"evaluation job {spec.job_name}",
        )
        output = job_dir / "output"
        storage.write_bytes(predictions_uri, (output / "predictions.jsonl").read_bytes(), self.storage_options)
        summary = {**json.loads((output / "summary.json").read_text()), "inputs_sha256": inputs}
        # Written last: the job counts as done only once everything it produced is in the store.
        storage.write_json(summary_uri, summary, self.storage_options)
        return EvaluationJobResult(spec.job_name, self.name, predictions_uri, summary, log_uri)

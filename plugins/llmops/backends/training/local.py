"""The local training backend: the SageMaker training job's twin on this machine.

It lays out a job folder the way SageMaker does (``input/config/hyperparameters.json``,
``input/data/<channel>/``, ``model/``, ``checkpoints/``), runs ``python -m training.train`` (or
``torchrun`` for more than one process) with the ``SM_*`` environment pointing at it, streams the
output to the caller's log, enforces a timeout, and packs ``model/`` into ``model.tar.gz`` in the
store at ``training-jobs/<job>/output/model.tar.gz``, as SageMaker does in S3.

A job name is idempotent: a job whose artifact exists is not run again, and a job restarted after
a crash resumes from its newest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmops import storage
from llmops.backends.process import run_process
from llmops.backends.training.job import TrainingJobResult, TrainingJobSpec
from llmops.config import PROJECT_ROOT


class LocalTrainingBackend:
    name = "local"

    def __init__(self, store_uri: str, work_dir: str | os.PathLike[str], storage_options: dict | None = None):
        self.jobs_uri = storage.join(store_uri, "training-jobs")
        self.work_dir = Path(work_dir)
        self.storage_options = storage_options

    def artifact_uri(self, job_name: str) -> str:
        return storage.join(self.jobs_uri, job_name, "output", "model.tar.gz")

    def run(self, spec: TrainingJobSpec, on_line: Callable[[str], None] = print) -> TrainingJobResult:
        artifact = self.artifact_uri(spec.job_name)
        metrics_uri = storage.join(self.jobs_uri, spec.job_name, "output", "metrics.json")
        log_uri = storage.join(self.jobs_uri, spec.job_name, "output", "training.log")
        if storage.exists(artifact, self.storage_options) and storage.exists(metrics_uri, self.storage_options):
            on_line(f"job {spec.job_name} already completed; reusing {artifact}")
            metrics = storage.read_json(metrics_uri, self.storage_options)
            return TrainingJobResult(spec.job_name, self.name, artifact, metrics, log_uri, reused=True)

        job_dir = self.work_dir / spec.job_name
        config_dir, model_dir = job_dir / "input" / "config", job_dir / "model"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "hyperparameters.json").write_text(json.dumps(spec.hyperparameters, indent=2, sort_keys=True))
        env = {
            **os.environ,
            "SM_INPUT_CONFIG_DIR": str(config_dir),
            "SM_MODEL_DIR": str(model_dir),
            "SM_OUTPUT_DATA_DIR": str(job_dir / "output" / "data"),
            "LLMOPS_CHECKPOINT_DIR": str(job_dir / "checkpoints"),
            "SM_TRAINING_JOB_NAME": spec.job_name,
            "LLMOPS_LINEAGE": json.dumps(spec.lineage, sort_keys=True),
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
            # Several processes on a few cores: one thread each, or they fight over the cores.
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // spec.processes)),
            "TOKENIZERS_PARALLELISM": "false",
        }
        for channel, uri in spec.channels.items():
            channel_dir = job_dir / "input" / "data" / channel
            channel_dir.mkdir(parents=True, exist_ok=True)
            (channel_dir / f"{channel}.jsonl").write_bytes(storage.read_bytes(uri, self.storage_options))
            env[f"SM_CHANNEL_{channel.upper()}"] = str(channel_dir)

        command = [sys.executable, "-m", "training.train"]
        if spec.processes > 1:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={spec.processes}",
                "-m",
                "training.train",
            ]
        log_path = job_dir / "training.log"
        # Set once the process exits 0, for these hyperparameters: a rerun after a failed upload
        # packs that model again instead of training on (resuming past the last step trains more).
        trained = job_dir / "trained.sha256"
        config_sha256 = hashlib.sha256((config_dir / "hyperparameters.json").read_bytes()).hexdigest()
        if trained.is_file() and trained.read_text() == config_sha256:
            on_line(f"job {spec.job_name} trained already; uploading its model again")
        else:
            run_process(command, env, log_path, spec.timeout_s, on_line, f"training job {spec.job_name}")
            trained.write_text(config_sha256)
        storage.write_bytes(log_uri, log_path.read_bytes(), self.storage_options)

        metrics = json.loads((model_dir / "metrics.json").read_text())["final"]
        storage.write_bytes(artifact, _tarball(model_dir), self.storage_options)
        storage.write_json(metrics_uri, metrics, self.storage_options)
        return TrainingJobResult(spec.job_name, self.name, artifact, metrics, log_uri)


def _tarball(model_dir: Path) -> bytes:
    """``model.tar.gz`` with the model folder's files at its root, as SageMaker packs it. A link is
    packed as the file it points to: extraction refuses links."""
    with tempfile.TemporaryFile() as buffer:
        with tarfile.open(fileobj=buffer, mode="w:gz", dereference=True) as tar:
            for path in sorted(model_dir.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(model_dir)))
        buffer.seek(0)
        return buffer.read()

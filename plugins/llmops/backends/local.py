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

import collections
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmops import storage
from llmops.config import PROJECT_ROOT

TAIL_LINES = 60


class TrainingJobError(RuntimeError):
    """A training job failed, stopped or timed out; the message ends with its log tail."""


@dataclass(frozen=True)
class TrainingJobSpec:
    job_name: str
    hyperparameters: dict
    channels: dict[str, str]  # channel name -> URI of its JSONL file
    processes: int = 1
    timeout_s: float = 7200
    lineage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingJobResult:
    job_name: str
    backend: str
    model_artifact_uri: str
    metrics: dict
    log_uri: str
    reused: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
        log_path = self._execute(command, env, job_dir, spec.timeout_s, on_line)
        storage.write_bytes(log_uri, log_path.read_bytes(), self.storage_options)

        metrics = json.loads((model_dir / "metrics.json").read_text())["final"]
        storage.write_bytes(artifact, _tarball(model_dir), self.storage_options)
        storage.write_json(metrics_uri, metrics, self.storage_options)
        return TrainingJobResult(spec.job_name, self.name, artifact, metrics, log_uri)

    def _execute(self, command, env, job_dir: Path, timeout_s: float, on_line) -> Path:
        log_path = job_dir / "training.log"
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=PROJECT_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            timer = threading.Timer(timeout_s, _kill_group, args=(process,))
            timer.start()
            started = time.monotonic()
            try:
                for raw in iter(process.stdout.readline, b""):
                    log.write(raw)
                    # tqdm redraws with carriage returns; keep the last state of each line.
                    line = raw.decode("utf-8", errors="replace").rstrip("\n").rsplit("\r", 1)[-1]
                    if line.strip():
                        tail.append(line)
                        on_line(line)
                code = process.wait()
            finally:
                timer.cancel()
                if process.poll() is None:
                    _kill_group(process)
        elapsed = time.monotonic() - started
        if elapsed >= timeout_s and code != 0:
            raise TrainingJobError(
                f"training job {job_dir.name} timed out after {timeout_s:.0f}s and was stopped; last output:\n"
                + "\n".join(tail)
            )
        if code != 0:
            raise TrainingJobError(
                f"training job {job_dir.name} failed with exit code {code}; last output:\n" + "\n".join(tail)
            )
        return log_path


def _die_with_parent() -> None:
    """In the child, before exec: if the launching process dies (a worker killed by the
    scheduler), the job gets SIGTERM instead of training on as an orphan. Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tarball(model_dir: Path) -> bytes:
    """``model.tar.gz`` with the model folder's files at its root, as SageMaker packs it."""
    with tempfile.TemporaryFile() as buffer:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(model_dir.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(model_dir)))
        buffer.seek(0)
        return buffer.read()


def extract_model(artifact_bytes: bytes, target: Path) -> Path:
    """Unpack a ``model.tar.gz`` safely: members must stay inside ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as buffer:
        buffer.write(artifact_bytes)
        buffer.seek(0)
        with tarfile.open(fileobj=buffer, mode="r:gz") as tar:
            tar.extractall(target, filter="data")
    return target

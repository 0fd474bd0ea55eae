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
import hashlib
import json
import os
import shutil
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


def run_process(command: list[str], env: dict, log_path: Path, timeout_s: float, on_line, what: str) -> None:
    """Run a job's command in its own process group, stream its output to ``on_line`` and to
    ``log_path``, and raise ``TrainingJobError`` with the log's tail when it fails or times out."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    log_path.parent.mkdir(parents=True, exist_ok=True)
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
            f"{what} timed out after {timeout_s:.0f}s and was stopped; last output:\n" + "\n".join(tail)
        )
    if code != 0:
        raise TrainingJobError(f"{what} failed with exit code {code}; last output:\n" + "\n".join(tail))


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
    """``model.tar.gz`` with the model folder's files at its root, as SageMaker packs it. A link is
    packed as the file it points to: extraction refuses links."""
    with tempfile.TemporaryFile() as buffer:
        with tarfile.open(fileobj=buffer, mode="w:gz", dereference=True) as tar:
            for path in sorted(model_dir.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(model_dir)))
        buffer.seek(0)
        return buffer.read()


def extract_model(artifact_bytes: bytes, target: Path, name: str = "model.tar.gz") -> Path:
    """Unpack a ``model.tar.gz`` into ``target`` (new or empty) with ``training.archive.safe_extract``:
    an unsafe, corrupt or oversized archive raises ``ArchiveError`` naming ``name`` and leaves nothing."""
    from training.archive import model_archive_limits, safe_extract

    return safe_extract(artifact_bytes, target, name=name, **model_archive_limits())


@dataclass(frozen=True)
class EvaluationJobSpec:
    """An evaluation job: ``models`` maps a label to its base model folder and, for a fine-tuned
    model, the URI of its ``model.tar.gz``; ``items_uri`` is the JSONL of items to answer."""

    job_name: str
    items_uri: str
    models: dict[str, dict]  # label -> {"base": folder, "artifact_uri": URI or None}
    embedding_model: str
    settings: dict = field(default_factory=dict)  # max_new_tokens, batch_size, max_input_tokens, seed
    timeout_s: float = 3600


@dataclass(frozen=True)
class EvaluationJobResult:
    job_name: str
    backend: str
    predictions_uri: str
    summary: dict
    log_uri: str
    reused: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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

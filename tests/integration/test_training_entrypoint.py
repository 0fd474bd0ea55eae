"""python -m training.train and the local backend, on a tiny model, as every backend runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from llmops import storage
from llmops.backends.training.job import TrainingJobError, TrainingJobSpec
from llmops.backends.training.local import LocalTrainingBackend

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.model

# What a SageMaker MetricDefinition would use to scrape the job's log.
METRIC_REGEX = {"loss": r"(?:^| )loss=([0-9.eE+-]+);", "eval_loss": r"(?:^| )eval_loss=([0-9.eE+-]+);"}


def _job_env(tmp: Path, dataset: dict) -> dict[str, str]:
    train = Path(storage.local_path(dataset["files"]["train"]["uri"])).parent
    return {
        **os.environ,
        "SM_CHANNEL_TRAIN": str(train),
        "SM_CHANNEL_VALIDATION": str(train),
        "SM_MODEL_DIR": str(tmp / "model"),
        "SM_INPUT_CONFIG_DIR": str(tmp / "config"),
        "SM_OUTPUT_DATA_DIR": str(tmp / "output"),
        "LLMOPS_CHECKPOINT_DIR": str(tmp / "checkpoints"),
        "PYTHONPATH": str(ROOT),
    }


def _train_cmd(tiny_model: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "training.train",
        "--base_model",
        str(tiny_model),
        "--batch_size",
        "4",
        "--max_eval_samples",
        "8",
        "--logging_steps",
        "2",
        *flags,
    ]


def _run_job(tmp: Path, dataset: dict, command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=_job_env(tmp, dataset), cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_entrypoint_trains_and_writes_the_model_folder(tmp_path, tiny_model, curated_dataset):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "hyperparameters.json").write_text(json.dumps({"max_steps": "4", "lora_r": "4"}))
    out = _run_job(tmp_path, curated_dataset, _train_cmd(tiny_model, "--checkpoint_steps", "2"))
    assert out.returncode == 0, out.stderr[-3000:]
    model = tmp_path / "model"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "training_config.json",
        "metrics.json",
        "README.md",
    } <= {p.name for p in model.iterdir()}
    config = json.loads((model / "training_config.json").read_text())
    assert config["max_steps"] == 4 and config["lora_r"] == 4, "hyperparameters.json must reach the job"
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["final"]["global_step"] == 4
    assert {"eval_loss_before", "eval_loss", "train_loss"} <= metrics["final"].keys()
    losses = [float(m) for m in re.findall(METRIC_REGEX["loss"], out.stdout, re.M)]
    assert len(losses) >= 2, "metric lines must be parseable by SageMaker MetricDefinitions"
    assert re.search(METRIC_REGEX["eval_loss"], out.stdout, re.M)


def test_qlora_without_cuda_fails_with_a_clear_message(tmp_path, tiny_model, curated_dataset):
    out = _run_job(tmp_path, curated_dataset, _train_cmd(tiny_model, "--peft_method", "qlora", "--max_steps", "1"))
    assert out.returncode == 2
    assert "qlora needs a CUDA GPU and the bitsandbytes package" in out.stderr


def test_a_killed_job_resumes_from_its_latest_checkpoint(tmp_path, tiny_model, curated_dataset):
    env = _job_env(tmp_path, curated_dataset)
    cmd = _train_cmd(tiny_model, "--max_steps", "16", "--checkpoint_steps", "4", "--seed", "7")
    process = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    checkpoints = tmp_path / "checkpoints"
    while time.monotonic() < deadline and not (checkpoints / "checkpoint-8" / "trainer_state.json").exists():
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (checkpoints / "checkpoint-8").exists(), "no checkpoint was written before the kill"
    assert not (tmp_path / "model" / "metrics.json").exists(), "the job was meant to die before finishing"

    resumed = _run_job(tmp_path, curated_dataset, cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resuming from checkpoint .*checkpoint-(8|12)", resumed.stdout)
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())["final"]
    assert metrics["global_step"] == 16
    steps = [int(s) for s in re.findall(r" step=(\d+);", resumed.stdout)]
    assert min(steps) > 8 - 1, "the resumed run must not redo the steps before its checkpoint"


def _backend(tmp_path: Path) -> LocalTrainingBackend:
    return LocalTrainingBackend(storage.to_uri(str(tmp_path / "store")), tmp_path / "jobs")


def _spec(name: str, tiny_model: Path, dataset: dict, **overrides) -> TrainingJobSpec:
    hyperparameters = {
        "base_model": str(tiny_model),
        "max_steps": 4,
        "batch_size": 4,
        "max_eval_samples": 8,
        "logging_steps": 2,
        "checkpoint_steps": 2,
        "lora_r": 4,
    }
    fields = {
        "job_name": name,
        "hyperparameters": hyperparameters | overrides.pop("hyperparameters", {}),
        "channels": {"train": dataset["files"]["train"]["uri"], "validation": dataset["files"]["validation"]["uri"]},
        "timeout_s": 300,
    }
    return TrainingJobSpec(**(fields | overrides))


def test_local_backend_packs_model_tarball_and_reuses_a_finished_job(tmp_path, tiny_model, curated_dataset):
    backend = _backend(tmp_path)
    lines: list[str] = []
    result = backend.run(_spec("job-a", tiny_model, curated_dataset), on_line=lines.append)
    assert result.model_artifact_uri.endswith("/training-jobs/job-a/output/model.tar.gz")
    assert any("eval_loss=" in line for line in lines), "the job's output must stream to the caller"
    with tarfile.open(storage.local_path(result.model_artifact_uri)) as tar:
        names = tar.getnames()
    assert "adapter_model.safetensors" in names and "training_config.json" in names
    assert result.metrics["global_step"] == 4
    again = backend.run(_spec("job-a", tiny_model, curated_dataset), on_line=lines.append)
    assert again.reused and again.model_artifact_uri == result.model_artifact_uri


def test_two_process_torchrun_job_produces_the_same_layout(tmp_path, tiny_model, curated_dataset):
    result = _backend(tmp_path).run(_spec("job-ddp", tiny_model, curated_dataset, processes=2), on_line=lambda _: None)
    with tarfile.open(storage.local_path(result.model_artifact_uri)) as tar:
        names = set(tar.getnames())
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "training_config.json"} <= names
    assert result.metrics["global_step"] == 4


def test_a_failing_job_raises_with_the_tail_of_its_log(tmp_path, tiny_model, curated_dataset):
    spec = _spec("job-bad", tiny_model, curated_dataset, hyperparameters={"lora_target_modules": ["no_such_proj"]})
    with pytest.raises(TrainingJobError, match=r"failed with exit code 2(.|\n)*no_such_proj"):
        _backend(tmp_path).run(spec, on_line=lambda _: None)
    assert not storage.exists(_backend(tmp_path).artifact_uri("job-bad"))


def test_a_job_past_its_timeout_is_stopped(tmp_path, tiny_model, curated_dataset):
    spec = _spec("job-slow", tiny_model, curated_dataset, timeout_s=3, hyperparameters={"max_steps": 100000})
    started = time.monotonic()
    with pytest.raises(TrainingJobError, match="timed out after 3s"):
        _backend(tmp_path).run(spec, on_line=lambda _: None)
    assert time.monotonic() - started < 60


def test_same_seed_same_data_gives_the_same_adapter(tmp_path, tiny_model, curated_dataset):
    from safetensors.torch import load_file

    adapters = []
    for attempt in ("a", "b"):
        job = tmp_path / attempt
        out = _run_job(job, curated_dataset, _train_cmd(tiny_model, "--max_steps", "3", "--seed", "11"))
        assert out.returncode == 0, out.stderr[-3000:]
        adapters.append(load_file(job / "model" / "adapter_model.safetensors"))
    first, second = adapters
    assert first.keys() == second.keys() and first
    for name in first:
        assert (first[name] == second[name]).all(), f"{name} differs between two runs with the same seed"

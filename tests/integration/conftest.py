from __future__ import annotations

from pathlib import Path

import pytest

from tests.datagen import good_records, write_jsonl
from tests.tinymodel import build_tiny_model


@pytest.fixture
def good_raw(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", good_records())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, base_model_dir) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer: trains in seconds."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), base_model_dir)


@pytest.fixture(scope="session")
def curated_dataset(tmp_path_factory) -> dict:
    """A small curated dataset version (published by the real pipeline) in its own store."""
    from llmops import storage
    from llmops.config import load_settings
    from llmops.data import stages

    home = tmp_path_factory.mktemp("dataset-home")
    raw = write_jsonl(home / "raw.jsonl", good_records(60))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMOPS_HOME", str(home))
        settings = load_settings("local")
    published = stages.curate(settings, settings.data.model_copy(update={"raw_uri": str(raw)}))
    manifest = storage.read_json(published["manifest_uri"])
    return {**manifest, "uri": published["uri"], "manifest_uri": published["manifest_uri"]}


@pytest.fixture(scope="session")
def tiny_training_job(tmp_path_factory, tiny_model, curated_dataset) -> dict:
    """A finished LoRA job on the tiny model (the local backend's result dict), in its own store."""
    from llmops import storage
    from llmops.backends.training.job import TrainingJobSpec
    from llmops.backends.training.local import LocalTrainingBackend

    tmp = tmp_path_factory.mktemp("tiny-training-job")
    backend = LocalTrainingBackend(storage.to_uri(str(tmp / "store")), tmp / "jobs")
    spec = TrainingJobSpec(
        job_name="job-reg",
        hyperparameters={
            "base_model": str(tiny_model),
            "max_steps": 4,
            "batch_size": 4,
            "max_eval_samples": 8,
            "logging_steps": 1,
            "lora_r": 4,
        },
        channels={
            "train": curated_dataset["files"]["train"]["uri"],
            "validation": curated_dataset["files"]["validation"]["uri"],
        },
        timeout_s=300,
    )
    return backend.run(spec, on_line=lambda _: None).to_dict()

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

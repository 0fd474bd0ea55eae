"""Records to token tensors with the real SmolLM2 tokenizer: the loss falls on response tokens
only, truncation keeps ids and labels aligned, padding never counts, and splits are found."""

from __future__ import annotations

import json

import pytest

from training.chat_format import render
from training.data import IGNORE_INDEX, Collator, encode, encode_all, read_split

SYSTEM = "You answer questions about the Python standard library."
RECORD = {
    "id": "r-1",
    "prompt": "How do I sort a list of tuples by their second item?",
    "response": "Use sorted(pairs, key=lambda p: p[1]); it returns a new list.",
    "system": SYSTEM,
}
END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def learned(encoded: dict) -> list[int]:
    return [t for t in encoded["labels"] if t != IGNORE_INDEX]


def masked_prefix_length(encoded: dict) -> int:
    return next((i for i, t in enumerate(encoded["labels"]) if t != IGNORE_INDEX), len(encoded["labels"]))


def test_labels_cover_the_response_and_mask_the_prompt_and_system(tokenizer):
    encoded = encode(tokenizer, RECORD, 512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    split = masked_prefix_length(encoded)
    assert 0 < split < len(ids)
    # Everything before the response is masked; everything after is the input id itself.
    assert labels[:split] == [IGNORE_INDEX] * split
    assert labels[split:] == ids[split:]

    response_text = tokenizer.decode(learned(encoded))
    assert response_text.startswith(RECORD["response"])
    assert response_text.rstrip() == RECORD["response"] + END_OF_TURN

    prompt_text = tokenizer.decode(ids[:split])
    assert RECORD["prompt"] in prompt_text
    assert SYSTEM in prompt_text
    assert RECORD["response"] not in prompt_text


def test_the_whole_sequence_is_the_full_chat_rendering(tokenizer):
    encoded = encode(tokenizer, RECORD, 512)
    full = render(tokenizer, RECORD["prompt"], RECORD["response"], SYSTEM)
    assert tokenizer.decode(encoded["input_ids"]) == full


def test_a_record_without_system_is_masked_the_same_way(tokenizer):
    record = {k: v for k, v in RECORD.items() if k != "system"}
    encoded = encode(tokenizer, record, 512)
    assert tokenizer.decode(learned(encoded)).rstrip() == RECORD["response"] + END_OF_TURN
    assert RECORD["prompt"] in tokenizer.decode(encoded["input_ids"][: masked_prefix_length(encoded)])


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_prompt_rendering_is_a_prefix_of_the_full_rendering(tokenizer, system):
    prompt_only = render(tokenizer, RECORD["prompt"], None, system)
    full = render(tokenizer, RECORD["prompt"], RECORD["response"], system)
    assert full.startswith(prompt_only)
    assert len(full) > len(prompt_only)
    # ...and so, for a response as curation leaves it (stripped), are the tokens.
    prompt_ids = tokenizer(prompt_only, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids


def test_a_response_with_leading_whitespace_is_fully_learned(tokenizer):
    record = {**RECORD, "response": "\n\nimport os\nos.listdir()"}
    encoded = encode(tokenizer, record, 512)
    assert tokenizer.decode(learned(encoded)).rstrip() == record["response"] + END_OF_TURN


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    full = encode(tokenizer, RECORD, 512)
    prompt_len = masked_prefix_length(full)
    limit = prompt_len + 3
    assert limit < len(full["input_ids"])
    cut = encode(tokenizer, RECORD, limit)
    assert len(cut["input_ids"]) == len(cut["labels"]) == limit
    assert cut["input_ids"] == full["input_ids"][:limit]
    assert cut["labels"] == full["labels"][:limit]
    assert len(learned(cut)) == 3


def test_a_prompt_that_fills_the_window_leaves_nothing_to_learn_and_is_dropped(tokenizer):
    long_record = {**RECORD, "id": "r-long", "prompt": "Explain this in detail. " * 40}
    window = 32
    encoded = encode(tokenizer, long_record, window)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == window
    assert learned(encoded) == []

    kept = encode_all(tokenizer, [RECORD, long_record, RECORD], 512)
    assert len(kept) == 3  # a wide enough window keeps all of them
    kept = encode_all(tokenizer, [RECORD, long_record], 48)
    assert len(kept) == 1
    assert kept[0] == encode(tokenizer, RECORD, 48)
    assert learned(kept[0])


def test_collator_pads_to_the_longest_and_never_counts_padding():
    pad = 2
    batch = [
        {"input_ids": [10, 11, 12, 13, 14], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14]},
        {"input_ids": [20, 21], "labels": [IGNORE_INDEX, 21]},
        {"input_ids": [30, 31, 32], "labels": [IGNORE_INDEX, 31, 32]},
    ]
    out = Collator(pad)(batch)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (3, 5)
    assert out["input_ids"].tolist() == [[10, 11, 12, 13, 14], [20, 21, pad, pad, pad], [30, 31, 32, pad, pad]]
    assert out["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14],
        [IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 31, 32, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert str(out["input_ids"].dtype) == "torch.int64"


def test_collator_on_real_encodings(tokenizer):
    short = encode(tokenizer, {**RECORD, "response": "Use sorted()."}, 512)
    long = encode(tokenizer, RECORD, 512)
    out = Collator(tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert out["input_ids"].shape[1] == len(long["input_ids"])
    assert out["input_ids"][0, :n].tolist() == short["input_ids"]
    assert out["labels"][0, :n].tolist() == short["labels"]
    assert out["attention_mask"][0].sum().item() == n
    assert (out["labels"][0, n:] == IGNORE_INDEX).all()
    assert out["input_ids"][1].tolist() == long["input_ids"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_read_split_reads_the_named_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"id": "t1"}, {"id": "t2"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"id": "v1"}])
    assert [r["id"] for r in read_split(tmp_path, "train")] == ["t1", "t2"]
    assert [r["id"] for r in read_split(tmp_path, "validation")] == ["v1"]


def test_read_split_falls_back_to_the_only_jsonl(tmp_path):
    (tmp_path / "part-0000.jsonl").write_text('{"id": "a"}\n\n{"id": "b"}\n', encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not data")
    assert [r["id"] for r in read_split(tmp_path, "validation")] == ["a", "b"]


def test_read_split_without_a_matching_file_names_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="validation.jsonl") as info:
        read_split(missing, "validation")
    assert str(missing) in str(info.value)

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        read_split(empty_dir, "train")

    ambiguous = tmp_path / "two"
    ambiguous.mkdir()
    write_jsonl(ambiguous / "a.jsonl", [{"id": "a"}])
    write_jsonl(ambiguous / "b.jsonl", [{"id": "b"}])
    with pytest.raises(FileNotFoundError) as info:
        read_split(ambiguous, "train")
    assert str(ambiguous) in str(info.value)


def test_read_split_rejects_an_empty_split(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="train split is empty"):
        read_split(tmp_path, "train")

"""Curated records to token tensors: the shared chat format, with the loss on response tokens only."""

from __future__ import annotations

import json
from pathlib import Path

from training.chat_format import render

IGNORE_INDEX = -100


def read_split(channel_dir: Path, split: str) -> list[dict]:
    """Records of one split from a channel folder (``<split>.jsonl``, or the only ``*.jsonl``)."""
    path = channel_dir / f"{split}.jsonl"
    if not path.is_file():
        candidates = sorted(channel_dir.glob("*.jsonl")) if channel_dir.is_dir() else []
        if len(candidates) != 1:
            raise FileNotFoundError(f"no {split}.jsonl in channel folder {channel_dir}")
        path = candidates[0]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not records:
        raise ValueError(f"{path}: the {split} split is empty")
    return records


def encode(tokenizer, record: dict, max_length: int) -> dict[str, list[int]]:
    """Token ids of the full chat example, with the prompt part masked out of the labels."""
    system = record.get("system")
    prompt_text = render(tokenizer, record["prompt"], None, system)
    full_text = render(tokenizer, record["prompt"], record["response"], system)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template's prompt rendering is not a prefix of the full example")
    # Tokenize the two parts apart: the response tokens are then exactly what generation after the
    # prompt would produce, and a response starting with whitespace cannot merge into the prompt.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    prompt_len = min(len(prompt_ids), len(ids))
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    return {"input_ids": ids, "labels": labels}


def encode_all(tokenizer, records: list[dict], max_length: int) -> list[dict[str, list[int]]]:
    encoded = [encode(tokenizer, r, max_length) for r in records]
    # A prompt that fills the whole window leaves nothing to learn from; skip such examples.
    return [e for e in encoded if any(t != IGNORE_INDEX for t in e["labels"])]


class Collator:
    """Right-pads a batch; padding never counts in the loss or attention."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]):
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

"""Token-length profile with the base model's tokenizer, and the over-length policy.

Lengths are counted on the exact chat text training will see (``training.chat_format``), so a
record that fits here fits there.
"""

from __future__ import annotations

from collections.abc import Callable

from llmops.data.records import SPLITS, DataQualityError, examples

N_TOKENS = "_n_tokens"


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "p50": q(0.5),
        "p95": q(0.95),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def profile_tokens(
    records: list[dict],
    count_tokens: Callable[[list[dict]], list[int]],
    max_tokens: int,
    over_length: str = "drop",
    max_over_length_fraction: float = 1.0,
    truncate: Callable[[dict, int], dict] | None = None,
) -> tuple[list[dict], dict]:
    """Count tokens per record and apply the over-length policy (``drop``, ``truncate`` or
    ``fail``). Too many over-length records fail whatever the policy: they mean the data or
    ``max_tokens`` is wrong, and silently dropping most of a dataset hides that."""
    lengths = count_tokens(records)
    over = [dict(r, **{N_TOKENS: n}) for r, n in zip(records, lengths, strict=True) if n > max_tokens]
    total = len(records)
    if over and over_length == "fail":
        raise DataQualityError(
            f"{len(over)} of {total} records exceed max_tokens={max_tokens} and the policy is 'fail': "
            f"e.g. {examples(over)} ({', '.join(str(r[N_TOKENS]) for r in over[:3])} tokens)"
        )
    if over and len(over) / total > max_over_length_fraction:
        raise DataQualityError(
            f"too many over-length records: {len(over)} of {total} ({len(over) / total:.0%}) exceed "
            f"max_tokens={max_tokens}, more than the allowed {max_over_length_fraction:.0%}: e.g. {examples(over)} "
            f"({', '.join(str(r[N_TOKENS]) for r in over[:3])} tokens); raise data.max_tokens or fix the data"
        )

    kept, truncated, dropped = [], 0, 0
    for record, n in zip(records, lengths, strict=True):
        if n <= max_tokens:
            kept.append(dict(record, **{N_TOKENS: n}))
        elif over_length == "truncate" and truncate is not None:
            shortened = truncate(record, max_tokens)
            if shortened is None:
                dropped += 1
                continue
            kept.append(shortened)
            truncated += 1
        else:
            dropped += 1
    if not kept:
        raise DataQualityError(f"every one of the {total} records exceeds max_tokens={max_tokens}")
    stats = {
        "max_tokens": max_tokens,
        "over_length": len(over),
        "policy": over_length,
        "dropped": dropped,
        "truncated": truncated,
        "all": _quantiles([r[N_TOKENS] for r in kept]),
        "by_split": {s: _quantiles([r[N_TOKENS] for r in kept if r.get("split") == s]) for s in SPLITS},
    }
    return kept, stats


class ChatTokenCounter:
    """Counts and truncates records with a Hugging Face tokenizer and the shared chat format."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def _text(self, record: dict, response: str | None = None) -> str:
        from training.chat_format import render

        return render(
            self.tokenizer, record["prompt"], record["response"] if response is None else response, record.get("system")
        )

    def count(self, records: list[dict]) -> list[int]:
        texts = [self._text(r) for r in records]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def truncate(self, record: dict, max_tokens: int) -> dict | None:
        """Shorten the response so the whole example fits; None when the prompt alone does not."""
        overhead = self.count([dict(record, response="")])[0]
        budget = max_tokens - overhead
        if budget < 8:
            return None
        ids = self.tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        response = self.tokenizer.decode(ids[:budget]).rstrip()
        shortened = dict(record, response=response)
        n = self.count([shortened])[0]
        while n > max_tokens and budget > 8:
            # Decoding then re-encoding can merge tokens differently; trim until it fits.
            budget -= max(1, n - max_tokens)
            shortened["response"] = self.tokenizer.decode(ids[:budget]).rstrip()
            n = self.count([shortened])[0]
        return dict(shortened, **{N_TOKENS: n}) if n <= max_tokens else None

"""Token-length profile and the over-length policy: with a fake counter for the policy, and with
the base model's real tokenizer for counting and truncation."""

from __future__ import annotations

import pytest

from llmops.data.records import ORIGIN, DataQualityError
from llmops.data.token_profile import N_TOKENS, ChatTokenCounter, profile_tokens


def word_count(records: list[dict]) -> list[int]:
    return [len(r["prompt"].split()) + len(r["response"].split()) for r in records]


def rec(n: int, words: int, split: str = "train") -> dict:
    """A record of ``words`` words in all (one prompt word)."""
    return {
        "id": f"r{n}",
        "prompt": "q",
        "response": " ".join(["w"] * (words - 1)),
        "split": split,
        ORIGIN: f"file:///raw.jsonl:{n}",
    }


def fake_truncate(calls: list):
    def truncate(record: dict, max_tokens: int) -> dict:
        calls.append((record["id"], max_tokens))
        shortened = dict(record, response=" ".join(record["response"].split()[: max_tokens - 1]))
        return dict(shortened, **{N_TOKENS: word_count([shortened])[0]})

    return truncate


def test_records_under_the_limit_get_their_token_count():
    records = [rec(1, 3), rec(2, 10), rec(3, 7)]
    kept, stats = profile_tokens(records, word_count, max_tokens=10)
    assert [r[N_TOKENS] for r in kept] == [3, 10, 7]
    assert [r["id"] for r in kept] == ["r1", "r2", "r3"]
    assert stats["over_length"] == stats["dropped"] == stats["truncated"] == 0
    assert N_TOKENS not in records[0], "the input records are not modified"


def test_drop_policy_drops_over_length_records_and_counts_them():
    records = [rec(1, 3), rec(2, 11), rec(3, 7), rec(4, 50)]
    kept, stats = profile_tokens(records, word_count, max_tokens=10, over_length="drop")
    assert [r["id"] for r in kept] == ["r1", "r3"]
    assert stats["over_length"] == 2
    assert stats["dropped"] == 2
    assert stats["truncated"] == 0
    assert stats["policy"] == "drop"


def test_fail_policy_raises_naming_max_tokens_and_locations():
    records = [rec(1, 3), rec(2, 11), rec(3, 7), rec(4, 50)]
    with pytest.raises(DataQualityError) as info:
        profile_tokens(records, word_count, max_tokens=10, over_length="fail")
    message = str(info.value)
    assert "max_tokens=10" in message
    assert "file:///raw.jsonl:2 (id=r2)" in message
    assert "file:///raw.jsonl:4 (id=r4)" in message
    assert "file:///raw.jsonl:1" not in message


def test_truncate_policy_calls_the_truncate_function():
    calls: list = []
    records = [rec(1, 3), rec(2, 15), rec(3, 7)]
    kept, stats = profile_tokens(
        records, word_count, max_tokens=10, over_length="truncate", truncate=fake_truncate(calls)
    )
    assert calls == [("r2", 10)]
    assert [r["id"] for r in kept] == ["r1", "r2", "r3"]
    assert kept[1][N_TOKENS] == 10
    assert stats["truncated"] == 1
    assert stats["dropped"] == 0


def test_truncate_policy_drops_records_the_truncate_function_cannot_fit():
    records = [rec(1, 3), rec(2, 15)]
    kept, stats = profile_tokens(
        records, word_count, max_tokens=10, over_length="truncate", truncate=lambda record, n: None
    )
    assert [r["id"] for r in kept] == ["r1"]
    assert stats["dropped"] == 1
    assert stats["truncated"] == 0


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_too_many_over_length_records_fail_whatever_the_policy(policy):
    calls: list = []
    records = [rec(1, 3), rec(2, 11), rec(3, 12), rec(4, 5)]
    with pytest.raises(DataQualityError) as info:
        profile_tokens(
            records,
            word_count,
            max_tokens=10,
            over_length=policy,
            max_over_length_fraction=0.25,
            truncate=fake_truncate(calls),
        )
    message = str(info.value)
    assert "too many over-length records" in message
    assert "2 of 4" in message
    assert "max_tokens=10" in message
    assert "file:///raw.jsonl:2" in message
    assert calls == [], "nothing is truncated when the data is rejected"
    kept, _ = profile_tokens(records, word_count, 10, policy, 0.5, fake_truncate(calls))
    assert len(kept) == (2 if policy == "drop" else 4)


def test_too_many_over_length_records_fail_with_the_fail_policy_too():
    records = [rec(1, 3), rec(2, 11), rec(3, 12), rec(4, 5)]
    with pytest.raises(DataQualityError, match="max_tokens=10"):
        profile_tokens(records, word_count, 10, "fail", max_over_length_fraction=0.25)


def test_all_records_over_the_limit_raise():
    records = [rec(1, 11), rec(2, 12)]
    with pytest.raises(DataQualityError, match=r"every one of the 2 records exceeds max_tokens=10"):
        profile_tokens(records, word_count, max_tokens=10, over_length="drop")


def test_stats_hold_ordered_quantiles_per_split():
    sizes = {"train": [2, 3, 5, 8, 13, 21, 34, 9, 4, 6], "validation": [7, 3, 30], "test": [12]}
    records = [rec(i, n, split) for i, (split, n) in enumerate((s, n) for s, ns in sizes.items() for n in ns)]
    _, stats = profile_tokens(records, word_count, max_tokens=100)
    assert stats["all"]["count"] == 14
    assert stats["all"]["min"] == 2 and stats["all"]["max"] == 34
    for split, values in sizes.items():
        q = stats["by_split"][split]
        assert q["count"] == len(values)
        assert q["min"] == min(values)
        assert q["max"] == max(values)
        assert q["min"] <= q["p50"] <= q["p95"] <= q["max"]
        assert q["mean"] == round(sum(values) / len(values), 1)
    assert stats["by_split"]["train"]["p50"] in (6, 8)
    assert stats["by_split"]["test"]["p50"] == 12


# --- the real tokenizer --------------------------------------------------------------------------

SYSTEM = "You are a concise assistant that answers questions about Python and its standard library."
LONG_RESPONSE = " ".join(
    f"Step {i}: call the function with argument number {i} and check the result." for i in range(60)
)


@pytest.fixture(scope="module")
def counter(base_model_dir) -> ChatTokenCounter:
    return ChatTokenCounter(str(base_model_dir))


def chat(prompt: str, response: str) -> dict:
    return {"id": "x", "prompt": prompt, "response": response, "system": SYSTEM}


def test_real_counts_are_positive_and_grow_with_the_response(counter):
    short, medium, long = counter.count(
        [
            chat("What is a list?", "A sequence."),
            chat("What is a list?", LONG_RESPONSE[:300]),
            chat("What is a list?", LONG_RESPONSE),
        ]
    )
    assert 0 < short < medium < long
    assert long - short > 500


def test_real_truncate_fits_the_budget_and_keeps_the_start_of_the_response(counter):
    record = chat("How do I call a function many times?", LONG_RESPONSE)
    max_tokens = 120
    assert counter.count([record])[0] > max_tokens
    shortened = counter.truncate(record, max_tokens)
    assert shortened is not None
    recount = counter.count([shortened])[0]
    assert recount <= max_tokens
    assert shortened[N_TOKENS] == recount
    assert recount > max_tokens - 10, "the budget is used, not wasted"
    assert shortened["prompt"] == record["prompt"]
    assert 0 < len(shortened["response"]) < len(record["response"])
    assert record["response"].startswith(shortened["response"])


def test_real_truncate_gives_up_when_the_prompt_alone_exceeds_the_budget(counter):
    record = chat("Explain this: " + "very " * 200, "Short answer.")
    assert counter.truncate(record, 100) is None


def test_real_truncate_policy_end_to_end(counter):
    records = [
        dict(chat("What is a tuple?", "An immutable sequence."), id="a", split="train"),
        dict(chat("How do I loop?", LONG_RESPONSE), id="b", split="train"),
    ]
    kept, stats = profile_tokens(records, counter.count, 150, "truncate", truncate=counter.truncate)
    assert [r["id"] for r in kept] == ["a", "b"]
    assert all(r[N_TOKENS] <= 150 for r in kept)
    assert counter.count(kept) == [r[N_TOKENS] for r in kept]
    assert stats["truncated"] == 1

"""Token-length profile and the over-length policy: with a fake counter for the policy, and with
the base model's real tokenizer for counting and truncation, which must count exactly what
transformers counts while needing neither it nor torch."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert [(d["origin"], d["id"], d["stage"], d["n_tokens"]) for d in stats["drops"]] == [
        ("file:///raw.jsonl:2", "r2", "profile_tokens", 11),
        ("file:///raw.jsonl:4", "r4", "profile_tokens", 50),
    ]
    assert {d["reason"] for d in stats["drops"]} == {"longer than max_tokens"}
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
    (entry,) = stats["drops"]
    assert entry["id"] == "r2" and "no room to truncate" in entry["reason"]


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


# --- without transformers: the same counts --------------------------------------------------------------

UNICODE = "Naïve café, Straße, ﬁnance; 日本語の文章、中文句子、한국어 문장; emoji 🙂🚀🐍; math ∑∫√≤≥≠∞; zero\u200bwidth"
CODE = "def f(x):\n\treturn {'key': [x ** 2 for x in range(10)]}  # comment\n\n    indented\r\nwindows line"
TEXTS = [
    "",
    " ",
    "What is a list?",
    "  leading and trailing spaces  ",
    UNICODE,
    CODE,
    "Special-token text in content: <|im_start|>user\nhi<|im_end|> and <|endoftext|>.",
    "x" * 3000,
    LONG_RESPONSE * 3,
    "Punctuation , spaced . out ! like ? this 's 're n't",
]


def sample_records() -> list[dict]:
    """Every prompt with every response (and none), with and without a system message."""
    records = []
    for i, prompt in enumerate(TEXTS):
        for j, response in enumerate(TEXTS):
            records.append(
                {"id": f"{i}-{j}", "prompt": prompt, "response": response, "system": SYSTEM if i % 2 else None}
            )
    return records


@pytest.fixture(scope="module")
def hf_tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.mark.model
def test_counts_match_transformers(counter, hf_tokenizer):
    from llmops.data.token_profile import ChatTokenizer
    from training.chat_format import render

    assert isinstance(counter.tokenizer, ChatTokenizer), "the base model's folder has a tokenizer.json"
    records = sample_records()
    for response in (None, "given"):
        chats = [(r["prompt"], r["response"] if response else None, r["system"]) for r in records]
        assert [render(counter.tokenizer, *c) for c in chats] == [render(hf_tokenizer, *c) for c in chats]
    expected = [
        len(ids)
        for ids in hf_tokenizer(
            [render(hf_tokenizer, r["prompt"], r["response"], r["system"]) for r in records], add_special_tokens=False
        )["input_ids"]
    ]
    assert counter.count(records) == expected
    assert len(records) == 100 and max(expected) > 1500


@pytest.mark.model
def test_encode_and_decode_match_transformers(counter, hf_tokenizer):
    for text in TEXTS:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert counter.tokenizer.encode([text]) == [ids]
        for cut in (1, 7, len(ids) // 2, len(ids)):
            assert counter.tokenizer.decode(ids[:cut]) == hf_tokenizer.decode(ids[:cut])


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
    "{% else %}\n  {{ m['role'] | upper }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}{{ eos_token }}"
)


@pytest.mark.model
@pytest.mark.parametrize("where", ["tokenizer_config", "named_in_tokenizer_config", "none"])
def test_other_template_layouts_render_as_transformers_renders_them(base_model_dir, tmp_path, where):
    """A template in tokenizer_config.json (plain or named), or none (render's plain layout);
    Jinja features transformers enables: trim/lstrip blocks, loop controls, tojson, generation."""
    from transformers import AutoTokenizer

    from llmops.data.token_profile import ChatTokenizer
    from training.chat_format import render

    (tmp_path / "tokenizer.json").symlink_to(base_model_dir / "tokenizer.json")
    config = json.loads((base_model_dir / "tokenizer_config.json").read_text())
    if where == "tokenizer_config":
        config["chat_template"] = TEMPLATE
    elif where == "named_in_tokenizer_config":
        config["chat_template"] = [{"name": "default", "template": TEMPLATE}, {"name": "other", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = ChatTokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.chat_template is None) == (where == "none")
    for response in ('An "answer" <b>é</b>', None):
        expected = render(theirs, "A question?", response, SYSTEM)
        assert render(ours, "A question?", response, SYSTEM) == expected
        assert ours.encode([expected]) == [theirs(expected, add_special_tokens=False)["input_ids"]]


def test_a_folder_without_tokenizer_json_falls_back_to_transformers(base_model_dir, tmp_path):
    from llmops.data import token_profile

    # transformers is hidden: the fallback is what tries to import it.
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(__import__("sys").modules, "transformers", None)
        with pytest.raises(ImportError):
            token_profile.ChatTokenCounter(str(tmp_path))


# --- the tokenizer of a model staged in the store -----------------------------------------------------


def stage_tokenizer(base_model_dir, store_uri: str, key: str = "smollm2-135m-instruct") -> str:
    from llmops.staging import base_model_uri, stage_files

    files = {
        name: (base_model_dir / name).read_bytes()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")
    }
    files["model.safetensors"] = b"weights the tokenizer never reads"
    uri = base_model_uri(store_uri, key)
    stage_files(files, uri, source=str(base_model_dir))
    return uri


@pytest.mark.model
def test_a_worker_without_the_model_counts_with_the_staged_tokenizer(base_model_dir, counter, settings, tmp_path):
    from llmops.data.token_profile import tokenizer_folder

    stage_tokenizer(base_model_dir, settings.store_uri)
    cache = tmp_path / "empty-models-cache"
    folder = tokenizer_folder("smollm2-135m-instruct", cache, settings.store_uri)
    assert folder.is_relative_to(cache)
    assert sorted(p.name for p in folder.iterdir()) == [
        "_STAGED.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    records = sample_records()
    assert ChatTokenCounter(str(folder)).count(records) == counter.count(records)
    # Fetched once: a second call reads the local copy, even with the store gone.
    assert tokenizer_folder("smollm2-135m-instruct", cache, settings.store_uri + "-gone") == folder


def test_the_local_model_folder_comes_first(base_model_dir, settings):
    from llmops.data.token_profile import tokenizer_folder

    assert tokenizer_folder("smollm2-135m-instruct", base_model_dir.parent, settings.store_uri) == base_model_dir


def test_a_staged_file_that_does_not_match_its_hash_is_refused(base_model_dir, settings, tmp_path):
    from llmops import storage
    from llmops.data.token_profile import tokenizer_folder
    from llmops.models import ModelNotFoundError

    uri = stage_tokenizer(base_model_dir, settings.store_uri)
    storage.write_bytes(storage.join(uri, "tokenizer_config.json"), b"{}")
    with pytest.raises(ModelNotFoundError, match="does not match its hash"):
        tokenizer_folder("smollm2-135m-instruct", tmp_path / "cache", settings.store_uri)
    assert not (tmp_path / "cache" / "tokenizers" / "smollm2-135m-instruct").exists()


def test_a_model_neither_here_nor_staged_says_how_to_stage_it(settings, tmp_path):
    from llmops.data.token_profile import tokenizer_folder
    from llmops.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"not staged at .*base-models/my-model.*stage-model"):
        tokenizer_folder(str(tmp_path / "my-model"), tmp_path / "cache", settings.store_uri)


@pytest.mark.model
def test_counting_works_without_torch_or_transformers(base_model_dir, counter, settings, tmp_path):
    """As on an MWAA worker: the staged tokenizer is fetched and counts the same without them."""
    import os
    import subprocess
    import sys

    stage_tokenizer(base_model_dir, settings.store_uri)
    records = sample_records()
    long = chat("How do I loop?", LONG_RESPONSE * 3)
    script = (
        "import json, sys\n"
        "for name in ('torch', 'transformers', 'sentence_transformers'):\n"
        "    sys.modules[name] = None\n"
        "from llmops.data.token_profile import ChatTokenCounter, tokenizer_folder\n"
        f"folder = tokenizer_folder('smollm2-135m-instruct', {str(tmp_path / 'cache')!r}, {settings.store_uri!r})\n"
        "counter = ChatTokenCounter(str(folder))\n"
        "given = json.loads(sys.stdin.read())\n"
        "counts, truncated = counter.count(given['records']), counter.truncate(given['long'], 300)\n"
        "print(json.dumps({'counts': counts, 'truncated': truncated}))\n"
    )
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "plugins"), str(root)])}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps({"records": records, "long": long}),
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["counts"] == counter.count(records)
    assert result["truncated"] == counter.truncate(long, 300)
    assert result["truncated"][N_TOKENS] <= 300

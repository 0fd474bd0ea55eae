"""Record transforms: what a curator relies on when cleaning, de-duplicating, scrubbing,
formatting and splitting a dataset."""

from __future__ import annotations

import random
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmops.data.ingest import read_raw
from llmops.data.records import ORIGIN, SPLITS, DataQualityError, normalized_key
from llmops.data.transforms import (
    assign_splits,
    clean,
    clean_text,
    deduplicate,
    format_records,
    prompt_split_counts,
    scrub_pii,
    split_of,
)
from llmops.prompts import load_template

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
SALT = "llmops-split-v1"


def rec(n: int, prompt: str = "", response: str = "", **extra) -> dict:
    return {"prompt": prompt, "response": response, ORIGIN: f"file:///raw.jsonl:{n}", **extra}


# --- clean_text ----------------------------------------------------------------------------------


def test_clean_text_composes_decomposed_characters():
    assert clean_text("Cafe\u0301 cre\u0300me") == "Caf\u00e9 cr\u00e8me"


def test_clean_text_unifies_newlines():
    assert clean_text("one\r\ntwo\rthree\nfour") == "one\ntwo\nthree\nfour"


def test_clean_text_removes_control_and_zero_width_characters():
    assert clean_text("a\x00b\x07c\x1bd\x7fe\x85f") == "abcdef"
    assert clean_text("zero\u200bwidth\u200c join\u200d\u2060er\ufeff") == "zerowidth joiner"


def test_clean_text_trims_trailing_spaces_and_collapses_blank_lines():
    assert clean_text("line one   \nline two\t\n") == "line one\nline two"
    assert clean_text("a\n\n\n\n\nb") == "a\n\nb"
    assert clean_text("a\n  \n \t\n\nb") == "a\n\nb"
    assert clean_text("a\n\nb") == "a\n\nb"


def test_clean_text_keeps_indentation_inside_text():
    code = "Use:\n\ndef f(x):\n    if x:\n        return 1\n\treturn 0"
    assert clean_text(code) == code


def test_clean_text_output_is_nfc_even_after_removing_zero_width_characters():
    assert clean_text("Cafe\u200b\u0301") == "Caf\u00e9"


# --- clean ---------------------------------------------------------------------------------------


def test_clean_drops_records_without_prompt_or_response_and_counts_them():
    records = [
        rec(1, "What is a list?  ", "A mutable sequence.\r\n"),
        rec(2, "What is a set?", "  \u200b\n "),
        {"instruction": "\t", "response": "orphan answer", ORIGIN: "file:///raw.jsonl:3"},
        {"instruction": "Explain zip.", "context": "zip(*it)", "response": "Pairs.", ORIGIN: "file:///raw.jsonl:4"},
    ]
    kept, stats = clean(records)
    assert [r[ORIGIN] for r in kept] == ["file:///raw.jsonl:1", "file:///raw.jsonl:4"]
    assert kept[0]["prompt"] == "What is a list?"
    assert kept[0]["response"] == "A mutable sequence."
    assert stats == {
        "records_in": 4,
        "empty_response": 1,
        "empty_prompt": 1,
        "drops": [
            {"origin": "file:///raw.jsonl:3", "id": None, "stage": "clean", "reason": "empty prompt"},
            {"origin": "file:///raw.jsonl:2", "id": None, "stage": "clean", "reason": "empty response"},
        ],
    }
    assert records[0]["prompt"] == "What is a list?  ", "the input records are not modified"


def test_clean_all_empty_responses_raise_with_a_location():
    records = [rec(1, "p1", ""), rec(2, "p2", "   "), rec(3, "p3", "\u200b")]
    with pytest.raises(DataQualityError) as info:
        clean(records)
    assert "all 3 responses are empty" in str(info.value)
    assert "file:///raw.jsonl:1" in str(info.value)


def test_clean_over_the_empty_fraction_raises():
    records = [rec(1, "p1", "r1"), rec(2, "p2", ""), rec(3, "", "r3"), rec(4, "p4", "r4")]
    with pytest.raises(DataQualityError) as info:
        clean(records, max_empty_fraction=0.25)
    message = str(info.value)
    assert "2 of 4 records" in message
    assert "file:///raw.jsonl:2" in message
    assert "file:///raw.jsonl:3" in message
    kept, _ = clean(records, max_empty_fraction=0.5)
    assert len(kept) == 2


# --- deduplicate ---------------------------------------------------------------------------------


def test_deduplicate_drops_exact_and_near_duplicates_keeping_the_first():
    records = [
        rec(1, "What does zip() do?", "It pairs items from iterables."),
        rec(2, "What is a dict?", "A mapping."),
        rec(3, "What does zip() do?", "It pairs items from iterables."),
        rec(4, "what does ZIP do", "it pairs items, from   iterables!"),
        rec(5, "What does zip() do?", "It stops at the shortest iterable."),
    ]
    kept, stats = deduplicate(records)
    assert [r[ORIGIN] for r in kept] == ["file:///raw.jsonl:1", "file:///raw.jsonl:2", "file:///raw.jsonl:5"]
    assert stats == {
        "records_in": 5,
        "exact_duplicates": 1,
        "near_duplicates": 1,
        "drops": [
            {
                "origin": "file:///raw.jsonl:3",
                "id": None,
                "stage": "deduplicate",
                "reason": "exact duplicate",
                "duplicate_of": "file:///raw.jsonl:1",
            },
            {
                "origin": "file:///raw.jsonl:4",
                "id": None,
                "stage": "deduplicate",
                "reason": "near duplicate",
                "duplicate_of": "file:///raw.jsonl:1",
            },
        ],
    }


def test_deduplicate_counts_context_as_part_of_the_prompt():
    records = [
        {"instruction": "Explain.", "context": "zip", "response": "r", ORIGIN: "a:1"},
        {"instruction": "Explain.", "context": "map", "response": "r", ORIGIN: "a:2"},
    ]
    kept, stats = deduplicate(records)
    assert len(kept) == 2
    assert stats["exact_duplicates"] == stats["near_duplicates"] == 0


def test_deduplicate_leaves_distinct_records_untouched():
    records = [rec(i, f"Question number {i}?", f"Answer {i}.") for i in range(1, 6)]
    kept, stats = deduplicate(records)
    assert kept == records
    assert stats == {"records_in": 5, "exact_duplicates": 0, "near_duplicates": 0, "drops": []}


def test_deduplicate_a_file_of_only_duplicates_raises():
    records = [rec(1, "Same?", "Same."), rec(2, "Same?", "Same."), rec(3, "same", "SAME")]
    with pytest.raises(DataQualityError, match="duplicates") as info:
        deduplicate(records)
    assert "all 3 records" in str(info.value)
    assert "file:///raw.jsonl:1" in str(info.value)


def test_deduplicate_over_the_duplicate_fraction_raises():
    records = [rec(1, "A?", "a"), rec(2, "A?", "a"), rec(3, "B?", "b"), rec(4, "b", "B!"), rec(5, "C?", "c")]
    with pytest.raises(DataQualityError) as info:
        deduplicate(records, max_duplicate_fraction=0.3)
    message = str(info.value)
    assert "2 of 5 records" in message
    assert "duplicates" in message
    assert "file:///raw.jsonl:2" in message
    kept, _ = deduplicate(records, max_duplicate_fraction=0.4)
    assert len(kept) == 3


def test_deduplicate_accepts_a_null_context_from_parquet(tmp_path):
    path = tmp_path / "raw.parquet"
    table = pa.table(
        {
            "instruction": ["Explain zip.", "Explain map."],
            "context": ["zip(*iterables)", None],
            "response": ["Pairs items.", "Applies a function."],
        }
    )
    pq.write_table(table, path)
    cleaned, _ = clean(read_raw(str(path)))
    kept, stats = deduplicate(cleaned)
    assert len(kept) == 2
    assert stats["exact_duplicates"] == stats["near_duplicates"] == 0


# --- scrub_pii -----------------------------------------------------------------------------------


def test_scrub_pii_replaces_pii_in_every_text_field_and_counts_it():
    records = [
        {
            "instruction": "Mail jane.doe@example.com about it",
            "context": "cc: ops@example.org",
            "response": "The server at 192.168.1.10 answers.",
            ORIGIN: "a:1",
        },
        rec(2, "What is 3.11.7?", "A Python version."),
    ]
    scrubbed, stats = scrub_pii(records)
    assert scrubbed[0]["instruction"] == "Mail [EMAIL] about it"
    assert scrubbed[0]["context"] == "cc: [EMAIL]"
    assert scrubbed[0]["response"] == "The server at [IP_ADDRESS] answers."
    assert scrubbed[1] == records[1]
    assert stats == {"enabled": True, "replaced": {"EMAIL": 2, "IP_ADDRESS": 1}}
    assert records[0]["instruction"] == "Mail jane.doe@example.com about it", "the input is not modified"


def test_scrub_pii_reaches_source_and_nested_metadata_but_never_the_id():
    records = [
        {
            "id": "q-1",
            "instruction": "Explain sets.",
            "response": "Unique items.",
            "source": "export by jane.doe@example.com",
            "author": {"email": "jane.doe@example.com", "hosts": ["10.0.0.1", 3]},
            "split": "train",
            ORIGIN: "a:1",
        }
    ]
    (scrubbed,), stats = scrub_pii(records)
    assert scrubbed["source"] == "export by [EMAIL]"
    assert scrubbed["author"] == {"email": "[EMAIL]", "hosts": ["[IP_ADDRESS]", 3]}
    assert (scrubbed["id"], scrubbed["split"], scrubbed[ORIGIN]) == ("q-1", "train", "a:1")
    assert stats["replaced"] == {"EMAIL": 2, "IP_ADDRESS": 1}
    assert records[0]["author"]["email"] == "jane.doe@example.com", "the input is not modified"


def test_scrub_pii_disabled_leaves_text_unchanged():
    records = [rec(1, "Mail jane.doe@example.com", "ping 10.0.0.1")]
    scrubbed, stats = scrub_pii(records, enabled=False)
    assert scrubbed == [rec(1, "Mail jane.doe@example.com", "ping 10.0.0.1")]
    assert stats == {"enabled": False, "replaced": {}}


# --- format_records ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template():
    return load_template("python_docs_qa")


def test_format_renders_instructions_and_keeps_prompts(template):
    records = [
        {"instruction": "Explain zip.", "context": "zip(*iterables)", "response": "Pairs.", ORIGIN: "a:1"},
        {"instruction": "Explain map.", "response": "Applies.", ORIGIN: "a:2"},
        {"prompt": "Already a prompt", "response": "Kept.", ORIGIN: "a:3"},
    ]
    out, stats = format_records(records, template, default_source="python-docs")
    assert [r["prompt"] for r in out] == ["Explain zip.\n\nzip(*iterables)", "Explain map.", "Already a prompt"]
    assert [r["response"] for r in out] == ["Pairs.", "Applies.", "Kept."]
    assert [r[ORIGIN] for r in out] == ["a:1", "a:2", "a:3"]
    for record in out:
        assert record["template"] == "python_docs_qa@catalog"
        assert record["system"] == template.system
        assert record["system"].startswith("You are a concise assistant")
        assert "instruction" not in record and "context" not in record
    assert stats == {"records_in": 3, "rendered_with_template": 2, "template": "python_docs_qa@catalog"}


def test_format_ids_are_stable_and_content_addressed(template):
    a = {"instruction": "Explain zip.", "response": "Pairs."}
    (first,), _ = format_records([a], template, "s")
    (again,), _ = format_records([dict(a, source="other", extra=1)], template, "s")
    (other,), _ = format_records([dict(a, response="Pairs items.")], template, "s")
    (as_prompt,), _ = format_records([{"prompt": "Explain zip.", "response": "Pairs."}], template, "s")
    assert first["id"] == again["id"] == as_prompt["id"]
    assert first["id"] != other["id"]
    assert first["id"].startswith("r-") and len(first["id"]) == 18


def test_format_keeps_given_ids_sources_and_splits(template):
    records = [
        {"id": "q-1", "prompt": "p", "response": "r", "source": "wiki", "split": "test"},
        {"prompt": "p2", "response": "r2", "source": ""},
    ]
    out, _ = format_records(records, template, default_source="python-docs")
    assert out[0]["id"] == "q-1"
    assert out[0]["source"] == "wiki"
    assert out[0]["split"] == "test"
    assert out[1]["source"] == "python-docs"
    assert "split" not in out[1]


def test_format_accepts_records_written_for_its_template_at_any_version(template):
    records = [
        {"prompt": "p", "response": "r", "template": "python_docs_qa@3"},
        {"prompt": "p2", "response": "r2", "template": "python_docs_qa"},
    ]
    out, _ = format_records(records, template, "s")
    assert {r["template"] for r in out} == {"python_docs_qa@catalog"}


def test_format_refuses_records_written_for_another_template(template):
    records = [
        {"prompt": "p", "response": "r", "template": "python_docs_qa@1", ORIGIN: "a:1"},
        {"prompt": "p2", "response": "r2", "template": "plain_instruction@2", ORIGIN: "a:2", "id": "x"},
    ]
    with pytest.raises(DataQualityError) as info:
        format_records(records, template, "s")
    message = str(info.value)
    assert "template mismatch: 1 record(s) were written for template(s) ['plain_instruction@2']" in message
    assert "this run formats with python_docs_qa@catalog" in message and "a:2 (id=x)" in message


def test_format_moves_unknown_fields_under_meta(template):
    records = [
        {"prompt": "p", "response": "r", "difficulty": "easy", "tags": ["io"], ORIGIN: "a:1"},
        {"prompt": "p2", "response": "r2", "meta": {"license": "PSF"}, "lang": "en"},
        {"prompt": "p3", "response": "r3"},
    ]
    out, _ = format_records(records, template, "s")
    assert out[0]["meta"] == {"difficulty": "easy", "tags": ["io"]}
    assert out[1]["meta"] == {"license": "PSF", "lang": "en"}
    assert "meta" not in out[2]
    assert set(out[0]) == {"id", "prompt", "response", "source", "system", "template", "meta", ORIGIN}


# --- split_of / assign_splits --------------------------------------------------------------------

WORD = st.text(alphabet=string.ascii_letters + string.digits + "éñü", min_size=1, max_size=8)
WORDS = st.lists(WORD, min_size=1, max_size=8)
SEPARATORS = st.sampled_from([" ", "  ", "\t", "\n", ", ", " - ", "... ", "? ", "/", "_", " (", ") "])
EDGES = st.sampled_from(["", "?", "!", "...", " ", "¿", "\n", '"', "("])
CASES = st.sampled_from([str.lower, str.upper, str.title, str.swapcase, str])


@st.composite
def prompt_and_variant(draw):
    words = draw(WORDS)
    prompt = " ".join(words)
    pieces = [draw(CASES)(w) for w in words]
    body = pieces[0] + "".join(draw(SEPARATORS) + w for w in pieces[1:])
    return prompt, draw(EDGES) + body + draw(EDGES)


DISTINCT_PROMPTS = st.lists(WORDS.map(" ".join), min_size=1, max_size=30, unique_by=normalized_key)


@settings(max_examples=100, deadline=None)
@given(prompt=WORDS.map(" ".join), salt=st.text(max_size=10))
def test_split_of_is_deterministic(prompt, salt):
    first = split_of(prompt, FRACTIONS, salt)
    assert first in SPLITS
    assert split_of(prompt, dict(FRACTIONS), salt) == first


@settings(max_examples=100, deadline=None)
@given(pair=prompt_and_variant())
def test_split_of_ignores_case_punctuation_and_whitespace(pair):
    prompt, variant = pair
    assert split_of(variant, FRACTIONS, SALT) == split_of(prompt, FRACTIONS, SALT)


@settings(max_examples=30, deadline=None)
@given(
    base=DISTINCT_PROMPTS,
    extra=st.lists(WORDS.map(" ".join), max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_records_split_does_not_depend_on_the_rest_of_the_batch(base, extra, seed):
    records = [{"id": f"b{i}", "prompt": p, "response": "r"} for i, p in enumerate(base)]
    superset = records + [{"id": f"e{i}", "prompt": p, "response": "r"} for i, p in enumerate(extra)]
    random.Random(seed).shuffle(superset)
    alone, _ = assign_splits(records, FRACTIONS, SALT)
    together, _ = assign_splits(superset, FRACTIONS, SALT)
    in_batch = {r["id"]: r["split"] for r in together}
    assert {r["id"]: r["split"] for r in alone} == {r["id"]: in_batch[r["id"]] for r in alone}


@settings(max_examples=20, deadline=None)
@given(salts=st.lists(st.text(max_size=12), min_size=2, max_size=2, unique=True))
def test_the_salt_changes_some_assignments(salts):
    prompts = [f"How do I use feature {i}?" for i in range(200)]
    first = [split_of(p, FRACTIONS, salts[0]) for p in prompts]
    second = [split_of(p, FRACTIONS, salts[1]) for p in prompts]
    assert first != second


@pytest.mark.parametrize("salt", [SALT, "another-salt"])
def test_split_fractions_match_the_configuration(salt):
    prompts = [f"How does function number {i} of module {i % 97} behave?" for i in range(5000)]
    assert len({normalized_key(p) for p in prompts}) == 5000
    records = [{"prompt": p, "response": "r"} for p in prompts]
    out, stats = assign_splits(records, FRACTIONS, salt)
    assert sum(stats["counts"].values()) == 5000
    for name, wanted in FRACTIONS.items():
        assert abs(stats["counts"][name] / 5000 - wanted) <= 0.02, (name, stats["counts"])
    assert stats["from_source"] == 0
    assert all(r["split"] == split_of(r["prompt"], FRACTIONS, salt) for r in out[:500])


def _prompt_not_hashed_to(split: str) -> str:
    return next(p for p in (f"prompt {i}" for i in range(100)) if split_of(p, FRACTIONS, SALT) != split)


def test_assign_splits_respects_a_source_split_when_asked():
    prompt = _prompt_not_hashed_to("test")
    records = [{"id": "a", "prompt": prompt, "response": "r", "split": "test"}, {"prompt": "other", "response": "r"}]
    out, stats = assign_splits(records, FRACTIONS, SALT, respect_source_split=True)
    assert out[0]["split"] == "test"
    assert out[1]["split"] == split_of("other", FRACTIONS, SALT)
    assert stats["from_source"] == 1
    assert sum(stats["counts"].values()) == 2

    rehashed, stats = assign_splits(records, FRACTIONS, SALT, respect_source_split=False)
    assert rehashed[0]["split"] == split_of(prompt, FRACTIONS, SALT) != "test"
    assert stats["from_source"] == 0
    assert records[0]["split"] == "test", "the input records are not modified"


def test_assign_splits_rejects_an_unknown_source_split():
    records = [
        {"id": "ok", "prompt": "p", "response": "r", "split": "train"},
        {"id": "q9", "prompt": "q", "response": "r", "split": "dev", ORIGIN: "file:///raw.jsonl:4"},
    ]
    with pytest.raises(DataQualityError) as info:
        assign_splits(records, FRACTIONS, SALT)
    message = str(info.value)
    assert "file:///raw.jsonl:4 (id=q9)" in message
    assert "'dev'" in message


def test_prompt_split_counts_reports_a_prompt_in_two_splits():
    records = [
        {"prompt": "What is a list?", "split": "train"},
        {"prompt": "what is a LIST", "split": "test"},
        {"prompt": "What is a dict?", "split": "train"},
        {"prompt": "What is a dict?", "split": "train"},
    ]
    counts = prompt_split_counts(records)
    assert counts == {"what is a list": 2, "what is a dict": 1}

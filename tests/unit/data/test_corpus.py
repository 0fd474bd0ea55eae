import os
import pydoc_data.topics
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmops.data.corpus import build_python_docs_corpus, cut_paragraphs, split_topic_sections

REQUIRED_KEYS = {"id", "instruction", "context", "response", "source"}
UNDERLINE = re.compile(r"^\s*([*=~^-])\1{3,}\s*$", re.MULTILINE)
REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return build_python_docs_corpus()


@pytest.fixture(scope="module")
def by_id(corpus) -> dict[str, dict]:
    return {record["id"]: record for record in corpus}


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """A throwaway module exercising every selection rule of the docstring source."""
    (tmp_path / "corpusfake.py").write_text(
        textwrap.dedent(
            '''
            from textwrap import dedent

            __all__ = ["documented", "terse", "Parent", "Child", "dedent", "undocumented"]


            def documented(a, b=2):
                """Add two numbers together and return the sum of both of them.

                A second paragraph that says more about the behaviour."""
                return a + b


            def terse():
                """Too short."""


            def undocumented():
                pass


            def not_exported():
                """Documented at length but absent from __all__, so not public API."""


            class Parent:
                """A parent class whose docstring is long enough to be kept."""

                def greet(self):
                    """Return a friendly greeting for whoever is asking for one."""
                    return "hi"

                def __repr__(self):
                    """Dunder methods are plumbing, not API, whatever their docs."""
                    return "Parent()"

                def _helper(self):
                    """Private helpers are not API either, however well documented."""


            class Child(Parent):
                def greet(self):
                    return "hello"
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "corpusfake", raising=False)
    docs = [r for r in build_python_docs_corpus(modules=["corpusfake"]) if r["id"].startswith("doc:")]
    return {r["id"]: r for r in docs}


def test_records_have_exactly_the_raw_record_keys_and_text(corpus):
    for record in corpus:
        assert set(record) == REQUIRED_KEYS, record["id"]
        assert all(isinstance(record[key], str) for key in REQUIRED_KEYS), record["id"]
        assert record["instruction"].strip(), record["id"]
        assert record["response"].strip(), record["id"]


def test_ids_are_unique_and_sorted(corpus):
    ids = [record["id"] for record in corpus]
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids)


def test_building_twice_gives_identical_output(corpus):
    assert build_python_docs_corpus() == corpus


def test_cli_and_the_pipeline_build_the_same_corpus_whatever_this_process_imported(tmp_path):
    """The pipeline builds in a fresh ``python -I``; the CLI, under another hash seed, must agree
    byte for byte, even though this pytest process has imported (and patched) many modules."""
    import torch  # noqa: F401  (loads libraries that patch stdlib objects the corpus reads)

    from llmops.data.corpus import build_in_fresh_interpreter

    out = tmp_path / "corpus.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "plugins"), str(REPO_ROOT)])}
    env["PYTHONHASHSEED"] = "4242"
    result = subprocess.run(
        [sys.executable, "-m", "llmops.data.corpus", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    fresh = build_in_fresh_interpreter()
    assert out.read_bytes() == fresh
    assert len(fresh.splitlines()) > 1000


def test_both_sources_are_present_in_sensible_numbers(corpus):
    pydoc = [r for r in corpus if r["source"].startswith("pydoc_data.topics/")]
    docstrings = [r for r in corpus if r["source"].startswith("docstring/")]
    assert len(pydoc) > 50
    assert len(docstrings) > 500
    assert len(pydoc) + len(docstrings) == len(corpus)
    assert all(r["id"].startswith("pydoc:") and r["context"] == "" for r in pydoc)
    assert all(r["id"].startswith("doc:") for r in docstrings)


def test_no_response_exceeds_the_default_limit(corpus):
    assert max(len(r["response"]) for r in corpus) <= 1200


def test_a_smaller_limit_is_respected_and_actually_cuts():
    small = build_python_docs_corpus(modules=["json", "textwrap"], max_response_chars=200)
    full = {r["id"]: r for r in build_python_docs_corpus(modules=["json", "textwrap"])}
    assert all(len(r["response"]) <= 200 for r in small)
    assert any(len(full[r["id"]]["response"]) > 200 for r in small)


def test_json_dumps_record_is_right(by_id):
    record = by_id["doc:json.dumps"]
    assert "JSON" in record["response"]
    assert record["context"].startswith("Signature: json.dumps(obj")
    assert "`json.dumps`" in record["instruction"]
    assert record["source"] == "docstring/json.dumps"


def test_assert_statement_has_a_pydoc_record(by_id):
    record = by_id["pydoc:assert:0"]
    assert record["source"] == "pydoc_data.topics/assert"
    assert '"assert" statement' in record["instruction"]
    assert record["response"].startswith("Assert statements are a convenient way")
    assert "assert_stmt ::=" in record["response"]


def test_underline_lines_never_reach_a_response(corpus):
    offenders = [r["id"] for r in corpus if r["id"].startswith("pydoc:") and UNDERLINE.search(r["response"])]
    assert offenders == []


def test_submodule_titles_become_their_own_records(corpus):
    compound = [r for r in corpus if r["source"] == "pydoc_data.topics/compound"]
    assert len(compound) > 10
    assert any("OR Patterns" in r["instruction"] for r in compound)


def test_instruction_phrasing_varies_but_is_fixed_per_id(corpus):
    pydoc_openings = {r["instruction"].split()[0] for r in corpus if r["id"].startswith("pydoc:")}
    doc_openings = {r["instruction"].split()[0] for r in corpus if r["id"].startswith("doc:")}
    assert len(pydoc_openings) >= 2
    assert len(doc_openings) >= 2


def test_posixpath_is_labelled_os_path_and_builtins_are_unqualified(by_id):
    assert "doc:os.path.join" in by_id
    assert not any(key.startswith("doc:posixpath.") for key in by_id)
    assert by_id["doc:len"]["context"].startswith("Signature: len(")
    assert "doc:str.split" in by_id


def test_reexports_are_documented_only_under_their_owner(by_id):
    assert "doc:enum.Enum" in by_id
    assert "doc:uuid.Enum" not in by_id
    # Owned through a submodule of the package, so it still belongs to json.
    assert "doc:json.JSONDecoder" in by_id


def test_docstring_selection_rules(fake_module):
    assert set(fake_module) == {"doc:corpusfake.documented", "doc:corpusfake.Parent", "doc:corpusfake.Parent.greet"}
    record = fake_module["doc:corpusfake.documented"]
    assert record["context"] == "Signature: corpusfake.documented(a, b=2)"
    assert record["response"] == (
        "Add two numbers together and return the sum of both of them.\n\n"
        "A second paragraph that says more about the behaviour."
    )
    assert record["source"] == "docstring/corpusfake.documented"


def test_split_topic_sections_strips_underlines_and_transitions():
    text = textwrap.dedent(
        """\
        The "demo" statement
        ********************

        Intro paragraph.

        ======================================================================

           code_block()

        First part
        ==========

        Part body.

        Detail
        ------

        Detail body.
        """
    )
    sections = split_topic_sections(text)
    assert [title for title, _ in sections] == ['The "demo" statement', "First part", "Detail"]
    assert sections[0][1].strip("\n") == "Intro paragraph.\n\n\n   code_block()"
    assert sections[1][1].strip() == "Part body."
    assert sections[2][1].strip() == "Detail body."


def test_short_pydoc_sections_are_skipped_and_ids_keep_section_positions(monkeypatch):
    long_body = "This body is comfortably longer than eighty characters, so the section is kept as a record."
    topic = f"Title\n*****\n\n{long_body}\n\nTiny\n====\n\nToo short.\n\nLast\n====\n\n{long_body}\n"
    monkeypatch.setattr(pydoc_data.topics, "topics", {"demo": topic})
    records = [r for r in build_python_docs_corpus(modules=[]) if r["id"].startswith("pydoc:")]
    assert [r["id"] for r in records] == ["pydoc:demo:0", "pydoc:demo:2"]
    assert all(r["response"] == long_body for r in records)
    assert "Last" in records[1]["instruction"]


def test_cut_keeps_everything_that_fits():
    text = "First paragraph.\n  \nSecond paragraph."
    assert cut_paragraphs(text, 1000) == "First paragraph.\n\nSecond paragraph."


def test_cut_stops_at_a_paragraph_boundary():
    text = "a" * 50 + "\n\n" + "b" * 50
    assert cut_paragraphs(text, 101) == "a" * 50
    assert cut_paragraphs(text, 102) == text


def test_cut_falls_back_to_the_last_sentence_end():
    text = "One short sentence. Another sentence. A third one that runs on and on."
    assert cut_paragraphs(text, 40) == "One short sentence. Another sentence."
    # A sentence end sitting exactly at the limit still counts.
    assert cut_paragraphs(text, len("One short sentence.")) == "One short sentence."


def test_cut_falls_back_to_a_word_boundary_then_a_hard_cut():
    assert cut_paragraphs("alpha beta gamma delta", 12) == "alpha beta"
    assert cut_paragraphs("x" * 30, 10) == "x" * 10


def test_cut_keeps_code_block_indentation():
    text = "Example:\n\n   print('hi')\n\nDone."
    assert cut_paragraphs(text, 1000) == text
    assert cut_paragraphs(text, 25) == "Example:\n\n   print('hi')"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab .\n\t"), max_size=300),
    limit=st.integers(min_value=1, max_value=120),
)
def test_cut_never_exceeds_the_limit(text, limit):
    assert len(cut_paragraphs(text, limit)) <= limit

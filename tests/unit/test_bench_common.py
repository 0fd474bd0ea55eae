"""The benchmark harness's table and files (the benchmarks themselves run with ``make bench``)."""

from __future__ import annotations

import json

from benchmarks.common import Figure, markdown, table, write

FIGURES = [
    Figure("dag_parse", "(sdk + DagBag) / sdk", 1.36, "x", "<= 1.5x", True),
    Figure("gateway", "added p99, concurrency 16", 97.4, "ms", "<= 2 ms", False, "4000 calls per side"),
    Figure("drift", "baseline profile", 7.1, "s"),
]


def test_the_table_shows_each_figure_with_its_target_and_whether_it_is_met():
    lines = table(FIGURES).splitlines()
    assert lines[0].split() == ["benchmark", "figure", "value", "target", "met"]
    assert lines[2].startswith("dag_parse") and lines[2].endswith("yes")
    assert "97.4 ms" in lines[3] and lines[3].endswith("NO")
    assert lines[4].endswith("7.1 s")  # no target: nothing claimed


def test_results_are_written_as_json_and_markdown(tmp_path):
    about = write(FIGURES, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [f["name"] for f in data["figures"]] == [f.name for f in FIGURES]
    assert data["machine"]["cores"] >= 1 and data["git_sha"] == about["git_sha"]
    text = (tmp_path / "results.md").read_text()
    assert "| gateway | added p99, concurrency 16 | 97.4 ms | <= 2 ms | **no** |" in text
    assert "- gateway / added p99, concurrency 16: 4000 calls per side" in text
    assert markdown(FIGURES, about) == text

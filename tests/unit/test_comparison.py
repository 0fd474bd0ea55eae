from __future__ import annotations

import base64
import json
import math
import random
import re

import pytest

from llmops.comparison import (
    METRICS,
    SUMMARY_ONLY,
    Comparison,
    Interval,
    compare,
    direction,
    paired_difference,
    summarize,
)
from llmops.evaluation_report import comparison_table, markdown_summary, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(item_id: str, model: str, **metrics) -> dict:
    return {
        "item_id": item_id,
        "set": metrics.pop("set", "test"),
        "kind": "open",
        "model": model,
        "prompt": metrics.pop("prompt", f"question {item_id}"),
        "reference": f"reference {item_id}",
        "response": f"{model} answers {item_id}",
        **metrics,
    }


def test_metric_registry_and_direction():
    assert list(METRICS)[:3] == ["loss", "rouge_l", "bleu"]
    assert list(METRICS)[-1] == "tokens_per_s"
    assert len(METRICS) == 16
    assert direction("loss") is False
    assert direction("rouge_l") is True
    assert direction("response_tokens") is None
    assert direction("perplexity") is False and "latency_p95_s" in SUMMARY_ONLY
    with pytest.raises(ValueError, match="unknown metric 'rogue'"):
        direction("rogue")


def test_summarize_skips_none_and_derives_perplexity():
    rows = [
        row("a", "base", loss=2.0, rouge_l=0.5, judge_overall=None),
        row("b", "base", loss=1.0, rouge_l=None, judge_overall=None),
        row("c", "base", loss=None, rouge_l=0.25),  # judge_overall missing altogether
        row("a", "candidate", loss=9.0, rouge_l=1.0),
    ]
    summary = summarize(rows, "base")
    assert summary["items"] == 3
    assert summary["loss"] == pytest.approx(1.5)
    assert summary["rouge_l"] == pytest.approx(0.375)
    assert summary["perplexity"] == pytest.approx(math.exp(1.5))
    assert "judge_overall" not in summary
    assert "latency_s" not in summary and "latency_p95_s" not in summary


def test_summarize_latency_percentiles():
    rows = [row(str(i), "base", latency_s=value) for i, value in enumerate([1.0, 2.0, 3.0, 4.0, 10.0])]
    summary = summarize(rows, "base")
    assert summary["latency_s"] == pytest.approx(4.0)
    assert summary["latency_p50_s"] == pytest.approx(3.0)
    # Linear interpolation: position 0.95 * 4 = 3.8, between 4.0 and 10.0.
    assert summary["latency_p95_s"] == pytest.approx(4.0 + 0.8 * 6.0)
    assert "perplexity" not in summary


def test_summarize_unknown_model_lists_models_present():
    rows = [row("a", "base", rouge_l=0.1), row("a", "candidate", rouge_l=0.2)]
    with pytest.raises(ValueError, match=r"'champion'.*base, candidate"):
        summarize(rows, "champion")


def _paired_rows() -> list[dict]:
    rows = [
        row("i1", "candidate", rouge_l=0.9),
        row("i1", "base", rouge_l=0.5),
        row("i2", "candidate", rouge_l=0.4),
        row("i2", "base", rouge_l=0.6),
        row("i3", "candidate", rouge_l=0.8),
        row("i3", "base", rouge_l=0.3),
        row("i4", "candidate", rouge_l=0.7),
        row("i4", "base", rouge_l=None),  # no value on one side: not a pair
        row("i5", "candidate", rouge_l=0.1),  # no base row: not a pair
        row("i6", "candidate", rouge_l=0.6),
        row("i6", "base", rouge_l=0.45),
    ]
    random.Random(7).shuffle(rows)
    return rows


def test_paired_difference_pairs_by_item():
    rows = _paired_rows()
    interval = paired_difference(rows, "candidate", "base", "rouge_l", resamples=200, seed=3)
    assert interval is not None
    assert interval.n == 4
    assert interval.mean == pytest.approx(((0.9 - 0.5) + (0.4 - 0.6) + (0.8 - 0.3) + (0.6 - 0.45)) / 4)
    assert interval.low <= interval.mean <= interval.high
    assert interval.low < interval.high
    # Seeded: the same interval again, and whatever order the rows come in.
    assert paired_difference(rows, "candidate", "base", "rouge_l", resamples=200, seed=3) == interval
    assert paired_difference(list(reversed(rows)), "candidate", "base", "rouge_l", resamples=200, seed=3) == interval
    # And the direction flips with the arguments.
    flipped = paired_difference(rows, "base", "candidate", "rouge_l", resamples=200, seed=3)
    assert flipped.mean == pytest.approx(-interval.mean)


def _noisy_rows(n: int = 30) -> list[dict]:
    noise = random.Random(11)
    rows = [row(f"i{i:02d}", "candidate", rouge_l=noise.random()) for i in range(n)]
    return rows + [row(f"i{i:02d}", "base", rouge_l=noise.random()) for i in range(n)]


def test_paired_difference_is_determined_by_the_seed():
    rows = _noisy_rows()
    first = paired_difference(rows, "candidate", "base", "rouge_l", resamples=200, seed=1)
    assert paired_difference(rows, "candidate", "base", "rouge_l", resamples=200, seed=1) == first
    other = paired_difference(rows, "candidate", "base", "rouge_l", resamples=200, seed=2)
    assert other.mean == first.mean
    assert (other.low, other.high) != (first.low, first.high)


def test_paired_difference_resamples_items_in_sorted_order():
    # Set order of string ids changes with the ids (and PYTHONHASHSEED); the bootstrap must not follow it:
    # renaming the items without changing their sorted order leaves the interval as it was.
    rows = _noisy_rows()
    renamed = [{**r, "item_id": r["item_id"].replace("i", "question-")} for r in rows]
    first = paired_difference(rows, "candidate", "base", "rouge_l", resamples=200, seed=1)
    assert paired_difference(renamed, "candidate", "base", "rouge_l", resamples=200, seed=1) == first


def test_paired_difference_without_spread_is_a_point():
    rows = [row(f"i{i}", "candidate", bleu=10.0 + i) for i in range(4)]
    rows += [row(f"i{i}", "base", bleu=8.0 + i) for i in range(4)]
    assert paired_difference(rows, "candidate", "base", "bleu", resamples=200) == Interval(2.0, 2.0, 2.0, 4)
    single = [row("x", "candidate", chrf=30.0), row("x", "base", chrf=20.0)]
    assert paired_difference(single, "candidate", "base", "chrf") == Interval(10.0, 10.0, 10.0, 1)


def test_paired_difference_without_pairs_is_none():
    rows = [row("a", "candidate", judge_overall=7.0), row("a", "base", judge_overall=None), row("b", "base")]
    assert paired_difference(rows, "candidate", "base", "judge_overall") is None
    assert paired_difference(rows, "candidate", "champion", "judge_overall") is None


def test_paired_difference_rejects_duplicates_and_unknown_metrics():
    rows = [row("dup-7", "candidate", rouge_l=0.1), row("dup-7", "candidate", rouge_l=0.2), row("dup-7", "base")]
    with pytest.raises(ValueError, match="duplicate row for item 'dup-7'"):
        paired_difference(rows, "candidate", "base", "rouge_l")
    with pytest.raises(ValueError, match="no per-item metric 'perplexity'"):
        paired_difference(rows, "candidate", "base", "perplexity")


def _comparison_rows(with_champion: bool = True, judge: bool = True) -> list[dict]:
    """Candidate clearly better on ROUGE-L (+0.1 to +0.2 on every item), no real difference on BLEU."""
    models = ["base", "candidate"] + (["champion"] if with_champion else [])
    bleu_noise = [3.0, -2.0, 2.5, -3.5, 1.0, -1.5, 0.5, 0.0]
    rows = []
    for i in range(8):
        for model in models:
            better = model == "candidate"
            rows.append(
                row(
                    f"q{i}",
                    model,
                    set="test" if i < 5 else "catalog",
                    prompt="<script>alert(1)</script> What does zip() do?" if i == 2 else f"question {i}",
                    loss=2.0 - (0.3 if better else 0.0) + 0.01 * i,
                    rouge_l=0.3 + 0.02 * i + ((0.1 + 0.0125 * i) if better else 0.0),
                    bleu=20.0 + i + (bleu_noise[i] if better else 0.0),
                    judge_overall=(float(4 + i % 3 + (1 if better else 0)) if i != 2 else (3.0 if better else 8.0))
                    if judge
                    else None,
                    latency_s=0.5 + 0.1 * i,
                )
            )
    return rows


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    return compare(_comparison_rows(), resamples=200)


def test_compare_summarizes_and_diffs_every_model(comparison):
    assert list(comparison.models) == ["base", "candidate", "champion"]
    assert list(comparison.deltas) == ["base", "champion"]
    assert comparison.models["candidate"]["items"] == 8
    assert comparison.deltas["base"]["rouge_l"].low > 0
    assert comparison.deltas["base"]["bleu"].low < 0 < comparison.deltas["base"]["bleu"].high
    assert "exact_match" not in comparison.deltas["base"]  # no values: no difference
    assert list(comparison.by_set) == ["test", "catalog"]
    assert comparison.by_set["catalog"]["base"]["items"] == 3


def test_compare_leaves_out_an_absent_champion():
    result = compare(_comparison_rows(with_champion=False), resamples=200)
    assert list(result.models) == ["base", "candidate"]
    assert list(result.deltas) == ["base"]
    assert "champion" not in comparison_table(result)


def test_compare_needs_the_candidate():
    rows = [row("a", "base", rouge_l=0.1), row("a", "champion", rouge_l=0.2)]
    with pytest.raises(ValueError, match=r"candidate 'candidate'.*base, champion"):
        compare(rows, resamples=200)


def test_comparison_round_trips_through_json(comparison):
    restored = Comparison.from_dict(json.loads(json.dumps(comparison.to_dict())))
    assert restored == comparison
    assert isinstance(restored.deltas["base"]["rouge_l"], Interval)
    with pytest.raises(ValueError, match="missing deltas"):
        Comparison.from_dict({"candidate": "c", "models": {}, "by_set": {}})


def _line(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(label + " "))


def test_table_marks_only_differences_whose_interval_excludes_zero(comparison):
    table = comparison_table(comparison)
    assert _line(table, "ROUGE-L").count("*") == 2  # better than base and than the champion
    assert "*" not in _line(table, "BLEU")
    assert "*" not in _line(table, "Perplexity")  # summary-only: no paired difference
    header = table.splitlines()[0]
    assert header.split()[2:] == ["base", "candidate", "champion", "cand-base", "cand-champion"]
    rouge = comparison.deltas["base"]["rouge_l"]
    assert f"+{rouge.mean:.3f} [+{rouge.low:.3f}, +{rouge.high:.3f}] *" in _line(table, "ROUGE-L")
    assert "excludes 0" in table.splitlines()[-1]
    only = comparison_table(comparison, metrics=["bleu"])
    assert "ROUGE-L" not in only and "BLEU" in only
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        comparison_table(comparison, metrics=["nope"])


def test_a_single_pair_is_never_marked():
    rows = [row("x", "candidate", rouge_l=0.9), row("x", "base", rouge_l=0.1)]
    result = compare(rows, resamples=200)
    assert "*" not in _line(comparison_table(result), "ROUGE-L")


def test_markdown_summary_is_a_table_with_the_same_content(comparison):
    text = markdown_summary(comparison)
    lines = text.splitlines()
    assert lines[0].startswith("| Metric |") and "cand-champion" in lines[0]
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    rouge = next(line for line in lines if line.startswith("| ROUGE-L |"))
    assert rouge.count("**") == 4 and rouge.count("\\*") == 2
    bleu = next(line for line in lines if line.startswith("| BLEU |"))
    assert "*" not in bleu
    assert not lines[-1].startswith("*")  # would render as a bullet


@pytest.fixture(scope="module")
def report(tmp_path_factory, comparison):
    out = tmp_path_factory.mktemp("report")
    path = write_report(
        comparison,
        _comparison_rows(),
        out,
        title="v3 <vs> base",
        judge_label="Judge-LLM <7B> & friends",
        details={"dataset": "docs@abc123", "MLflow run": "https://mlflow.example/runs/1", "evil": "javascript:x()"},
        gate_lines=["PASS rouge_l >= base", "FAIL latency <b>"],
        examples=2,
    )
    return out, path, path.read_text(encoding="utf-8")


def test_report_is_self_contained(report):
    out, path, text = report
    assert path == out / "report.html"
    assert 'src="plots/' not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 4
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert all(base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC for src in sources)
    assert "<script" not in text
    assert "<link" not in text
    assert json.loads((out / "comparison.json").read_text())["candidate"] == "candidate"


def test_report_escapes_user_text_and_shows_the_judge(report):
    _, _, text = report
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # item q2, the largest judge drop, is an example
    assert "Judge-LLM &lt;7B&gt; &amp; friends" in text
    assert "<title>v3 &lt;vs&gt; base</title>" in text
    assert "FAIL latency &lt;b&gt;" in text
    assert '<a href="https://mlflow.example/runs/1"' in text
    assert 'href="javascript' not in text
    assert "docs@abc123" in text


def test_report_writes_png_plots(report):
    out, _, _ = report
    names = {"metrics.png", "differences.png", "judge_scores.png", "latency.png"}
    assert {path.name for path in (out / "plots").iterdir()} == names
    for name in names:
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_report_skips_judge_plot_without_judge_scores(tmp_path):
    rows = _comparison_rows(with_champion=False, judge=False)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "judge_scores.png").write_bytes(PNG_MAGIC)  # left by an earlier report here
    path = write_report(compare(rows, resamples=200), rows, tmp_path, title="t", judge_label="none")
    assert not (tmp_path / "plots" / "judge_scores.png").exists()
    assert (tmp_path / "plots" / "latency.png").read_bytes()[:8] == PNG_MAGIC
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 3
    assert "Judge:</strong> none" in text
    assert "Judge overall" not in comparison_table(compare(rows, resamples=200))

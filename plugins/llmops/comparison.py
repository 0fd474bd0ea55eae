"""Model comparison: per-item evaluation rows of several models -> summaries and paired differences.

The evaluation step scores every (item, model) pair and hands over one row per pair. This module turns those
rows into what a reviewer and the promotion gate need: a per-model summary and the candidate-minus-reference
difference of every metric with a bootstrap confidence interval (paired by item, so item difficulty cancels
out). ``llmops.evaluation_report`` renders a ``Comparison`` as tables and an HTML report.

Decision logic: it imports no Airflow, and SciPy only inside the bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Column order in tables and plots; labels outside this list follow in order of first appearance.
MODEL_ORDER = ("base", "candidate", "champion")
SET_ORDER = ("test", "catalog")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    higher_is_better: bool | None  # None: neutral (e.g. response length), neither better nor worse
    fmt: str = ".3f"


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {spec.name: spec for spec in specs}


METRICS: dict[str, MetricSpec] = _specs(
    MetricSpec("loss", "Held-out loss", False),
    MetricSpec("rouge_l", "ROUGE-L", True),
    MetricSpec("bleu", "BLEU", True, ".1f"),
    MetricSpec("chrf", "chrF", True, ".1f"),
    MetricSpec("semantic_similarity", "Semantic similarity", True),
    MetricSpec("exact_match", "Exact match", True),
    MetricSpec("judge_overall", "Judge overall", True, ".2f"),
    MetricSpec("judge_helpfulness", "Judge helpfulness", True, ".2f"),
    MetricSpec("judge_relevance", "Judge relevance", True, ".2f"),
    MetricSpec("judge_accuracy", "Judge accuracy", True, ".2f"),
    MetricSpec("judge_detail", "Judge detail", True, ".2f"),
    MetricSpec("response_tokens", "Response tokens", None, ".1f"),
    MetricSpec("repetition", "Repetition", False),
    MetricSpec("refusal", "Refusal rate", False),
    MetricSpec("latency_s", "Latency (s)", False, ".3f"),
    MetricSpec("tokens_per_s", "Tokens/s", True, ".1f"),
)

# Derived from the per-item values at summary level; they have no per-item value, hence no paired difference.
SUMMARY_ONLY: dict[str, MetricSpec] = _specs(
    MetricSpec("perplexity", "Perplexity", False, ".2f"),
    MetricSpec("latency_p50_s", "Latency p50 (s)", False, ".3f"),
    MetricSpec("latency_p95_s", "Latency p95 (s)", False, ".3f"),
)


def metric_spec(metric: str) -> MetricSpec:
    spec = METRICS.get(metric) or SUMMARY_ONLY.get(metric)
    if spec is None:
        known = ", ".join([*METRICS, *SUMMARY_ONLY])
        raise ValueError(f"unknown metric {metric!r} (known: {known})")
    return spec


def direction(metric: str) -> bool | None:
    """True when higher is better, False when lower is better, None when the metric is neutral."""
    return metric_spec(metric).higher_is_better


@dataclass(frozen=True)
class Interval:
    """A mean paired difference with its confidence interval over ``n`` paired items."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> Interval:
        try:
            return cls(mean=float(d["mean"]), low=float(d["low"]), high=float(d["high"]), n=int(d["n"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an interval (needs mean, low, high, n): {d!r}") from exc


def significant(interval: Interval | None) -> bool:
    # One paired item gives a point, not an interval: never call that a difference.
    return interval is not None and interval.n >= 2 and interval.excludes_zero


# --- rows ---------------------------------------------------------------------------------------------------------


def metric_value(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    if value is None:
        return None
    value = float(value)
    # A NaN would silently poison every mean it enters; the scorers use it for "could not score" too.
    return None if math.isnan(value) else value


def model_of(row: dict, index: int) -> str:
    if "model" not in row or "item_id" not in row:
        raise ValueError(f"row {index} needs 'item_id' and 'model' (has: {', '.join(sorted(row)) or 'nothing'})")
    return str(row["model"])


def ordered(labels: Iterable[str], order: tuple[str, ...]) -> list[str]:
    labels = list(dict.fromkeys(labels))
    return [label for label in order if label in labels] + [label for label in labels if label not in order]


def _models_in(rows: list[dict]) -> list[str]:
    return ordered((model_of(row, i) for i, row in enumerate(rows)), MODEL_ORDER)


def rows_by_item(rows: list[dict], model: str) -> dict[str, dict]:
    by_item: dict[str, dict] = {}
    for i, row in enumerate(rows):
        if model_of(row, i) != model:
            continue
        item_id = str(row["item_id"])
        if item_id in by_item:
            raise ValueError(f"duplicate row for item {item_id!r} and model {model!r}: one row per (item, model)")
        by_item[item_id] = row
    return by_item


def summarize(rows: list[dict], model: str) -> dict[str, float]:
    """Mean of every metric over the model's rows that have a value, plus the derived summary metrics."""
    own = [row for i, row in enumerate(rows) if model_of(row, i) == model]
    if not own:
        raise ValueError(f"no rows for model {model!r} (models present: {', '.join(_models_in(rows)) or 'none'})")
    summary: dict[str, float] = {"items": len(own)}
    values: dict[str, list[float]] = {}
    for metric in METRICS:
        present = [v for v in (metric_value(row, metric) for row in own) if v is not None]
        if present:
            values[metric] = present
            summary[metric] = float(np.mean(present))
    if "loss" in summary:
        # exp of the mean per-item loss: the usual corpus-level perplexity when items weigh the same.
        summary["perplexity"] = math.exp(summary["loss"]) if summary["loss"] < 700 else math.inf
    if "latency_s" in values:
        summary["latency_p50_s"] = float(np.percentile(values["latency_s"], 50))
        summary["latency_p95_s"] = float(np.percentile(values["latency_s"], 95))
    return summary


def paired_difference(
    rows: list[dict],
    a: str,
    b: str,
    metric: str,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval | None:
    """Mean of ``a - b`` over the items both models have a value for, with a percentile bootstrap CI.

    Pairing by item removes the item-to-item spread that dominates unpaired comparisons of small test sets.
    """
    if metric not in METRICS:
        raise ValueError(f"no per-item metric {metric!r} to pair (per-item metrics: {', '.join(METRICS)})")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    rows_a, rows_b = rows_by_item(rows, a), rows_by_item(rows, b)
    diffs = []
    # Sorted by item so that the seeded bootstrap gives the same interval whatever order the rows came in.
    for item_id in sorted(rows_a.keys() & rows_b.keys()):
        value_a, value_b = metric_value(rows_a[item_id], metric), metric_value(rows_b[item_id], metric)
        if value_a is not None and value_b is not None:
            diffs.append(value_a - value_b)
    if not diffs:
        return None
    data = np.asarray(diffs, dtype=float)
    mean = float(data.mean())
    if len(data) == 1 or np.ptp(data) == 0:
        # Nothing to resample: every resample has the same mean, so skip the work.
        return Interval(mean=mean, low=mean, high=mean, n=len(data))
    from scipy import stats  # heavy; DAG files import this module through the settings

    result = stats.bootstrap(
        (data,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(mean=mean, low=float(ci.low), high=float(ci.high), n=len(data))


# --- comparison ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    candidate: str
    models: dict[str, dict[str, float]]  # label -> summarize()
    deltas: dict[str, dict[str, Interval]]  # reference label -> metric -> candidate-minus-reference
    by_set: dict[str, dict[str, dict[str, float]]]  # set name -> label -> summarize() over that set's rows
    confidence: float = 0.95  # of the intervals in deltas, for legends

    @property
    def references(self) -> list[str]:
        return list(self.deltas)

    def to_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "confidence": self.confidence,
            "models": {label: dict(summary) for label, summary in self.models.items()},
            "deltas": {
                ref: {metric: interval.to_dict() for metric, interval in per_metric.items()}
                for ref, per_metric in self.deltas.items()
            },
            "by_set": {
                name: {label: dict(summary) for label, summary in per_model.items()}
                for name, per_model in self.by_set.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> Comparison:
        missing = [key for key in ("candidate", "models", "deltas", "by_set") if key not in d]
        if missing:
            raise ValueError(f"not a comparison: missing {', '.join(missing)}")
        return cls(
            candidate=d["candidate"],
            models={label: dict(summary) for label, summary in d["models"].items()},
            deltas={
                ref: {metric: Interval.from_dict(interval) for metric, interval in per_metric.items()}
                for ref, per_metric in d["deltas"].items()
            },
            by_set={
                name: {label: dict(summary) for label, summary in per_model.items()}
                for name, per_model in d["by_set"].items()
            },
            confidence=float(d.get("confidence", 0.95)),
        )


def compare(
    rows: list[dict],
    candidate: str = "candidate",
    references: tuple[str, ...] = ("base", "champion"),
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Summaries of the candidate and every reference present, and candidate-minus-reference differences."""
    present = _models_in(rows)
    if candidate not in present:
        raise ValueError(f"no rows for candidate {candidate!r} (models present: {', '.join(present) or 'none'})")
    # A reference without rows is normal (the first model has no champion to beat): leave it out, don't fail.
    refs = [ref for ref in dict.fromkeys(references) if ref in present and ref != candidate]
    labels = ordered([candidate, *refs], MODEL_ORDER)
    models = {label: summarize(rows, label) for label in labels}
    deltas: dict[str, dict[str, Interval]] = {}
    for ref in refs:
        per_metric = {}
        for metric in METRICS:
            interval = paired_difference(rows, candidate, ref, metric, resamples, confidence, seed)
            if interval is not None:
                per_metric[metric] = interval
        deltas[ref] = per_metric
    sets = ordered((str(row.get("set", "unspecified")) for row in rows), SET_ORDER)
    by_set = {}
    for name in sets:
        subset = [row for row in rows if str(row.get("set", "unspecified")) == name]
        in_set = set(_models_in(subset))
        by_set[name] = {label: summarize(subset, label) for label in labels if label in in_set}
    return Comparison(candidate=candidate, models=models, deltas=deltas, by_set=by_set, confidence=confidence)

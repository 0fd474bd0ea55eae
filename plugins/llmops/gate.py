"""The promotion gate: a typed ``GatePolicy`` and the pure ``decide_promotion``.

``decide_promotion(comparison, policy)`` looks only at an evaluation's ``Comparison`` (per-model
means and candidate-minus-reference paired differences with confidence intervals) and returns a
``Decision`` carrying every check it made and the reasons for its verdict. It knows nothing of
Airflow, MLflow or where the models ran; ``llm_finetune`` branches on its result.

Checks, in order:

* ``minimum`` / ``maximum``: absolute floors and ceilings on the candidate's means;
* ``max_latency_p95_s``: a ceiling on the candidate's 95th-percentile latency;
* ``improve_on_base``: metrics where the candidate must beat the base model with the whole
  confidence interval on the better side of zero (fine-tuning has to have helped);
* ``non_regression``: metrics where the candidate may be worse than the serving champion by at
  most the given margin (in the metric's units, on the mean paired difference). Without a
  champion these checks are recorded as skipped.

A metric the policy names but the evaluation did not measure fails its check: the gate never
passes a model on missing evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmops.comparison import METRICS, Comparison, Interval, direction


class GatePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    minimum: dict[str, float] = Field(default_factory=dict)
    maximum: dict[str, float] = Field(default_factory=dict)
    max_latency_p95_s: float | None = Field(None, gt=0)
    improve_on_base: list[str] = Field(default_factory=list)
    non_regression: dict[str, float] = Field(default_factory=dict)

    @field_validator("minimum", "maximum", "non_regression")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        for metric in value:
            direction(metric)
        return value

    @field_validator("non_regression")
    @classmethod
    def _margins_are_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = sorted(k for k, v in value.items() if v < 0)
        if negative:
            raise ValueError(f"margins must be >= 0 (a margin is how much worse is tolerated): {negative}")
        return value

    @field_validator("improve_on_base", "non_regression")
    @classmethod
    def _paired_metrics(cls, value):
        # Paired differences exist only for per-item metrics, and "worse" needs a direction.
        for metric in value:
            direction(metric)
            if metric not in METRICS:
                raise ValueError(f"{metric!r} is a summary, not a per-item metric: it has no paired difference")
            if METRICS[metric].higher_is_better is None:
                raise ValueError(f"{metric!r} has no better direction; it cannot be compared as better or worse")
        return value


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    skipped: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        """Why: the failed checks when the gate fails, every check that ran when it passes."""
        if not self.promote:
            return [c.detail for c in self.checks if not c.passed]
        return [c.detail for c in self.checks if not c.skipped]

    @property
    def verdict(self) -> str:
        return "pass" if self.promote else "fail"

    def to_dict(self) -> dict:
        return {
            "promote": self.promote,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "checks": [c.to_dict() for c in self.checks],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Decision:
        return cls(data["promote"], tuple(Check(**c) for c in data["checks"]))

    def tags(self) -> dict[str, str]:
        """Model-version tags that record the verdict and its reasons."""
        failed = [c for c in self.checks if not c.passed]
        return {
            "gate.decision": self.verdict,
            "gate.reasons": "; ".join(self.reasons)[:4900] or "no checks configured",
            "gate.checks_passed": str(sum(c.passed and not c.skipped for c in self.checks)),
            "gate.checks_failed": str(len(failed)),
            "gate.checks_skipped": str(sum(c.skipped for c in self.checks)),
        }


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _interval(iv: Interval) -> str:
    return f"{iv.mean:+.4g} [{iv.low:+.4g}, {iv.high:+.4g}]"


def decide_promotion(comparison: Comparison, policy: GatePolicy) -> Decision:
    candidate = comparison.models.get(comparison.candidate, {})
    checks: list[Check] = []

    for metric, floor in policy.minimum.items():
        value = candidate.get(metric)
        if value is None:
            checks.append(Check(f"minimum:{metric}", False, f"{metric} was not measured (minimum {_fmt(floor)})"))
        else:
            ok = value >= floor
            checks.append(
                Check(f"minimum:{metric}", ok, f"{metric} {_fmt(value)} {'>=' if ok else '<'} minimum {_fmt(floor)}")
            )
    for metric, ceiling in policy.maximum.items():
        value = candidate.get(metric)
        if value is None:
            checks.append(Check(f"maximum:{metric}", False, f"{metric} was not measured (maximum {_fmt(ceiling)})"))
        else:
            ok = value <= ceiling
            checks.append(
                Check(f"maximum:{metric}", ok, f"{metric} {_fmt(value)} {'<=' if ok else '>'} maximum {_fmt(ceiling)}")
            )
    if policy.max_latency_p95_s is not None:
        value = candidate.get("latency_p95_s")
        name, ceiling = "latency_p95_s", policy.max_latency_p95_s
        if value is None:
            checks.append(Check(name, False, f"latency was not measured (ceiling {_fmt(ceiling)} s)"))
        else:
            ok = value <= ceiling
            checks.append(
                Check(name, ok, f"p95 latency {_fmt(value)} s {'<=' if ok else '>'} ceiling {_fmt(ceiling)} s")
            )

    vs_base = comparison.deltas.get("base", {})
    for metric in policy.improve_on_base:
        name, delta = f"improve_on_base:{metric}", vs_base.get(metric)
        if delta is None:
            checks.append(Check(name, False, f"{metric} was not compared with the base model"))
            continue
        better = delta.low > 0 if direction(metric) else delta.high < 0
        word = "better" if better else "not clearly better"
        checks.append(Check(name, better, f"{metric} vs base {_interval(delta)}: {word} than the base model"))

    vs_champion = comparison.deltas.get("champion")
    for metric, margin in policy.non_regression.items():
        name = f"non_regression:{metric}"
        if vs_champion is None:
            checks.append(Check(name, True, f"{metric}: no champion to compare with", skipped=True))
            continue
        delta = vs_champion.get(metric)
        if delta is None:
            checks.append(Check(name, False, f"{metric} was not compared with the champion"))
            continue
        # How much worse than the champion, in the metric's units (negative: better).
        worse_by = -delta.mean if direction(metric) else delta.mean
        ok = worse_by <= margin
        verdict = "within" if ok else "beyond"
        checks.append(
            Check(
                name, ok, f"{metric} vs champion {_interval(delta)}: {verdict} the allowed regression of {_fmt(margin)}"
            )
        )
    return Decision(all(c.passed for c in checks), tuple(checks))

"""Drift of served traffic against a model's training data: a typed ``DriftPolicy``, the
``BaselineProfile`` computed when a version is registered, and pure functions of what was seen.

A window of captured traffic is compared with the champion's baseline on:

- **embedding**: prompt embeddings (the MiniLM sentence encoder), maximum mean discrepancy with
  an RBF kernel and a permutation p-value (``scipy.stats.permutation_test``); the verdict needs
  both significance and an effect size, so a large window cannot alarm on a trivial difference;
- **prompt_length** / **response_length**: population stability index over the baseline's
  deciles (character counts) as the effect size, and the two-sample Kolmogorov-Smirnov test
  (SciPy) for significance: a small window's PSI alone is noise;
- **oov**: the share of prompt words outside the training vocabulary, above what held-out
  training prompts show;
- **script**: the shift of letters between writing systems (Latin, Cyrillic, CJK...), as the
  total variation distance between the two distributions; another language in the same script
  shows in ``oov`` and ``embedding`` instead;
- **refusal**, **repetition**: rates of the answers; **error_rate**, **latency**: of the calls.

Too few records is an explicit ``no_verdict``, never an alarm. Only breached checks listed in
``retrain_on`` make a ``drift`` verdict (retraining cannot fix latency); the others make an
``alert``. A drift verdict asks for retraining unless one was asked for within the cooldown.

The text features (words, writing systems) are in ``llmops.drift.text``. Nothing here knows
Airflow, MLflow, the gateway or S3. Every figure depends only on the baseline, the records and
the seed, so re-analysing a window gives the same report.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmops.drift.text import oov_rate, script_counts, shares, total_variation, words
from training.metrics import is_refusal, repetition_rate

PROFILE_FORMAT = 1
CheckName = Literal[
    "embedding",
    "prompt_length",
    "response_length",
    "oov",
    "script",
    "refusal",
    "repetition",
    "error_rate",
    "latency",
]
CHECKS: tuple[str, ...] = CheckName.__args__  # type: ignore[attr-defined]
Embed = Callable[[list[str]], np.ndarray]

DRIFT, ALERT, OK, NO_VERDICT = "drift", "alert", "ok", "no_verdict"
BREACH = "breach"


class DriftPolicy(BaseModel):
    """What counts as drift, and how often it may ask for retraining."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_records: int = Field(50, ge=2, description="calls with a prompt a window needs for any verdict")
    max_embedded: int = Field(400, ge=10, le=4000, description="window prompts embedded (a seeded sample)")
    permutations: int = Field(500, ge=99, le=20_000, description="permutations of the MMD test")
    alpha: float = Field(
        0.01, gt=0, lt=1, description="significance level of the embedding (MMD) and length (KS) tests"
    )
    min_embedding_mmd: float = Field(
        0.1, ge=0, description="effect size: unbiased MMD the window must also reach; 0 disables"
    )
    max_prompt_length_psi: float = Field(
        0.25, gt=0, description="PSI of prompt lengths (0.25: a major shift), with a KS p-value below alpha"
    )
    max_response_length_psi: float | None = Field(
        None, gt=0, description="PSI of answer lengths against the training answers; None: reported only"
    )
    max_oov_increase: float = Field(0.10, gt=0, le=1, description="OOV rate above the held-out baseline's")
    max_script_shift: float = Field(0.10, gt=0, le=1, description="total variation between script distributions")
    max_refusal_rate: float = Field(0.2, ge=0, le=1)
    max_repetition_rate: float = Field(0.3, ge=0, le=1, description="mean repeated-trigram share of the answers")
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_p95_latency_ms: float = Field(30_000, gt=0)
    retrain_on: list[CheckName] = Field(
        default_factory=lambda: ["embedding", "prompt_length", "oov", "script"],
        description="checks whose breach is drift (retrain); the others only alert",
    )
    cooldown_hours: float = Field(24, ge=0, description="after a retraining was asked for, none again for this long")

    @model_validator(mode="after")
    def _response_check_is_configured(self) -> DriftPolicy:
        if "response_length" in self.retrain_on and self.max_response_length_psi is None:
            raise ValueError("retrain_on names response_length, but max_response_length_psi is not set")
        if len(set(self.retrain_on)) != len(self.retrain_on):
            raise ValueError(f"retrain_on lists a check twice: {self.retrain_on}")
        return self


# -- two-sample statistics ------------------------------------------------------------------------


def length_bins(lengths: Sequence[float], bins: int = 10) -> list[float]:
    """Inner bin edges at the baseline's quantiles (duplicates merged): ``bins`` bins at most."""
    edges = np.quantile(np.asarray(lengths, dtype=float), np.linspace(0, 1, bins + 1)[1:-1])
    return sorted(set(float(e) for e in edges))


def binned(lengths: Sequence[float], edges: Sequence[float], pseudo_count: float = 0.0) -> list[float]:
    """Share of ``lengths`` in each bin: (-inf, e0], (e0, e1], ..., (e_last, inf); a
    ``pseudo_count`` added to every bin keeps a small sample's empty bins from dominating PSI."""
    where = np.searchsorted(edges, np.asarray(lengths, dtype=float), side="left")
    counts = np.bincount(where, minlength=len(edges) + 1) + pseudo_count
    return (counts / max(1e-12, counts.sum())).tolist()


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = 1e-4) -> float:
    """Population stability index of two binned distributions (empty bins floored)."""
    e = np.maximum(np.asarray(expected, dtype=float), floor)
    a = np.maximum(np.asarray(actual, dtype=float), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_test(baseline: Sequence[float], window: Sequence[float]) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(baseline, dtype=float), np.asarray(window, dtype=float))
    return float(result.statistic), float(result.pvalue)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """(MMD, p-value) of two samples of vectors, with an RBF kernel whose bandwidth is the median
    squared distance of the pooled sample. The p-value comes from a permutation test (SciPy) on
    the biased MMD²; the MMD returned is the square root of the unbiased MMD² (about 0 for two
    samples of one distribution, whatever their sizes), the effect size the policy bounds."""
    from scipy.stats import permutation_test

    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the MMD test needs at least 2 vectors on each side, got {len(x)} and {len(y)}")
    pooled = np.concatenate([x, y]).astype(np.float64)
    norms = (pooled**2).sum(1)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2 * pooled @ pooled.T, 0.0)
    upper = squared[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = np.exp(-squared / bandwidth)
    total, n, m = len(pooled), len(x), len(y)

    def statistic(ix, iy, axis=-1):
        single = np.ndim(ix) == 1  # the observed split; resamples come in 2-D batches (even of one row)
        ix, iy = np.atleast_2d(ix).astype(np.int64), np.atleast_2d(iy).astype(np.int64)
        weights = np.zeros((ix.shape[0], total))
        np.put_along_axis(weights, ix, 1.0 / ix.shape[1], axis=1)
        np.put_along_axis(weights, iy, -1.0 / iy.shape[1], axis=1)
        value = np.einsum("bi,ij,bj->b", weights, kernel, weights)  # biased MMD² = w K wᵀ
        return value[0] if single else value

    result = permutation_test(
        (np.arange(n, dtype=float), np.arange(n, total, dtype=float)),
        statistic,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        batch=64,
        rng=np.random.default_rng(seed),
    )
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    unbiased = (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )
    return math.sqrt(max(float(unbiased), 0.0)), float(result.pvalue)


# -- the baseline profile -----------------------------------------------------------------------


@dataclass
class LengthProfile:
    edges: list[float]
    shares: list[float]
    sample: list[int]  # the lengths themselves (for KS), at most ``max_sample``
    mean: float
    p50: float
    p95: float

    @classmethod
    def of(cls, lengths: Sequence[int], rng: np.random.Generator, max_sample: int = 5000) -> LengthProfile:
        values = np.asarray(lengths, dtype=float)
        edges = length_bins(values)
        sample = values if len(values) <= max_sample else rng.choice(values, max_sample, replace=False)
        return cls(
            edges=edges,
            shares=binned(values, edges),
            sample=[int(v) for v in sample],
            mean=float(values.mean()),
            p50=float(np.percentile(values, 50)),
            p95=float(np.percentile(values, 95)),
        )


@dataclass
class BaselineProfile:
    """What the drift checks compare a window with, from one version's training data."""

    dataset: str
    dataset_version: str
    encoder: str
    records: int
    prompt_length: LengthProfile
    response_length: LengthProfile
    vocabulary: list[str]
    holdout_oov_rate: float
    scripts: dict[str, float]
    refusal_rate: float
    repetition_rate: float
    embeddings: np.ndarray = field(repr=False)  # a seeded sample of prompt embeddings
    format: int = PROFILE_FORMAT

    def summary(self) -> dict:
        """Everything but the embeddings and the vocabulary, JSON-ready."""
        data = self.to_dict()
        data.pop("vocabulary")
        data["vocabulary_size"] = len(self.vocabulary)
        data["embedded_prompts"] = int(self.embeddings.shape[0])
        for key in ("prompt_length", "response_length"):
            data[key].pop("sample")
        return data

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("embeddings")
        return data

    @classmethod
    def from_dict(cls, data: dict, embeddings: np.ndarray) -> BaselineProfile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"baseline profile format {data.get('format')!r} is not {PROFILE_FORMAT}; rebuild it")
        values = dict(data)
        for key in ("prompt_length", "response_length"):
            values[key] = LengthProfile(**values[key])
        return cls(**values, embeddings=np.asarray(embeddings, dtype=np.float32))


def build_profile(
    train: Sequence[dict],
    holdout: Sequence[dict],
    embed: Embed,
    *,
    dataset: str,
    dataset_version: str,
    encoder: str,
    sample_size: int = 512,
    max_vocabulary: int = 50_000,
    seed: int = 0,
) -> BaselineProfile:
    """A profile of curated records (``prompt``, ``response``): ``holdout`` (records the
    vocabulary was not built from, e.g. the validation split) calibrates the OOV rate."""
    if len(train) < 2:
        raise ValueError(f"a baseline profile needs at least 2 training records; the train split has {len(train)}")
    prompts = [str(r["prompt"]) for r in train]
    responses = [str(r.get("response", "")) for r in train]
    rng = np.random.default_rng(seed)
    counts = Counter(w for text in (*prompts, *responses) for w in words(text))
    vocabulary = sorted(w for w, _ in counts.most_common(max_vocabulary))
    if holdout:
        held_oov = oov_rate([str(r["prompt"]) for r in holdout], set(vocabulary)) or 0.0
    else:  # no held-out split: hold out a tenth of the training prompts from a vocabulary of the rest
        cut = max(1, len(train) // 10)
        rest = Counter(w for r in train[cut:] for w in words(f"{r['prompt']} {r.get('response', '')}"))
        held_oov = oov_rate(prompts[:cut], set(rest)) or 0.0
    chosen = sorted(rng.choice(len(prompts), min(sample_size, len(prompts)), replace=False).tolist())
    embeddings = np.asarray(embed([prompts[i] for i in chosen]), dtype=np.float32)
    return BaselineProfile(
        dataset=dataset,
        dataset_version=dataset_version,
        encoder=encoder,
        records=len(train),
        prompt_length=LengthProfile.of([len(p) for p in prompts], rng),
        response_length=LengthProfile.of([len(r) for r in responses], rng),
        vocabulary=vocabulary,
        holdout_oov_rate=held_oov,
        scripts=shares(script_counts(prompts)),
        refusal_rate=float(np.mean([is_refusal(r) for r in responses])),
        repetition_rate=float(np.mean([repetition_rate(r) for r in responses])),
        embeddings=embeddings,
    )


# -- analysing a window -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficRecord:
    """One captured call: the user's prompt, the answer (None when the call failed)."""

    prompt: str
    response: str | None
    status: int
    latency_ms: float | None = None

    @property
    def answered(self) -> bool:
        return 200 <= self.status < 300 and self.response is not None


@dataclass
class CheckResult:
    name: str
    status: str  # ok | breach | no_verdict | info
    value: float | None
    threshold: float | None
    retrain: bool  # a breach of this check is drift
    summary: str
    figures: dict = field(default_factory=dict)


@dataclass
class DriftReport:
    verdict: str  # drift | alert | ok | no_verdict
    reasons: list[str]
    records: int
    answered: int
    checks: list[CheckResult]

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def metrics(self) -> dict[str, float]:
        """Flat figures for a tracking server: ``drift.<check>.<figure>``."""
        out = {"drift.records": float(self.records), "drift.answered": float(self.answered)}
        for check in self.checks:
            if check.value is not None:
                out[f"drift.{check.name}"] = float(check.value)
            for key, value in check.figures.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    out[f"drift.{check.name}.{key}"] = float(value)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def seed_for(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _check(name, value, threshold, breached, policy, summary, figures=None, info=False) -> CheckResult:
    status = "info" if info else (BREACH if breached else OK)
    return CheckResult(name, status, value, threshold, name in policy.retrain_on, summary, figures or {})


def _length_check(name: str, baseline: LengthProfile, lengths: list[int], limit, policy) -> CheckResult:
    value = psi(baseline.shares, binned(lengths, baseline.edges, pseudo_count=0.5))
    ks, p_value = ks_test(baseline.sample, lengths)
    figures = {
        "ks": ks,
        "ks_p_value": p_value,
        "mean": float(np.mean(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "baseline_mean": baseline.mean,
        "baseline_p95": baseline.p95,
    }
    what = "prompt" if name == "prompt_length" else "answer"
    summary = (
        f"{what} length PSI {value:.3f}"
        + (f" (limit {limit:g})" if limit is not None else " (reported only)")
        + f"; mean {figures['mean']:.0f} chars vs {baseline.mean:.0f} in training; KS {ks:.2f} (p={p_value:.2g})"
    )
    breached = limit is not None and value > limit and p_value < policy.alpha
    return _check(name, value, limit, breached, policy, summary, figures, limit is None)


def analyze(
    profile: BaselineProfile,
    records: Sequence[TrafficRecord],
    policy: DriftPolicy,
    embed: Embed,
    seed: int,
) -> DriftReport:
    """Every check of one window of traffic against ``profile``, and the window's verdict."""
    answered = [r for r in records if r.answered]
    prompts = [r.prompt for r in records if r.prompt]
    if len(prompts) < policy.min_records:
        reason = f"{len(records)} calls in the window"
        if len(prompts) < len(records):
            reason += f", {len(prompts)} with a prompt"
        reason += f"; a verdict needs at least {policy.min_records}"
        return DriftReport(NO_VERDICT, [reason], len(records), len(answered), [])
    checks = [_embedding_check(profile, prompts, policy, embed, seed)]
    checks += _length_checks(profile, prompts, answered, policy)
    checks += [_oov_check(profile, prompts, policy), _script_check(profile, prompts, policy)]
    checks += _answer_checks(answered, policy)
    checks += _call_checks(records, policy)
    return _verdict(checks, len(records), len(answered))


def _embedding_check(
    profile: BaselineProfile, prompts: list[str], policy: DriftPolicy, embed: Embed, seed: int
) -> CheckResult:
    """Embeddings of a seeded sample of the window's prompts against the baseline's sample."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(prompts), min(policy.max_embedded, len(prompts)), replace=False).tolist())
    window_vectors = np.asarray(embed([prompts[i] for i in chosen]), dtype=np.float32)
    mmd, p_value = mmd_test(profile.embeddings, window_vectors, policy.permutations, seed)
    breached = p_value < policy.alpha and mmd >= policy.min_embedding_mmd
    return _check(
        "embedding",
        mmd,
        policy.min_embedding_mmd,
        breached,
        policy,
        f"prompt embeddings: MMD {mmd:.3f} (limit {policy.min_embedding_mmd:g}), permutation p={p_value:.3g} "
        f"(alpha {policy.alpha:g}) over {len(chosen)} prompts",
        {
            "p_value": p_value,
            "embedded": len(chosen),
            "centroid_cosine": _centroid_cosine(profile, window_vectors),
            "least_like_training": _least_like(profile, window_vectors, [prompts[i] for i in chosen]),
        },
    )


def _length_checks(
    profile: BaselineProfile, prompts: list[str], answered: list[TrafficRecord], policy: DriftPolicy
) -> list[CheckResult]:
    checks = [
        _length_check(
            "prompt_length", profile.prompt_length, [len(p) for p in prompts], policy.max_prompt_length_psi, policy
        )
    ]
    if answered:
        checks.append(
            _length_check(
                "response_length",
                profile.response_length,
                [len(r.response or "") for r in answered],
                policy.max_response_length_psi,
                policy,
            )
        )
    return checks


def _oov_check(profile: BaselineProfile, prompts: list[str], policy: DriftPolicy) -> CheckResult:
    rate = oov_rate(prompts, set(profile.vocabulary)) or 0.0
    increase = rate - profile.holdout_oov_rate
    return _check(
        "oov",
        rate,
        profile.holdout_oov_rate + policy.max_oov_increase,
        increase > policy.max_oov_increase,
        policy,
        f"out-of-vocabulary words {rate:.1%} of prompt words (held-out training prompts: "
        f"{profile.holdout_oov_rate:.1%}; limit +{policy.max_oov_increase:.0%})",
        {"increase": increase, "baseline": profile.holdout_oov_rate},
    )


def _script_check(profile: BaselineProfile, prompts: list[str], policy: DriftPolicy) -> CheckResult:
    letters = script_counts(prompts)
    if sum(letters.values()) == 0:  # nothing to compare: digits, symbols, emoji only
        return CheckResult(
            "script",
            NO_VERDICT,
            None,
            policy.max_script_shift,
            "script" in policy.retrain_on,
            "no letters in the window's prompts: no writing system to compare",
        )
    window_scripts = shares(letters)
    shift = total_variation(profile.scripts, window_scripts)
    top = ", ".join(f"{k} {v:.0%}" for k, v in sorted(window_scripts.items(), key=lambda kv: -kv[1])[:3] if v > 0)
    return _check(
        "script",
        shift,
        policy.max_script_shift,
        shift > policy.max_script_shift,
        policy,
        f"writing systems moved by {shift:.2f} (total variation; limit {policy.max_script_shift:g}): "
        f"{top or 'no letters'}",
        {f"share_{k}": v for k, v in window_scripts.items()},
    )


def _answer_checks(answered: list[TrafficRecord], policy: DriftPolicy) -> list[CheckResult]:
    if not answered:
        return []
    refusal = float(np.mean([is_refusal(r.response or "") for r in answered]))
    repetition = float(np.mean([repetition_rate(r.response or "") for r in answered]))
    return [
        _check(
            "refusal",
            refusal,
            policy.max_refusal_rate,
            refusal > policy.max_refusal_rate,
            policy,
            f"refusals {refusal:.1%} of answers (limit {policy.max_refusal_rate:.0%})",
        ),
        _check(
            "repetition",
            repetition,
            policy.max_repetition_rate,
            repetition > policy.max_repetition_rate,
            policy,
            f"repeated trigrams {repetition:.1%} of answers' trigrams (limit {policy.max_repetition_rate:.0%})",
        ),
    ]


def _call_checks(records: Sequence[TrafficRecord], policy: DriftPolicy) -> list[CheckResult]:
    errors = sum(1 for r in records if not (200 <= r.status < 300))
    error_rate = errors / len(records)
    checks = [
        _check(
            "error_rate",
            error_rate,
            policy.max_error_rate,
            error_rate > policy.max_error_rate,
            policy,
            f"{errors} of {len(records)} calls failed ({error_rate:.1%}; limit {policy.max_error_rate:.0%})",
        )
    ]
    latencies = [r.latency_ms for r in records if r.latency_ms is not None]
    if latencies:
        p95 = float(np.percentile(latencies, 95))
        checks.append(
            _check(
                "latency",
                p95,
                policy.max_p95_latency_ms,
                p95 > policy.max_p95_latency_ms,
                policy,
                f"p95 latency {p95:.0f} ms (limit {policy.max_p95_latency_ms:g} ms)",
                {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99))},
            )
        )
    return checks


def _least_like(profile: BaselineProfile, vectors: np.ndarray, prompts: list[str], count: int = 5) -> list[dict]:
    """The window's prompts farthest from every embedded training prompt (cosine similarity to
    the nearest), cut to 160 characters: what a person reads first to see what moved."""
    nearest = (vectors @ profile.embeddings.T).max(axis=1)
    order = np.argsort(nearest, kind="stable")[:count]
    return [{"prompt": prompts[i][:160], "nearest_similarity": round(float(nearest[i]), 3)} for i in order]


def _centroid_cosine(profile: BaselineProfile, vectors: np.ndarray) -> float:
    a, b = profile.embeddings.mean(0), vectors.mean(0)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _verdict(checks: list[CheckResult], records: int, answered: int) -> DriftReport:
    drifted = [c for c in checks if c.status == BREACH and c.retrain]
    alerts = [c for c in checks if c.status == BREACH and not c.retrain]
    if drifted:
        return DriftReport(DRIFT, [c.summary for c in drifted + alerts], records, answered, checks)
    if alerts:
        return DriftReport(ALERT, [c.summary for c in alerts], records, answered, checks)
    return DriftReport(OK, ["every check within its limit"], records, answered, checks)


# -- asking for retraining ----------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainDecision:
    trigger: bool
    reason: str


def decide_retraining(
    report: DriftReport,
    policy: DriftPolicy,
    now: datetime,
    last_requested: datetime | None,
    subject: str,
) -> RetrainDecision:
    """Retrain on a drift verdict, unless retraining was asked for (for any window: re-analysing
    an old window must not ask again) less than the cooldown before ``now``. ``subject`` (model,
    version, window) opens the reason."""
    if report.verdict != DRIFT:
        return RetrainDecision(False, f"{subject}: verdict {report.verdict}; {'; '.join(report.reasons)}")
    if last_requested is not None and now - last_requested < timedelta(hours=policy.cooldown_hours):
        allowed = last_requested + timedelta(hours=policy.cooldown_hours)
        return RetrainDecision(
            False,
            f"{subject}: drift, but retraining was already asked for at {last_requested.isoformat()}; "
            f"cooldown of {policy.cooldown_hours:g} h lasts until {allowed.isoformat()}",
        )
    return RetrainDecision(True, f"drift on {subject}: {'; '.join(report.reasons)}")

"""Drift statistics and verdicts (``llmops.drift.statistics``) without a sentence encoder: a hashing
bag-of-words embedding puts different vocabularies in different regions of a 64-d sphere, and a
small synthetic "training set" of Python questions is the baseline every window is compared with."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from devtools import traffic
from llmops.drift import statistics as drift
from llmops.drift.statistics import (
    BaselineProfile,
    CheckResult,
    DriftPolicy,
    DriftReport,
    TrafficRecord,
    analyze,
    binned,
    build_profile,
    decide_retraining,
    ks_test,
    length_bins,
    mmd_test,
    psi,
    seed_for,
)
from llmops.drift.text import SCRIPT_NAMES, oov_rate, script_counts, shares, total_variation, words

DIM = 64


def embed(texts: list[str]) -> np.ndarray:
    """Signed feature hashing of the words, L2-normalised (a text without words is the zero vector)."""
    out = np.zeros((len(texts), DIM))
    for row, text in enumerate(texts):
        for word in words(text):
            h = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "big")
            out[row, h % DIM] += 1.0 if (h >> 16) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1.0, norms)


def no_embed(texts: list[str]) -> np.ndarray:
    raise AssertionError("the encoder must not run for this window")


TOPICS = [
    "list comprehensions",
    "decorators",
    "generators",
    "context managers",
    "dictionaries",
    "exceptions",
    "classes and inheritance",
    "type hints",
    "virtual environments",
    "string formatting",
    "file handling",
    "unit testing with pytest",
    "async functions",
    "lambda functions",
    "sets and tuples",
    "the logging module",
    "regular expressions",
    "dataclasses",
    "iterators",
    "modules and packages",
]
PHRASES = [
    "Explain {t} in Python, case {i}.",
    "How do I use {t} in Python? Example {i}.",
    "What are common mistakes with {t} in Python (question {i})?",
    "Show me a short example of {t} in Python, number {i}.",
    "When should I prefer {t} in Python code? Case {i}.",
]
ANSWERS = [
    "In Python, {t} let you write clearer code; here is an example you can adapt.",
    "Use {t} when the code stays readable; the standard library documents {t} well.",
    "A common pattern with {t} is shown below, with a short explanation of each step.",
]
REFUSAL = "I'm sorry, but I can't help with that."


def corpus(n: int = 360, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        out.append(
            {"prompt": rng.choice(PHRASES).format(t=topic, i=i), "response": rng.choice(ANSWERS).format(t=topic)}
        )
    return out


DATA = corpus()
TRAIN, HELD = DATA[:240], DATA[240:]
POLICY = DriftPolicy(min_records=30, permutations=199)


@pytest.fixture(scope="module")
def profile() -> BaselineProfile:
    return build_profile(
        TRAIN, HELD, embed, dataset="python-qa", dataset_version="v" * 40, encoder="hashing-64", sample_size=200
    )


def window(count: int = 60, seed: int = 0, latency_ms: float | None = 120.0) -> list[TrafficRecord]:
    """In-distribution traffic: held-out prompts and answers the training set would have."""
    chosen = random.Random(seed).sample(HELD, count)
    return [TrafficRecord(r["prompt"], r["response"], 200, latency_ms) for r in chosen]


def calls(prompts: list[str], response: str = "In Python, generators let you write clearer code.") -> list:
    return [TrafficRecord(p, response, 200, 100.0) for p in prompts]


def breached(report: DriftReport) -> set[str]:
    return {c.name for c in report.checks if c.status == drift.BREACH}


# -- the policy ---------------------------------------------------------------------------------


def test_default_policy_is_valid_and_only_data_checks_retrain():
    policy = DriftPolicy()
    assert policy.retrain_on == ["embedding", "prompt_length", "oov", "script"]
    assert "error_rate" not in policy.retrain_on and "latency" not in policy.retrain_on
    assert policy.max_response_length_psi is None
    assert policy.cooldown_hours == 24
    assert DriftPolicy(**policy.model_dump()) == policy


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"min_records": 1}, "min_records"),
        ({"permutations": 10}, "permutations"),
        ({"max_embedded": 5}, "max_embedded"),
        ({"max_oov_increase": 0}, "max_oov_increase"),
        ({"max_script_shift": 1.5}, "max_script_shift"),
        ({"max_refusal_rate": -0.1}, "max_refusal_rate"),
        ({"cooldown_hours": -1}, "cooldown_hours"),
        ({"max_response_length_psi": 0}, "max_response_length_psi"),
        ({"retrain_on": ["embeding"]}, "retrain_on"),
        ({"retrain_on": ["response_length"]}, "max_response_length_psi"),
        ({"retrain_on": ["oov", "script", "oov"]}, "retrain_on lists a check twice"),
        ({"max_drift": 0.3}, "max_drift"),  # extra keys are forbidden
    ],
)
def test_policy_rejects_bad_values_naming_the_field(values, field):
    with pytest.raises(ValidationError, match=re.escape(field)):
        DriftPolicy(**values)


def test_policy_accepts_response_length_once_its_limit_is_set_and_is_frozen():
    policy = DriftPolicy(retrain_on=["response_length"], max_response_length_psi=0.3)
    assert policy.retrain_on == ["response_length"]
    with pytest.raises(ValidationError):
        policy.alpha = 0.5


def test_extra_keys_are_forbidden():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DriftPolicy(min_record=10)


# -- text features ------------------------------------------------------------------------------


def test_words_are_lowercased_letter_runs():
    assert words("Use snake_case and f-strings in Python3.12!") == [
        "use",
        "snake",
        "case",
        "and",
        "f",
        "strings",
        "in",
        "python",
    ]
    assert words("Größe ÜBER 42 __init__") == ["größe", "über", "init"]
    assert words("123 + 456 == 579; _ _") == []


def test_script_counts_by_writing_system():
    counts = script_counts(["Hello", "Привет", "中文字", "café"])
    assert counts["latin"] == 5 + 3
    assert counts["cyrillic"] == 6
    assert counts["cjk"] == 3
    assert counts["latin_extended"] == 1  # é
    assert counts["other"] == 0
    assert set(counts) == {*SCRIPT_NAMES, "other"}


def test_script_counts_ignore_digits_punctuation_and_symbols():
    counts = script_counts(["123 + 456 = 579; print(x)!?", "🙂 — “quoted” 2024 ½ № ©"])
    assert sum(counts.values()) == 12  # p r i n t x and q u o t e d
    assert counts["latin"] == 12
    assert script_counts([]) == dict.fromkeys((*SCRIPT_NAMES, "other"), 0)


def test_script_counts_kana_hangul_and_letters_outside_the_ranges():
    counts = script_counts(["カタカナ", "한국어", "ᚠᚢ"])  # the runes are letters of no listed script
    assert counts["kana"] == 4
    assert counts["hangul"] == 3
    assert counts["other"] == 2


def test_script_counts_do_not_count_math_symbols_in_the_latin1_block():
    counts = script_counts(["a 3×3 matrix ÷ 2"])
    assert counts["latin_extended"] == 0
    assert counts["latin"] == 7


def test_shares_and_total_variation():
    assert shares({"latin": 3, "cyrillic": 1}) == {"latin": 0.75, "cyrillic": 0.25}
    assert shares({"latin": 0, "cyrillic": 0}) == {"latin": 0.0, "cyrillic": 0.0}
    p = {"latin": 1.0}
    assert total_variation(p, p) == 0.0
    assert total_variation(p, {"cyrillic": 1.0}) == pytest.approx(1.0)
    assert total_variation(p, {"latin": 0.5, "cyrillic": 0.5}) == pytest.approx(0.5)
    q = {"latin": 0.2, "cjk": 0.8}
    assert total_variation(p, q) == pytest.approx(total_variation(q, p)) == pytest.approx(0.8)


def test_oov_rate():
    vocabulary = {"python", "list", "sort"}
    assert oov_rate(["Sort a Python list"], vocabulary) == pytest.approx(1 / 4)
    assert oov_rate(["python LIST", "sort"], vocabulary) == 0.0
    assert oov_rate(["123", "!!!", ""], vocabulary) is None
    assert oov_rate([], vocabulary) is None


# -- lengths: bins, PSI, KS ---------------------------------------------------------------------


def test_length_bins_are_inner_deciles_with_duplicates_merged():
    edges = length_bins(list(range(1, 101)))
    assert len(edges) == 9
    assert edges == sorted(edges)
    assert edges[0] == pytest.approx(10.9) and edges[-1] == pytest.approx(90.1)
    assert length_bins([40] * 50) == [40.0]


def test_binned_uses_right_closed_bins_and_pseudo_counts():
    edges = [10.0, 20.0]
    assert binned([5, 10, 11, 20, 21, 100], edges) == pytest.approx([2 / 6, 2 / 6, 2 / 6])
    assert binned([1, 2, 3], edges) == pytest.approx([1.0, 0.0, 0.0])
    assert binned([1, 2, 3], edges, pseudo_count=0.5) == pytest.approx([3.5 / 4.5, 0.5 / 4.5, 0.5 / 4.5])
    assert binned([], edges, pseudo_count=0.5) == pytest.approx([1 / 3] * 3)


def test_psi_identical_is_zero_and_shifted_is_large():
    rng = np.random.default_rng(0)
    base = rng.normal(60, 10, 5000).round()
    edges = length_bins(base)
    expected = binned(base, edges)
    assert psi(expected, expected) == pytest.approx(0.0, abs=1e-12)
    same = binned(rng.normal(60, 10, 2000).round(), edges)
    assert psi(expected, same) < 0.05
    longer = binned(rng.normal(90, 10, 2000).round(), edges)
    assert psi(expected, longer) > 0.25


def test_pseudo_count_keeps_empty_bins_of_a_small_window_from_exploding():
    expected = [0.1] * 10
    edges = [float(e) for e in range(10, 100, 10)]
    lengths = [1, 2, 3, 4, 5]  # five prompts, all in the first bin
    raw = psi(expected, binned(lengths, edges))
    smoothed = psi(expected, binned(lengths, edges, pseudo_count=0.5))
    assert raw > 5  # nine empty bins floored at 1e-4 dominate
    assert 0.25 < smoothed < raw / 4  # the shift is still visible, not inflated


def test_ks_test():
    rng = np.random.default_rng(1)
    base = rng.normal(60, 10, 1000)
    statistic, p_same = ks_test(base, rng.normal(60, 10, 200))
    assert 0 <= statistic < 0.15 and p_same > 0.01
    statistic, p_shift = ks_test(base, rng.normal(80, 10, 200))
    assert statistic > 0.5 and p_shift < 1e-6


# -- MMD ----------------------------------------------------------------------------------------


def gaussian_pair(seed: int, shift: float = 0.0, n: int = 50, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(loc=shift, size=(n, dim))


def test_mmd_same_distribution_is_small_and_not_significant():
    results = [mmd_test(*gaussian_pair(seed), permutations=199, seed=seed) for seed in range(10)]
    assert sum(p > 0.01 for _, p in results) >= 9
    assert max(m for m, _ in results) < 0.15


def test_mmd_shifted_mean_is_large_and_significant():
    for seed in range(5):
        mmd, p_value = mmd_test(*gaussian_pair(seed, shift=0.7), permutations=199, seed=seed)
        assert p_value < 0.01
        assert mmd > 0.25
        assert p_value >= 1 / 200  # a permutation p-value counts the observed statistic


def test_mmd_false_alarm_rate_is_within_a_binomial_bound():
    # Under the null each permutation p-value is (super-)uniform, so the number of p <= 0.05 among
    # 30 independent pairs is at most Binomial(30, 0.05): mean 1.5, P(X >= 6) = 0.0033. Six or more
    # false alarms means the test is miscalibrated (e.g. a statistic that ignores the permutation).
    alarms = sum(mmd_test(*gaussian_pair(100 + s), permutations=99, seed=s)[1] <= 0.05 for s in range(30))
    assert alarms <= 5


def test_mmd_is_deterministic_for_a_seed():
    x, y = gaussian_pair(7, shift=0.2)
    first = mmd_test(x, y, permutations=199, seed=3)
    assert mmd_test(x, y, permutations=199, seed=3) == first
    other = mmd_test(x, y, permutations=199, seed=4)
    assert other[0] == first[0]  # the effect size does not depend on the permutations
    assert 0 < first[1] <= 1 and 0 < other[1] <= 1


def test_mmd_of_different_sample_sizes():
    rng = np.random.default_rng(11)
    mmd, p_value = mmd_test(rng.normal(size=(200, 4)), rng.normal(size=(20, 4)), permutations=199, seed=0)
    assert mmd < 0.2 and p_value > 0.01
    mmd, p_value = mmd_test(rng.normal(size=(200, 4)), rng.normal(2.0, size=(20, 4)), permutations=199, seed=0)
    assert mmd > 0.5 and p_value < 0.01


# -- the baseline profile -----------------------------------------------------------------------


def test_build_profile_rejects_an_empty_train_split():
    with pytest.raises(ValueError, match="at least 2 training records; the train split has 0"):
        build_profile([], HELD, embed, dataset="d", dataset_version="v", encoder="e")


def test_build_profile_figures(profile):
    assert profile.records == len(TRAIN)
    assert profile.embeddings.shape == (200, DIM)
    assert profile.embeddings.dtype == np.float32
    assert profile.vocabulary == sorted(profile.vocabulary)
    assert {"decorators", "python", "explain", "example"} <= set(profile.vocabulary)
    assert profile.holdout_oov_rate == 0.0  # same templates: every held-out word was seen
    assert profile.scripts["latin"] == 1.0
    assert profile.refusal_rate == 0.0
    lengths = [len(r["prompt"]) for r in TRAIN]
    assert profile.prompt_length.mean == pytest.approx(np.mean(lengths))
    assert sorted(profile.prompt_length.sample) == sorted(lengths)
    assert sum(profile.prompt_length.shares) == pytest.approx(1.0)


def test_build_profile_calibrates_oov_on_the_holdout():
    held = [{"prompt": "Explain decorators with an unseen word", "response": "x"}]
    built = build_profile(TRAIN, held, embed, dataset="d", dataset_version="v", encoder="e", sample_size=20)
    # explain, decorators, with, an ("an example"): seen; unseen, word: not
    assert built.holdout_oov_rate == pytest.approx(2 / 6)
    assert built.embeddings.shape == (20, DIM)
    refusing = [{**r, "response": REFUSAL} for r in TRAIN[:10]]
    assert build_profile(refusing, [], embed, dataset="d", dataset_version="v", encoder="e").refusal_rate == 1.0


def test_build_profile_is_deterministic_for_a_seed():
    def build(seed: int) -> BaselineProfile:
        kwargs = {"dataset": "d", "dataset_version": "v", "encoder": "e", "sample_size": 50, "seed": seed}
        return build_profile(TRAIN, HELD, embed, **kwargs)

    a, b, c = build(1), build(1), build(2)
    assert a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert not np.array_equal(a.embeddings, c.embeddings)


def test_profile_summary_drops_the_bulky_parts(profile):
    summary = profile.summary()
    assert "vocabulary" not in summary and "embeddings" not in summary
    assert summary["vocabulary_size"] == len(profile.vocabulary)
    assert summary["embedded_prompts"] == 200
    for key in ("prompt_length", "response_length"):
        assert "sample" not in summary[key]
        assert summary[key]["edges"] == getattr(profile, key).edges
    assert summary["format"] == drift.PROFILE_FORMAT
    json.dumps(summary)  # JSON-ready
    assert "sample" in profile.to_dict()["prompt_length"]  # the summary did not mutate the profile


def test_profile_round_trips_through_json(profile):
    data = json.loads(json.dumps(profile.to_dict()))
    assert "embeddings" not in data
    again = BaselineProfile.from_dict(data, profile.embeddings.astype(np.float64))
    assert again.to_dict() == profile.to_dict()
    assert again.embeddings.dtype == np.float32
    np.testing.assert_array_equal(again.embeddings, profile.embeddings)


@pytest.mark.parametrize("fmt", [0, 2, None, "1"])
def test_profile_from_dict_rejects_another_format(profile, fmt):
    data = profile.to_dict()
    if fmt is None:
        del data["format"]
    else:
        data["format"] = fmt
    with pytest.raises(ValueError, match="format"):
        BaselineProfile.from_dict(data, profile.embeddings)


# -- analysing a window -------------------------------------------------------------------------


def test_traffic_record_answered():
    assert TrafficRecord("q", "a", 200).answered
    assert TrafficRecord("q", "", 204).answered
    assert not TrafficRecord("q", None, 200).answered
    assert not TrafficRecord("q", "a", 500).answered
    assert not TrafficRecord("q", "a", 302).answered


def test_too_few_prompts_is_no_verdict_never_drift(profile):
    off_domain = calls(traffic.off_domain_prompts(29, seed=1))
    report = analyze(profile, off_domain, POLICY, no_embed, seed=0)
    assert report.verdict == drift.NO_VERDICT
    assert report.checks == []
    assert report.records == 29 and report.answered == 29
    assert report.reasons == ["29 calls in the window; a verdict needs at least 30"]


def test_calls_without_a_prompt_do_not_count_towards_a_verdict(profile):
    records = window(20) + [TrafficRecord("", None, 500)] * 40
    report = analyze(profile, records, POLICY, no_embed, seed=0)
    assert report.verdict == drift.NO_VERDICT
    assert report.records == 60 and report.answered == 20
    assert "60 calls in the window, 20 with a prompt" in report.reasons[0]
    decision = decide_retraining(report, POLICY, datetime(2024, 5, 1, tzinfo=UTC), None, "ep")
    assert not decision.trigger


def test_a_mostly_failing_window_still_gets_a_verdict(profile):
    # The minimum counts prompts, not answers: an endpoint failing most calls must alert, not go quiet.
    records = window(60, seed=3)
    records[:40] = [TrafficRecord(r.prompt, None, 500, 80.0) for r in records[:40]]
    report = analyze(profile, records, POLICY, embed, seed=3)
    assert report.answered == 20
    assert report.verdict == drift.ALERT
    assert breached(report) == {"error_rate"}
    assert report.check("error_rate").value == pytest.approx(40 / 60)


def test_a_window_of_failures_only_has_no_answer_checks(profile):
    records = [TrafficRecord(r.prompt, None, 502) for r in window(40, seed=4)]
    report = analyze(profile, records, POLICY, embed, seed=4)
    assert report.verdict == drift.ALERT and report.answered == 0
    assert [c.name for c in report.checks] == ["embedding", "prompt_length", "oov", "script", "error_rate"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_distribution_window_is_ok(profile, seed):
    report = analyze(profile, window(60, seed=seed), POLICY, embed, seed=seed)
    assert report.verdict == drift.OK, report.reasons
    assert report.reasons == ["every check within its limit"]
    assert breached(report) == set()
    names = [c.name for c in report.checks]
    assert names == list(drift.CHECKS)  # every check, in the declared order
    assert report.check("response_length").status == "info"  # no limit set: reported only
    lengths = [len(r.prompt) for r in window(60, seed=seed)]
    smoothed = binned(lengths, profile.prompt_length.edges, pseudo_count=0.5)  # a 60-prompt window's PSI
    assert report.check("prompt_length").value == pytest.approx(psi(profile.prompt_length.shares, smoothed))
    assert report.check("prompt_length").value < POLICY.max_prompt_length_psi
    assert report.check("oov").value == 0.0
    assert report.check("script").value == pytest.approx(0.0)
    assert report.check("embedding").figures["embedded"] == 60
    assert report.check("embedding").figures["centroid_cosine"] > 0.8


def test_off_domain_prompts_are_drift(profile):
    report = analyze(profile, calls(traffic.off_domain_prompts(60, seed=1)), POLICY, embed, seed=5)
    assert report.verdict == drift.DRIFT
    assert {"embedding", "oov"} <= breached(report)
    embedding, oov = report.check("embedding"), report.check("oov")
    assert embedding.retrain and embedding.value >= POLICY.min_embedding_mmd
    assert embedding.figures["p_value"] < POLICY.alpha
    assert oov.value > 0.5 and oov.figures["increase"] == pytest.approx(oov.value - profile.holdout_oov_rate)
    assert report.check("script").status == drift.OK  # still Latin letters
    for check in report.checks:
        if check.status == drift.BREACH and check.retrain:
            assert check.summary in report.reasons


def test_another_language_breaches_the_script_check(profile):
    report = analyze(profile, calls(traffic.foreign_prompts(60, "ru", seed=2)), POLICY, embed, seed=6)
    assert report.verdict == drift.DRIFT
    script = report.check("script")
    assert script.status == drift.BREACH and script.retrain
    assert script.value > 0.5
    assert script.figures["share_cyrillic"] > 0.5
    assert "cyrillic" in script.summary
    assert script.summary in report.reasons


def test_much_longer_prompts_breach_prompt_length(profile):
    prompts = traffic.longer_prompts([r["prompt"] for r in HELD], 60, seed=3)
    report = analyze(profile, calls(prompts), POLICY, embed, seed=7)
    assert report.verdict == drift.DRIFT
    length = report.check("prompt_length")
    assert length.status == drift.BREACH and length.retrain
    assert length.value > POLICY.max_prompt_length_psi
    assert length.figures["ks_p_value"] < POLICY.alpha
    assert length.figures["mean"] > 3 * length.figures["baseline_mean"]


def test_failed_calls_alert_without_drift(profile):
    records = window(60, seed=1)
    records[:10] = [TrafficRecord(r.prompt, None, 503, 50.0) for r in records[:10]]
    report = analyze(profile, records, POLICY, embed, seed=1)
    assert report.verdict == drift.ALERT
    assert breached(report) == {"error_rate"}
    error = report.check("error_rate")
    assert error.value == pytest.approx(10 / 60) and not error.retrain
    assert report.reasons == [error.summary]
    assert "10 of 60 calls failed" in error.summary
    assert report.answered == 50
    decision = decide_retraining(report, POLICY, datetime(2024, 5, 1, tzinfo=UTC), None, "ep")
    assert not decision.trigger and "verdict alert" in decision.reason


def test_refusals_alert_without_drift(profile):
    records = window(60, seed=2)
    records[:20] = [TrafficRecord(r.prompt, REFUSAL, 200, r.latency_ms) for r in records[:20]]
    report = analyze(profile, records, POLICY, embed, seed=2)
    assert report.verdict == drift.ALERT
    assert breached(report) == {"refusal"}
    assert report.check("refusal").value == pytest.approx(20 / 60)


def test_slow_calls_alert(profile):
    report = analyze(profile, window(60, seed=0, latency_ms=45_000.0), POLICY, embed, seed=0)
    assert report.verdict == drift.ALERT
    assert breached(report) == {"latency"}
    assert report.check("latency").value == 45_000.0


def test_a_check_listed_in_retrain_on_turns_an_alert_into_drift(profile):
    records = window(60, seed=1)
    records[:10] = [TrafficRecord(r.prompt, None, 500) for r in records[:10]]
    policy = DriftPolicy(min_records=30, permutations=199, retrain_on=["error_rate"])
    report = analyze(profile, records, policy, embed, seed=1)
    assert report.verdict == drift.DRIFT
    assert report.check("error_rate").retrain
    assert not report.check("embedding").retrain


def test_only_a_seeded_sample_is_embedded(profile):
    seen: list[int] = []

    def counting(texts):
        seen.append(len(texts))
        return embed(texts)

    policy = DriftPolicy(min_records=30, permutations=199, max_embedded=25)
    report = analyze(profile, window(60), policy, counting, seed=0)
    assert seen == [25]
    assert report.check("embedding").figures["embedded"] == 25


def test_same_inputs_and_seed_give_the_same_report(profile):
    records = calls(traffic.off_domain_prompts(30, seed=4)) + window(30, seed=4)
    first = analyze(profile, records, POLICY, embed, seed=seed_for("ep/20240501T000000Z"))
    again = analyze(profile, records, POLICY, embed, seed=seed_for("ep/20240501T000000Z"))
    assert first.to_dict() == again.to_dict()
    json.dumps(first.to_dict())  # JSON-ready as it is


def test_seed_for_is_stable_and_64_bit():
    assert seed_for("ep/a") == seed_for("ep/a")
    assert seed_for("ep/a") != seed_for("ep/b")
    assert 0 <= seed_for("") < 2**64
    assert seed_for("abc") == int.from_bytes(hashlib.sha256(b"abc").digest()[:8], "big")


# -- metrics --------------------------------------------------------------------------------------


def test_report_metrics_are_flat_finite_floats(profile):
    report = analyze(profile, calls(traffic.foreign_prompts(60, "ru", seed=2)), POLICY, embed, seed=6)
    metrics = report.metrics()
    assert metrics["drift.records"] == 60.0 and metrics["drift.answered"] == 60.0
    assert metrics["drift.embedding"] == report.check("embedding").value
    assert metrics["drift.embedding.p_value"] == report.check("embedding").figures["p_value"]
    assert metrics["drift.script.share_cyrillic"] > 0.5
    assert metrics["drift.prompt_length.ks_p_value"] == report.check("prompt_length").figures["ks_p_value"]
    checks = "|".join(drift.CHECKS)
    pattern = re.compile(rf"drift\.(records|answered|({checks})(\.[a-z0-9_]+)?)")
    for key, value in metrics.items():
        assert pattern.fullmatch(key), key
        assert type(value) is float and math.isfinite(value), key


def test_report_metrics_skip_non_numbers_and_non_finite_figures():
    check = CheckResult(
        "latency",
        "ok",
        12.0,
        100.0,
        False,
        "p95 latency 12 ms",
        {"p50": 3, "nan": float("nan"), "inf": math.inf, "flag": True, "label": "x"},
    )
    info = CheckResult("response_length", "info", None, None, False, "reported only", {})
    report = DriftReport(drift.OK, ["every check within its limit"], 5, 4, [check, info])
    assert report.metrics() == {
        "drift.records": 5.0,
        "drift.answered": 4.0,
        "drift.latency": 12.0,
        "drift.latency.p50": 3.0,
    }


def test_a_one_record_baseline_is_rejected_when_built_not_when_analysed():
    one = [{"prompt": "Explain decorators in Python.", "response": "Use functools.wraps."}]
    try:
        built = build_profile(one, [], embed, dataset="d", dataset_version="v", encoder="e")
    except ValueError as error:  # rejecting it up front is one acceptable fix
        assert "train" in str(error)
        return
    report = analyze(built, window(40), POLICY, embed, seed=0)  # the other: a verdict, not a crash
    assert report.verdict in {drift.OK, drift.ALERT, drift.DRIFT}
    assert all(math.isfinite(v) for v in report.metrics().values())


# -- asking for retraining ------------------------------------------------------------------------

END = datetime(2024, 5, 1, 12, tzinfo=UTC)


def report_of(verdict: str) -> DriftReport:
    checks = [
        CheckResult("embedding", "breach", 0.4, 0.1, True, "prompt embeddings: MMD 0.400", {}),
        CheckResult("oov", "breach", 0.6, 0.1, True, "out-of-vocabulary words 60.0%", {}),
        CheckResult("latency", "breach", 4e4, 3e4, False, "p95 latency 40000 ms", {}),
    ]
    if verdict == drift.DRIFT:
        return drift._verdict(checks, 100, 100)
    if verdict == drift.ALERT:
        return drift._verdict(checks[2:], 100, 100)
    if verdict == drift.OK:
        return drift._verdict([], 100, 100)
    return DriftReport(drift.NO_VERDICT, ["3 calls in the window; a verdict needs at least 50"], 3, 3, [])


def test_verdict_orders_drift_reasons_before_alerts():
    report = report_of(drift.DRIFT)
    assert report.verdict == drift.DRIFT
    assert report.reasons == [
        "prompt embeddings: MMD 0.400",
        "out-of-vocabulary words 60.0%",
        "p95 latency 40000 ms",
    ]
    assert report_of(drift.ALERT).reasons == ["p95 latency 40000 ms"]


@pytest.mark.parametrize("verdict", [drift.OK, drift.ALERT, drift.NO_VERDICT])
def test_only_drift_asks_for_retraining(verdict):
    report = report_of(verdict)
    assert report.verdict == verdict
    decision = decide_retraining(report, DriftPolicy(), END, None, "ep (champion version 3)")
    assert decision.trigger is False
    assert decision.reason.startswith(f"ep (champion version 3): verdict {verdict}; ")
    assert report.reasons[0] in decision.reason


def test_drift_asks_for_retraining_with_the_breached_checks(profile):
    report = analyze(profile, calls(traffic.off_domain_prompts(60, seed=1)), POLICY, embed, seed=5)
    decision = decide_retraining(report, POLICY, END, None, "ep (champion version 3)")
    assert decision.trigger is True
    assert decision.reason.startswith("drift on ep (champion version 3): ")
    for check in report.checks:
        if check.status == drift.BREACH:
            assert check.summary in decision.reason


def test_drift_within_the_cooldown_does_not_ask_again():
    last = END - timedelta(hours=1)
    decision = decide_retraining(report_of(drift.DRIFT), DriftPolicy(cooldown_hours=24), END, last, "ep")
    assert decision.trigger is False
    assert "cooldown" in decision.reason
    assert last.isoformat() in decision.reason
    assert (last + timedelta(hours=24)).isoformat() in decision.reason


@pytest.mark.parametrize("hours_ago", [24, 25, 24 * 30])
def test_drift_after_the_cooldown_asks_again(hours_ago):
    last = END - timedelta(hours=hours_ago)
    decision = decide_retraining(report_of(drift.DRIFT), DriftPolicy(cooldown_hours=24), END, last, "ep")
    assert decision.trigger is True
    assert "prompt embeddings: MMD 0.400" in decision.reason


def test_drift_just_inside_the_cooldown_does_not_ask():
    last = END - timedelta(hours=24) + timedelta(seconds=1)
    assert not decide_retraining(report_of(drift.DRIFT), DriftPolicy(cooldown_hours=24), END, last, "ep").trigger


@pytest.mark.parametrize("hours_ago", [0, 1, 1e-6])
def test_no_cooldown_always_asks(hours_ago):
    last = END - timedelta(hours=hours_ago)
    decision = decide_retraining(report_of(drift.DRIFT), DriftPolicy(cooldown_hours=0), END, last, "ep")
    assert decision.trigger is True


def test_the_report_names_the_prompts_least_like_the_training_data(profile):
    prompts = [r["prompt"] for r in HELD[:35]] + ["Where should I plant tomatoes in a windy garden?"] * 5
    report = analyze(profile, calls(prompts), POLICY, embed, seed=1)
    examples = report.check("embedding").figures["least_like_training"]
    assert len(examples) == 5
    assert all(e["prompt"].startswith("Where should I plant tomatoes") for e in examples)
    assert examples == sorted(examples, key=lambda e: e["nearest_similarity"])


@pytest.mark.parametrize("permutations", [129, 193, 100])
def test_mmd_test_takes_any_number_of_permutations(permutations):
    """A last batch of one resample (permutations % 64 == 1) once crashed SciPy's concatenation."""
    rng = np.random.default_rng(0)
    mmd, p_value = mmd_test(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)), permutations=permutations, seed=0)
    assert 0 < p_value <= 1 and mmd >= 0


def test_a_window_without_letters_gives_the_script_check_no_verdict(profile):
    report = analyze(profile, calls(["1 + 1 = ?", "2 ** 10", "3 // 2 =", "🙂 🙃"] * 10), POLICY, embed, seed=0)
    script = report.check("script")
    assert script.status == "no_verdict" and script.value is None
    assert "script" not in breached(report)


def test_without_a_held_out_split_the_oov_baseline_holds_out_part_of_the_training_data():
    def rare(i: int) -> str:  # a word no other record has
        return "".join("abcdefghijklmnopqrstuvwxyz"[int(d)] for d in str(i + 100))

    records = [
        {"prompt": f"Explain lists in Python, {rare(i)} example.", "response": "Lists hold items."} for i in range(100)
    ]
    without = build_profile(records, [], embed, dataset="d", dataset_version="v", encoder="e")
    # Each held-out prompt has 1 word of 6 the rest of the data never saw: about 1/6, not 0.
    assert without.holdout_oov_rate == pytest.approx(1 / 6)

"""Per-variant invocation metrics of the gateway: SageMaker's counts, the error rate, latency
percentiles, and the ``since`` window the rollout's guardrails read.

(Named test_variant_metrics.py: tests/unit/training/test_metrics.py already owns the basename.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving import metrics as metrics_module
from serving.metrics import VariantMetrics, latency_summary


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(metrics_module, "time", fake)
    return fake


def test_a_fresh_variant_has_zero_counts_and_an_empty_latency_summary():
    summary = VariantMetrics().summary()
    assert summary == {
        "Invocations": 0,
        "Invocation4XXErrors": 0,
        "Invocation5XXErrors": 0,
        "ErrorRate": 0.0,
        "ModelLatency": {"count": 0},
    }


def test_4xx_and_5xx_are_counted_apart_and_both_are_errors():
    metrics = VariantMetrics()
    for status in (200, 200, 201, 204, 302, 399, 400, 404, 429, 499, 500, 502, 503, 599):
        metrics.observe(10.0, status)
    summary = metrics.summary()
    assert summary["Invocations"] == 14
    assert summary["Invocation4XXErrors"] == 4
    assert summary["Invocation5XXErrors"] == 4
    assert summary["ErrorRate"] == pytest.approx(8 / 14)
    assert (metrics.invocations, metrics.errors_4xx, metrics.errors_5xx) == (14, 4, 4)


def test_all_successes_have_an_error_rate_of_zero():
    metrics = VariantMetrics()
    for _ in range(5):
        metrics.observe(1.0, 200)
    assert metrics.summary()["ErrorRate"] == 0.0


def test_latency_percentiles_match_numpy_on_known_data():
    rng = np.random.default_rng(3)
    latencies = list(rng.lognormal(mean=4.0, sigma=0.7, size=1_000))
    metrics = VariantMetrics()
    for ms in latencies:
        metrics.observe(ms, 200)
    got = metrics.summary()["ModelLatency"]
    expected = np.percentile(latencies, [50, 90, 95, 99])
    assert got["count"] == 1_000
    for key, value in zip(("p50", "p90", "p95", "p99"), expected, strict=True):
        assert got[key] == pytest.approx(value, abs=1e-3)
    assert got["mean"] == pytest.approx(np.mean(latencies), abs=1e-3)
    assert got["max"] == pytest.approx(max(latencies), abs=1e-3)


def test_latency_summary_of_one_to_a_hundred():
    summary = latency_summary([float(v) for v in range(100, 0, -1)])
    assert summary == {
        "count": 100,
        "mean": 50.5,
        "p50": 50.5,
        "p90": 90.1,
        "p95": 95.05,
        "p99": 99.01,
        "max": 100.0,
    }


def test_latency_summary_of_one_value_is_that_value_everywhere():
    summary = latency_summary([42.0])
    assert summary == {"count": 1, "mean": 42.0, "p50": 42.0, "p90": 42.0, "p95": 42.0, "p99": 42.0, "max": 42.0}


def test_an_empty_latency_summary_has_count_zero():
    assert latency_summary([]) == {"count": 0}


def test_the_since_window_counts_only_recent_observations(clock):
    metrics = VariantMetrics()
    for status in (200, 500, 404):  # old: before the step
        metrics.observe(1_000.0, status)
    clock.now += 60
    step_started = clock.now
    for status, ms in ((200, 10.0), (200, 20.0), (503, 30.0), (200, 40.0)):
        metrics.observe(ms, status)
        clock.now += 1

    window = metrics.summary(since=step_started)
    assert window["Invocations"] == 4
    assert window["Invocation4XXErrors"] == 0
    assert window["Invocation5XXErrors"] == 1
    assert window["ErrorRate"] == pytest.approx(0.25)
    assert window["ModelLatency"]["count"] == 4
    assert window["ModelLatency"]["max"] == 40.0
    assert window["ModelLatency"]["p50"] == pytest.approx(np.percentile([10, 20, 30, 40], 50))

    total = metrics.summary()
    assert total["Invocations"] == 7
    assert (total["Invocation4XXErrors"], total["Invocation5XXErrors"]) == (1, 2)
    assert total["ModelLatency"]["max"] == 1_000.0


def test_a_since_in_the_future_counts_nothing_and_one_in_the_past_counts_everything(clock):
    metrics = VariantMetrics()
    for status in (200, 404, 500):
        metrics.observe(5.0, status)
    future = metrics.summary(since=clock.now + 1)
    assert future["Invocations"] == 0
    assert future["ErrorRate"] == 0.0
    assert future["ModelLatency"] == {"count": 0}
    past = metrics.summary(since=clock.now - 3600)
    assert past["Invocations"] == 3
    assert (past["Invocation4XXErrors"], past["Invocation5XXErrors"]) == (1, 1)


def test_an_observation_at_the_window_start_is_inside_it(clock):
    metrics = VariantMetrics()
    metrics.observe(7.0, 200)
    assert metrics.summary(since=clock.now)["Invocations"] == 1


def test_the_window_sees_only_the_most_recent_observations_kept(clock):
    metrics = VariantMetrics(window=3)
    for ms in (1.0, 2.0, 3.0, 4.0, 5.0):
        metrics.observe(ms, 200)
    assert metrics.summary()["Invocations"] == 5  # totals count everything
    assert metrics.summary()["ModelLatency"]["count"] == 3
    assert metrics.summary(since=0)["ModelLatency"]["p50"] == 4.0


def test_dropped_shadow_copies_are_reported_only_when_there_are_some():
    metrics = VariantMetrics()
    assert "ShadowDropped" not in metrics.summary()
    metrics.dropped += 2
    assert metrics.summary()["ShadowDropped"] == 2
    assert metrics.summary(since=0)["ShadowDropped"] == 2


def test_concurrent_observations_are_all_counted():
    metrics = VariantMetrics()

    def hammer():
        for i in range(2_000):
            metrics.observe(float(i), 500 if i % 10 == 0 else 200)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = metrics.summary()
    assert summary["Invocations"] == 8_000
    assert summary["Invocation5XXErrors"] == 800
    assert summary["ModelLatency"]["count"] == 8_000

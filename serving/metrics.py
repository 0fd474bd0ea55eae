"""Per-variant invocation metrics of the gateway: counts, errors and latency percentiles.

The names follow SageMaker's CloudWatch metrics of an endpoint variant (``Invocations``,
``Invocation4XXErrors``, ``Invocation5XXErrors``, ``ModelLatency``), so the rollout's guardrails
read the same figures from either backend. Totals count everything since the variant started; a
window (``since``) is computed from the most recent ``window`` observations kept per variant.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class VariantMetrics:
    def __init__(self, window: int = 100_000):
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, float, int]] = deque(maxlen=window)  # (unix time, ms, status)
        self.invocations = 0
        self.errors_4xx = 0
        self.errors_5xx = 0
        self.dropped = 0  # shadow copies not sent: the mirror queue was full

    def observe(self, latency_ms: float, status: int, at: float | None = None) -> None:
        """One request: its latency, its status, and when it started (default: now)."""
        with self._lock:
            self._recent.append((time.time() if at is None else at, latency_ms, status))
            self.invocations += 1
            if 400 <= status < 500:
                self.errors_4xx += 1
            elif status >= 500:
                self.errors_5xx += 1

    def summary(self, since: float | None = None) -> dict:
        with self._lock:
            if since is None:
                counts = (self.invocations, self.errors_4xx, self.errors_5xx)
                latencies = [ms for _, ms, _ in self._recent]
            else:
                window = [(ms, status) for at, ms, status in self._recent if at >= since]
                latencies = [ms for ms, _ in window]
                counts = (
                    len(window),
                    sum(400 <= s < 500 for _, s in window),
                    sum(s >= 500 for _, s in window),
                )
            dropped = self.dropped
        invocations, e4, e5 = counts
        summary = {
            "Invocations": invocations,
            "Invocation4XXErrors": e4,
            "Invocation5XXErrors": e5,
            "ErrorRate": (e4 + e5) / invocations if invocations else 0.0,
            "ModelLatency": latency_summary(latencies),
        }
        if dropped:
            summary["ShadowDropped"] = dropped
        return summary


def latency_summary(latencies_ms: list[float]) -> dict:
    if not latencies_ms:
        return {"count": 0}
    values = np.asarray(latencies_ms, dtype=float)
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {
        "count": int(values.size),
        "mean": round(float(values.mean()), 3),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(values.max()), 3),
    }


class RefusalCounters:
    """What the gateway refused or flagged before or after a model answered, by reason: keys and
    counts only, so a summary is cheap and holds no request content."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._rules: dict[str, dict[str, int]] = {}  # side ("input", "output", "shadow-output") -> rule -> n

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + n

    def findings(self, side: str, rules) -> None:
        """One payload's guardrail findings (``serving.guardrails.Finding``), on one side."""
        with self._lock:
            table = self._rules.setdefault(side, {})
            for finding in rules:
                table[finding.rule] = table.get(finding.rule, 0) + 1

    def summary(self) -> dict:
        with self._lock:
            return {**self._counts, "Rules": {side: dict(rules) for side, rules in self._rules.items()}}

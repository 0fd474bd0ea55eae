"""What tasks and backends hand each other, as small typed values that import nothing heavy.

The lowest layer of the library: the decision modules, the backends and the stages all import
it, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantWindow:
    """What one variant did in a time window (from the gateway's or CloudWatch's metrics)."""

    invocations: int
    errors: int
    p95_ms: float | None = None
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.invocations if self.invocations else 0.0

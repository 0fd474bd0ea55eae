"""What a job cost, from the price table in config (USD per instance-hour)."""

from __future__ import annotations


def estimate_cost(instance_type: str, instance_count: int, billable_seconds: float, prices: dict[str, float]) -> dict:
    """What a run cost, from the price table in config (USD per instance-hour)."""
    price = prices.get(instance_type)
    return {
        "instance_type": instance_type,
        "instance_count": instance_count,
        "billable_seconds": round(billable_seconds, 1),
        "usd_per_hour": price,
        "estimated_cost_usd": None if price is None else round(price * billable_seconds / 3600, 4),
    }

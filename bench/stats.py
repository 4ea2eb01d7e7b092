"""Percentiles and the throughput-under-a-latency-bound search, shared by the runner and the report."""

from __future__ import annotations

from typing import Any


def percentile(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of unsorted values (q in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q * len(ordered) + 0.5)) - 1))
    return float(ordered[rank])


def latency_summary_ms(latencies_us: list[int]) -> dict[str, float]:
    return {"p50": percentile(latencies_us, 0.50) / 1000, "p90": percentile(latencies_us, 0.90) / 1000,
            "p99": percentile(latencies_us, 0.99) / 1000, "max": (max(latencies_us) if latencies_us else 0) / 1000,
            "count": float(len(latencies_us))}


def best_rate_under(steps: list[dict[str, Any]], p99_ms: float) -> float:
    """The highest achieved calls/s of a step that kept up with its offered rate, had no errors and p99 under the bound."""
    best = 0.0
    for step in steps:
        if step["errors"] == 0 and step["achieved"] >= 0.95 * step["rate"] and step["p99"] < p99_ms:
            best = max(best, min(step["achieved"], step["rate"]))
    return best

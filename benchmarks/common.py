"""Results of the benchmarks, the table ``make bench`` prints, and the files it writes."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    benchmark: str
    name: str
    value: float
    unit: str
    target: str = ""  # e.g. "<= 1.5x"; empty: reported for context
    met: bool | None = None
    detail: str = ""


def at_most(value: float, limit: float) -> bool:
    return value <= limit


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _value(figure: Figure) -> str:
    return (
        f"{figure.value:,.3g} {figure.unit}".strip()
        if abs(figure.value) < 1000
        else f"{figure.value:,.0f} {figure.unit}"
    )


def table(figures: list[Figure]) -> str:
    rows = [("benchmark", "figure", "value", "target", "met")]
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "NO")
        rows.append((f.benchmark, f.name, _value(f), f.target, met))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(figures: list[Figure], about: dict) -> str:
    lines = [
        f"Measured {about['when']} at {about['git_sha']} on {about['machine']['cpu']} "
        f"({about['machine']['cores']} cores), Python {about['machine']['python']}.",
        "",
        "| benchmark | figure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "**no**")
        lines.append(f"| {f.benchmark} | {f.name} | {_value(f)} | {f.target} | {met} |")
    details = [f"- {f.benchmark} / {f.name}: {f.detail}" for f in figures if f.detail]
    return "\n".join(lines + (["", *details] if details else [])) + "\n"


def write(figures: list[Figure], folder: Path) -> dict:
    about = {"when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git_sha": _git_sha(), "machine": machine()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(
        json.dumps({**about, "figures": [asdict(f) for f in figures]}, indent=2) + "\n"
    )
    (folder / "results.md").write_text(markdown(figures, about))
    return about

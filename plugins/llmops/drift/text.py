"""Text features of prompts and answers that the drift checks compare: words, the out-of-vocabulary
rate, and the letters of each writing system (Latin, Cyrillic, CJK...) with the distance between two
such distributions. Pure functions of the text, no Airflow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)

# Writing systems by code point range (letters only; ASCII non-letters are not counted).
SCRIPTS: tuple[tuple[str, int, int], ...] = (
    ("latin", 0x41, 0x5A),
    ("latin", 0x61, 0x7A),
    ("latin_extended", 0xC0, 0xD6),  # without × (U+D7) and ÷ (U+F7)
    ("latin_extended", 0xD8, 0xF6),
    ("latin_extended", 0xF8, 0x24F),
    ("greek", 0x370, 0x3FF),
    ("cyrillic", 0x400, 0x52F),
    ("hebrew", 0x590, 0x5FF),
    ("arabic", 0x600, 0x6FF),
    ("devanagari", 0x900, 0x97F),
    ("thai", 0xE00, 0xE7F),
    ("latin_extended", 0x1E00, 0x1EFF),
    ("kana", 0x3040, 0x30FF),
    ("cjk", 0x3400, 0x4DBF),
    ("cjk", 0x4E00, 0x9FFF),
    ("hangul", 0xAC00, 0xD7AF),
)
SCRIPT_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for name, _, _ in SCRIPTS))
_BOUNDS = np.array([b for _, lo, hi in SCRIPTS for b in (lo, hi + 1)], dtype=np.int64)
_SLOT = np.array([SCRIPT_NAMES.index(name) for name, _, _ in SCRIPTS], dtype=np.int64)


def words(text: str) -> list[str]:
    """Lower-cased runs of letters (digits, punctuation and code symbols are not words)."""
    return _WORD.findall(text.lower())


def script_counts(texts: Sequence[str]) -> dict[str, int]:
    """How many letters of each writing system ``texts`` hold (vectorized over code points);
    letters outside the listed ranges count as ``other``."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    position = np.searchsorted(_BOUNDS, codes, side="right")
    inside = position % 2 == 1  # odd: between a range's lower and upper bound
    counts = np.bincount(_SLOT[(position[inside] - 1) // 2], minlength=len(SCRIPT_NAMES))
    rest, frequency = np.unique(codes[~inside & (codes > 0x7F)], return_counts=True)
    result = {name: int(counts[i]) for i, name in enumerate(SCRIPT_NAMES)}
    result["other"] = sum(f for c, f in zip(rest.tolist(), frequency.tolist(), strict=True) if chr(c).isalpha())
    return result


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def oov_rate(texts: Sequence[str], vocabulary: set[str]) -> float | None:
    """Share of the words of ``texts`` not in ``vocabulary``; None when there are no words."""
    total = missing = 0
    for text in texts:
        for word in words(text):
            total += 1
            missing += word not in vocabulary
    return missing / total if total else None

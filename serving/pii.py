"""Find and scrub personally identifiable information (PII): one scrubber for curation (the
``scrub_pii`` step of ``llm_data_prep``) and for captured traffic (the gateway's capture writer).

Scrubbing replaces each occurrence with a typed placeholder (``[EMAIL]``, ``[PHONE]``, ...) rather
than deleting it: the sentence stays grammatical and the model still learns *where* such a value
goes and what kind it is, without ever seeing (and later regurgitating) the value itself.

The corpus is mostly technical prose and code, so the detectors favour precision: version numbers
(``3.11.7``), hex constants, hashes, UUIDs, dates, times, slices (``x[1::2]``) and long integers
such as ``sys.maxsize`` must come through untouched.

``PII_REGEX_LIST`` holds the same patterns as plain strings for the validation stage (Great
Expectations' ``expect_column_values_to_not_match_regex_list``). They are exact for every type but
``CARD_NUMBER``: a Luhn checksum cannot be written as a practical regex, so that pattern matches
every card-*shaped* number and ``find_pii`` additionally requires the checksum. A card-shaped
number that fails Luhn is therefore left in the text by ``scrub_text`` but flagged by the list.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from serving.guardrails import PII_PATTERNS, SECRET_TOKEN_LENGTH, luhn_ok

# The patterns are the gateway's guardrails' own, so curation, guardrails and capture find the
# same PII; ``serving`` ships to the model container, which has no ``llmops``.
PII_TYPES: tuple[str, ...] = tuple(PII_PATTERNS)


class _Detector(NamedTuple):
    type: str
    pattern: re.Pattern[str]
    # When set, only this many trailing characters of a match are the PII (the rest is context).
    tail: int | None = None
    accept: Callable[[str], bool] | None = None  # a check regexes cannot express


_DETECTORS: tuple[_Detector, ...] = (
    _Detector("EMAIL", re.compile(PII_PATTERNS["EMAIL"])),
    _Detector("PHONE", re.compile(PII_PATTERNS["PHONE"])),
    _Detector("IP_ADDRESS", re.compile(PII_PATTERNS["IP_ADDRESS"])),
    _Detector("AWS_ACCESS_KEY", re.compile(PII_PATTERNS["AWS_ACCESS_KEY"])),
    _Detector("AWS_SECRET_KEY", re.compile(PII_PATTERNS["AWS_SECRET_KEY"]), tail=SECRET_TOKEN_LENGTH),
    _Detector("CARD_NUMBER", re.compile(PII_PATTERNS["CARD_NUMBER"]), accept=luhn_ok),
)

# One pattern per type, in PII_TYPES order.
PII_REGEX_LIST: list[str] = [detector.pattern.pattern for detector in _DETECTORS]


def _spans(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping ``(start, end, type)`` PII spans in text order."""
    candidates = []
    for detector in _DETECTORS:
        for match in detector.pattern.finditer(text):
            start, end = match.span()
            if detector.tail is not None:
                start = end - detector.tail
            if detector.accept is None or detector.accept(text[start:end]):
                candidates.append((start, end, detector.type))
    # Two detectors can claim overlapping text (an access key that is an email's local part).
    # Keeping the earliest, then longest, span and dropping anything it overlaps means no
    # replacement ever lands inside another one's placeholder.
    candidates.sort(key=lambda span: (span[0], -(span[1] - span[0])))
    kept: list[tuple[int, int, str]] = []
    for span in candidates:
        if not kept or span[0] >= kept[-1][1]:
            kept.append(span)
    return kept


def find_pii(text: str) -> list[tuple[str, str]]:
    """``(type, matched text)`` for every PII occurrence in ``text``, in order; nothing is replaced."""
    return [(pii_type, text[start:end]) for start, end, pii_type in _spans(text)]


def scrub_text(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every PII occurrence replaced by ``[TYPE]``, and the replacements counted by type."""
    counts: Counter[str] = Counter()
    # One pass is usually enough, but removing a value changes its neighbours' context: a card
    # right after a phone is rejected as "part of a longer digit run" until the phone is gone.
    # Repeat until nothing is found, so that find_pii on the output is always empty. No detector
    # can match across or inside a placeholder (its brackets end every token), so each pass
    # consumes original text and the loop ends within len(text) passes.
    for _ in range(len(text) + 1):
        spans = _spans(text)
        if not spans:
            break
        pieces = []
        cursor = len(text)
        for start, end, pii_type in reversed(spans):
            pieces.append(text[end:cursor])
            pieces.append(f"[{pii_type}]")
            cursor = start
            counts[pii_type] += 1
        pieces.append(text[:cursor])
        text = "".join(reversed(pieces))
    return text, counts

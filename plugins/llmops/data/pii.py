"""Find and scrub personally identifiable information (PII) in instruction-tuning text.

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

PII_TYPES: tuple[str, ...] = ("EMAIL", "PHONE", "IP_ADDRESS", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "CARD_NUMBER")

# --- EMAIL -----------------------------------------------------------------------------------
# The lookbehind makes a match start only at the beginning of a run of local-part characters;
# without it a long run with no "@" is rescanned from every position (quadratic time).
_EMAIL = (
    r"(?<![A-Za-z0-9._%+-])"
    r"[A-Za-z0-9_%+-][A-Za-z0-9._%+-]*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,}(?![A-Za-z0-9_-])"
)

# --- PHONE -----------------------------------------------------------------------------------
# Separators are mandatory so that bare digit runs (ids, timestamps, 10-digit constants) never
# qualify; dates (4-2-2) and times (colons) do not fit either shape.
_PHONE_INTL = (
    r"(?<![\w+])"
    # At least 8 digits in the run: "+1 2 34" is arithmetic, not a phone.
    r"(?=\+(?:[ .()-]{0,3}\d){8})"
    r"\+[1-9]\d{0,2}"
    # Optional bracketed area code or trunk prefix: "+1 (415) ...", "+44 (0)20 ...".
    r"(?:[ .-]?\(\d{1,4}\)\d{0,8})?"
    # Two or more separated groups, the last of at least two digits so that "+1.0 2.0 3.0 4.0"
    # cannot end on a lone digit of a decimal.
    r"(?:[ .-]\d{1,8}){1,5}[ .-]\d{2,8}"
)
_PHONE_NANP = (
    r"(?<![\w.+-])"
    r"(?:1[ .-])?"
    # One consistent separator: "415-555-0132" or "415.555.0132", never "415-555.0132".
    r"(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}-\d{3}-|\d{3}\.\d{3}\.)\d{4}"
)
# A trailing "-5" or ".5" means the digits go on (a longer identifier or a decimal).
_PHONE = rf"(?:{_PHONE_INTL}|{_PHONE_NANP})(?!\w|[.-]\d)"

# --- IP_ADDRESS ------------------------------------------------------------------------------
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# No dot or word character on either side, so "1.2.3.4.5" and "v1.2.3.4" stay whole version
# numbers; a sentence-ending period is still allowed.
_IPV4 = rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)"
_HEX = r"[0-9A-Fa-f]{1,4}"
# Uncompressed IPv6 needs all eight groups; "12:30:45" (a time) has three and no "::".
_IPV6_FULL = rf"{_HEX}(?::{_HEX}){{7}}"
# Compressed IPv6 needs "::" plus at least three groups (counted by the lookahead), which rules out
# "a::b", slices like "x[1::2]" and C++-style "A::B" (not hex, not enough groups).
_IPV6_COMPRESSED = (
    rf"(?=:{{0,2}}(?:{_HEX}:{{1,2}}){{2}}[0-9A-Fa-f])"
    rf"(?:{_HEX}(?::{_HEX}){{0,6}})?::(?:{_HEX}(?::{_HEX}){{0,6}})?"
)
_IPV6 = rf"(?<![\w:])(?:{_IPV6_FULL}|{_IPV6_COMPRESSED})(?![\w:]|\.\d)"
_IP_ADDRESS = rf"(?:{_IPV4}|{_IPV6})"

# --- AWS keys --------------------------------------------------------------------------------
_AWS_ACCESS_KEY = r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])"
# A bare 40-character base64 token is indistinguishable from a hash or an encoded blob, so a
# secret key is only recognised right after a key-ish name and "=" or ":" (aws_secret_access_key =,
# "SecretAccessKey": ", secret: ...). Only the token itself is replaced; the name stays, which
# keeps config examples readable.
_SECRET_TOKEN_LENGTH = 40
_AWS_SECRET_KEY = (
    r"(?i:secret)[A-Za-z0-9_.-]{0,25}[\"']?\s{0,3}[:=]{1,2}\s{0,3}[\"']?"
    rf"[A-Za-z0-9/+]{{{_SECRET_TOKEN_LENGTH}}}(?![A-Za-z0-9/+])"
)


# --- CARD_NUMBER -----------------------------------------------------------------------------
# Payment card numbers start with 2-6 (ISO/IEC 7812 industry identifiers for Mastercard, Amex,
# Diners, JCB, Visa, Discover, UnionPay, Maestro). Requiring that removes most of the long integers
# in technical text (sys.maxsize, 2**64 - 1, nanosecond timestamps) before Luhn is even consulted.
def _grouped_card(sep: str) -> str:
    # One separator throughout (no back-reference, so the pattern has no capturing group for pandas
    # to warn about): 4-4-4-4(-3), 4-4-4-1..3 and 4-6-4/5 (Amex, Diners). A further group of 3+
    # digits means a longer run, but a short one may follow: the "12/25" of an expiry date must not
    # hide the card in front of it.
    return (
        rf"[2-6]\d{{3}}{sep}(?:\d{{4}}{sep}\d{{4}}{sep}(?:\d{{4}}(?:{sep}\d{{3}})?|\d{{1,3}})|\d{{6}}{sep}\d{{4,5}})"
        rf"(?!\w|\.\d|{sep}\d{{3}})"
    )


_CARD = (
    # Not inside a word, a decimal fraction, or a longer run of separated digit groups; two-digit
    # date and time parts ("2024-01-15 4111 ...") may precede a card.
    r"(?<![\w.])(?<!\d\d\d[ -])"
    rf"(?:[2-6]\d{{12,18}}(?!\w|\.\d)|{_grouped_card(' ')}|{_grouped_card('-')})"
)


def _luhn_ok(number: str) -> bool:
    digits = [int(ch) for ch in number if ch.isdigit()]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


class _Detector(NamedTuple):
    type: str
    pattern: re.Pattern[str]
    # When set, only this many trailing characters of a match are the PII (the rest is context).
    tail: int | None = None
    accept: Callable[[str], bool] | None = None  # a check regexes cannot express


_DETECTORS: tuple[_Detector, ...] = (
    _Detector("EMAIL", re.compile(_EMAIL)),
    _Detector("PHONE", re.compile(_PHONE)),
    _Detector("IP_ADDRESS", re.compile(_IP_ADDRESS)),
    _Detector("AWS_ACCESS_KEY", re.compile(_AWS_ACCESS_KEY)),
    _Detector("AWS_SECRET_KEY", re.compile(_AWS_SECRET_KEY), tail=_SECRET_TOKEN_LENGTH),
    _Detector("CARD_NUMBER", re.compile(_CARD), accept=_luhn_ok),
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

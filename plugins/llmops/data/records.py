"""The record contract and the errors every data stage raises.

A curated record is ``{"id", "prompt", "response", "source", "split", "meta"}``. Raw records may
carry ``instruction`` (+ ``context``) instead of ``prompt``. Fields starting with ``_`` are
working fields (``_origin``: where the record came from, as ``uri:line``); they never reach a
published dataset.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

SPLITS = ("train", "validation", "test")
ORIGIN = "_origin"
TEXT_FIELDS = ("instruction", "context", "prompt", "response")


class DataQualityError(ValueError):
    """Input data is unusable. The message names the defect and where it is."""


def where(record: dict) -> str:
    """``path:line (id=...)`` for error messages."""
    origin = record.get(ORIGIN, "?")
    rid = record.get("id")
    return f"{origin} (id={rid})" if rid else str(origin)


def drop(record: dict, stage: str, reason: str, **detail) -> dict:
    """An entry of the drop report: which record a stage left out, and why. Every record read is
    either published or named in this report."""
    return {"origin": record.get(ORIGIN, "?"), "id": record.get("id"), "stage": stage, "reason": reason, **detail}


def examples(records: list[dict], limit: int = 3) -> str:
    shown = ", ".join(where(r) for r in records[:limit])
    more = f" and {len(records) - limit} more" if len(records) > limit else ""
    return shown + more


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalized_key(text: str) -> str:
    """Text reduced to what a reader would call "the same": case-folded, accents and
    punctuation removed, whitespace collapsed. Used for near-duplicate detection and for the
    split, so two near-identical prompts can never land in different splits."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _NON_WORD.sub(" ", text).strip()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def strip_working_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}

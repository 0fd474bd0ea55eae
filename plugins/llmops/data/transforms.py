"""Record transforms: clean, de-duplicate, scrub PII, format, split.

Each takes a list of records and returns ``(records, stats)``; none touches storage, so each is
tested as a plain function. A transform that finds the data unusable raises
``DataQualityError`` naming the defect and the records (``uri:line``, id) where it is.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

from llmops.data.records import (
    ORIGIN,
    SPLITS,
    TEXT_FIELDS,
    DataQualityError,
    drop,
    examples,
    normalized_key,
    sha256_text,
    where,
)
from llmops.prompts import PromptTemplate
from serving import pii

# C0/C1 control characters except tab and newline, plus zero-width and BOM characters that
# survive NFC and make identical-looking texts differ.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, newlines unified, control characters removed, trailing spaces and runs of blank
    lines trimmed. Inner spacing is kept: code in responses depends on indentation."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL.sub("", text).replace("\u00a0", " ")
    # After removing invisible characters, so a base letter and an accent they separated compose.
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _prompt_text(record: dict) -> str:
    return record.get("prompt") or record.get("instruction") or ""


def clean(records: list[dict], max_empty_fraction: float = 1.0) -> tuple[list[dict], dict]:
    """Clean every text field; drop records left without a prompt or a response (listed in the
    stats' ``drops``)."""
    kept, empty_response, empty_prompt = [], [], []
    for record in records:
        record = dict(record)
        for field in TEXT_FIELDS:
            if isinstance(record.get(field), str):
                record[field] = clean_text(record[field])
        if not _prompt_text(record):
            empty_prompt.append(record)
        elif not record.get("response"):
            empty_response.append(record)
        else:
            kept.append(record)
    total = len(records)
    if empty_response and len(empty_response) == total:
        raise DataQualityError(f"all {total} responses are empty, e.g. {examples(empty_response)}")
    if empty_prompt and len(empty_prompt) == total:
        raise DataQualityError(f"all {total} prompts are empty, e.g. {examples(empty_prompt)}")
    dropped = len(empty_response) + len(empty_prompt)
    if not kept:
        raise DataQualityError(f"no record has both a prompt and a response ({total} records)")
    if dropped / total > max_empty_fraction:
        raise DataQualityError(
            f"{dropped} of {total} records ({dropped / total:.0%}) have an empty prompt or response, "
            f"more than the allowed {max_empty_fraction:.0%}: e.g. {examples(empty_response + empty_prompt)}"
        )
    drops = [drop(r, "clean", "empty prompt") for r in empty_prompt]
    drops += [drop(r, "clean", "empty response") for r in empty_response]
    return kept, {
        "records_in": total,
        "empty_response": len(empty_response),
        "empty_prompt": len(empty_prompt),
        "drops": drops,
    }


def deduplicate(records: list[dict], max_duplicate_fraction: float = 1.0) -> tuple[list[dict], dict]:
    """Drop exact duplicates (same prompt and response text) and near-duplicates (the same once
    case, accents, punctuation and spacing are ignored). The first occurrence wins; each dropped
    one is listed in the stats' ``drops`` with the record it duplicates."""
    seen_exact: dict[str, dict] = {}
    seen_near: dict[str, dict] = {}
    kept, exact, near, drops = [], [], [], []
    for record in records:
        prompt = _prompt_text(record) + "\n" + (record.get("context") or "")
        exact_key = sha256_text(prompt + "\x00" + record["response"])
        near_key = sha256_text(normalized_key(prompt) + "\x00" + normalized_key(record["response"]))
        if exact_key in seen_exact:
            exact.append(record)
            drops.append(drop(record, "deduplicate", "exact duplicate", duplicate_of=where(seen_exact[exact_key])))
        elif near_key in seen_near:
            near.append(record)
            drops.append(drop(record, "deduplicate", "near duplicate", duplicate_of=where(seen_near[near_key])))
        else:
            seen_exact[exact_key] = seen_near[near_key] = record
            kept.append(record)
    total, duplicates = len(records), len(exact) + len(near)
    if total > 1 and len(kept) == 1:
        raise DataQualityError(
            f"all {total} records are duplicates of one record ({examples(kept, 1)}); nothing to learn from"
        )
    if duplicates / total > max_duplicate_fraction:
        raise DataQualityError(
            f"{duplicates} of {total} records ({duplicates / total:.0%}) are duplicates, more than the allowed "
            f"{max_duplicate_fraction:.0%}: e.g. {examples(exact + near)}"
        )
    return kept, {
        "records_in": total,
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "drops": drops,
    }


# Not scrubbed: an id is the record's identity (validation refuses one that holds PII), and these
# others are set or checked by curation itself.
_NOT_SCRUBBED = ("id", "split", "template")


def _scrub_value(value, counts: Counter[str]):
    if isinstance(value, str):
        value, found = pii.scrub_text(value)
        counts.update(found)
        return value
    if isinstance(value, dict):
        return {k: _scrub_value(v, counts) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, counts) for v in value]
    return value


def scrub_pii(records: list[dict], enabled: bool = True) -> tuple[list[dict], dict]:
    """Replace PII with typed placeholders, counted by type: in the text fields and in every other
    field that is published with the record (``source``, free metadata, nested or not)."""
    counts: Counter[str] = Counter()
    if not enabled:
        return records, {"enabled": False, "replaced": {}}
    scrubbed = []
    for record in records:
        record = {
            k: v if k in _NOT_SCRUBBED or k.startswith("_") else _scrub_value(v, counts) for k, v in record.items()
        }
        scrubbed.append(record)
    return scrubbed, {"enabled": True, "replaced": dict(sorted(counts.items()))}


_CURATED_KEYS = ("id", "prompt", "response", "source", "system", "template", "split", ORIGIN)


def format_records(records: list[dict], template: PromptTemplate, default_source: str) -> tuple[list[dict], dict]:
    """Render each record's prompt with ``template`` and give it a stable id and a source.
    Records that already carry a ``prompt`` keep it. Unknown fields move under ``meta``. A record
    that names the template it was written for (``template``, as a published record does) must
    name this one: its prompt would otherwise be labelled with a format it does not have."""
    mismatched = [r for r in records if r.get("template") and r["template"].split("@", 1)[0] != template.name]
    if mismatched:
        declared = sorted({r["template"] for r in mismatched})
        raise DataQualityError(
            f"template mismatch: {len(mismatched)} record(s) were written for template(s) {declared} "
            f"but this run formats with {template.ref}: e.g. {examples(mismatched)}; set data.template to match"
        )
    formatted, rendered = [], 0
    for record in records:
        system = template.system
        if record.get("prompt"):
            prompt = record["prompt"]
        else:
            try:
                system, prompt = template.render_instruction(record["instruction"], record.get("context") or "")
            except (KeyError, IndexError, ValueError) as exc:
                raise DataQualityError(f"{where(record)}: template {template.ref} does not fit: {exc}") from None
            rendered += 1
        response = record["response"]
        out = {
            "id": record.get("id") or "r-" + sha256_text(prompt + "\x00" + response)[:16],
            "prompt": prompt,
            "response": response,
            "source": record.get("source") or default_source,
            "system": system,
            "template": template.ref,
            ORIGIN: record.get(ORIGIN, "?"),
        }
        if record.get("split"):
            out["split"] = record["split"]
        meta = {k: v for k, v in record.items() if k not in _CURATED_KEYS and k not in TEXT_FIELDS}
        if record.get("meta") and isinstance(record["meta"], dict):
            meta = {**{k: v for k, v in meta.items() if k != "meta"}, **record["meta"]}
        if meta:
            out["meta"] = meta
        formatted.append(out)
    return formatted, {"records_in": len(records), "rendered_with_template": rendered, "template": template.ref}


def split_of(prompt: str, fractions: dict[str, float], salt: str) -> str:
    """The split of a prompt: a pure function of its normalized text and the salt, so a record
    keeps its split across dataset versions and equal prompts never straddle two splits."""
    digest = hashlib.sha256(f"{salt}\x00{normalized_key(prompt)}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += fractions[name]
        if point < cumulative:
            return name
    return SPLITS[-1]


def assign_splits(
    records: list[dict], fractions: dict[str, float], salt: str, respect_source_split: bool = True
) -> tuple[list[dict], dict]:
    """Give every record a split. A split named by the source data is kept when allowed (and then
    checked for leakage by validation); anything else is hashed."""
    out, from_source = [], 0
    for record in records:
        record = dict(record)
        given = record.get("split")
        if given and respect_source_split:
            if given not in SPLITS:
                raise DataQualityError(f"{where(record)}: unknown split {given!r}; expected one of {SPLITS}")
            from_source += 1
        else:
            record["split"] = split_of(record["prompt"], fractions, salt)
        out.append(record)
    counts = Counter(r["split"] for r in out)
    return out, {"counts": {s: counts.get(s, 0) for s in SPLITS}, "from_source": from_source}


def prompt_split_counts(records: list[dict]) -> dict[str, int]:
    """For each normalized prompt, in how many splits it appears (1 unless the data leaks)."""
    splits: dict[str, set[str]] = {}
    for record in records:
        splits.setdefault(normalized_key(record["prompt"]), set()).add(record["split"])
    return {key: len(names) for key, names in splits.items()}

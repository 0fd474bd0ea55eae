"""Check a published dataset version before anything trains on it.

A version is trusted only as far as its files still are what its manifest says they are: the
manifest is the version's folder's own, each split file is inside that folder and hashes to the
manifest's sha256, the content hash of the splits is the version's name, and the Great
Expectations result the manifest points to exists and passed. Anything else (a file edited,
truncated or swapped, a manifest copied, edited or pointing elsewhere, a validation verdict
flipped) is refused with a message naming what does not match.
"""

from __future__ import annotations

import hashlib

from llmops import storage
from llmops.data.records import SPLITS, DataQualityError
from llmops.data.versioning import MANIFEST, content_hash


def verify_version(datasets_uri: str, name: str, manifest: dict, storage_options: dict | None = None) -> None:
    """Raise ``DataQualityError`` unless ``manifest`` describes an intact, validated version of
    ``name`` under ``datasets_uri``."""
    version = manifest.get("version")
    label = f"dataset {name}@{str(version)[:12]}"
    if not version or manifest.get("name") != name:
        raise DataQualityError(
            f"{label}: the manifest names {manifest.get('name')!r}@{version!r}; it is not a manifest of {name!r}"
        )
    version_uri = storage.join(datasets_uri, name, version)
    if not storage.exists(storage.join(version_uri, MANIFEST), storage_options):
        raise DataQualityError(f"{label}: {storage.join(version_uri, MANIFEST)} is missing")

    files: dict[str, bytes] = {}
    for split in SPLITS:
        entry = (manifest.get("files") or {}).get(split) or {}
        expected_uri = storage.join(version_uri, f"{split}.jsonl")
        if entry.get("uri") != expected_uri:
            raise DataQualityError(
                f"{label}: the manifest's {split} file is {entry.get('uri')!r}, not the version's own {expected_uri}"
            )
        try:
            payload = storage.read_bytes(expected_uri, storage_options)
        except storage.StorageError as exc:
            raise DataQualityError(f"{label}: the {split} split is missing ({exc})") from None
        digest, recorded = hashlib.sha256(payload).hexdigest(), str(entry.get("sha256"))
        if digest != recorded:
            raise DataQualityError(
                f"{label}: {expected_uri} has sha256 {digest[:12]}…, the manifest says {recorded[:12]}…; "
                "the file changed after it was published"
            )
        counted, lines = (manifest.get("counts") or {}).get(split), payload.count(b"\n")
        if counted != lines:
            raise DataQualityError(f"{label}: the manifest counts {counted} {split} records, the file holds {lines}")
        files[split] = payload
    actual = content_hash(files)
    if actual != version:
        raise DataQualityError(
            f"{label}: the content hash of its files is {actual[:12]}…, not the version's name; the manifest and "
            "files were changed together after publishing"
        )

    validation = manifest.get("validation") or {}
    if not validation.get("success"):
        raise DataQualityError(f"{label}: the version did not pass validation")
    result_uri = validation.get("result_uri")
    try:
        result = storage.read_json(result_uri, storage_options) if result_uri else None
    except (storage.StorageError, ValueError) as exc:
        raise DataQualityError(f"{label}: its validation result {result_uri} cannot be read ({exc})") from None
    if result is None:
        raise DataQualityError(f"{label}: the manifest points to no validation result")
    if result.get("success") is not True:
        raise DataQualityError(
            f"{label}: the manifest says validation passed, but its validation result {result_uri} says it failed"
        )

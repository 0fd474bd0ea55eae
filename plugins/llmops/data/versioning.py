"""Content-addressed dataset versions: ``datasets/<name>/<version>/{train,validation,test}.jsonl``
plus ``manifest.json``.

The version is the sha256 of the canonical content (each split's records sorted by id, as
canonical JSON lines), so the same data always gets the same version and a version is never
overwritten. A version exists only once its manifest does: locally the whole folder is renamed
into place; on S3 the manifest is written last and a failed publish deletes what it wrote, unless
the manifest landed after all (then the version is whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from llmops import storage
from llmops.data.records import SPLITS, strip_working_fields

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: str
    uri: str
    manifest_uri: str
    created: bool


def canonical_splits(records: list[dict]) -> dict[str, bytes]:
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for record in records:
        by_split[record["split"]].append(strip_working_fields(record))
    return {s: storage.jsonl_bytes(sorted(rs, key=lambda r: r["id"])) for s, rs in by_split.items()}


def content_hash(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        payload = files[split]
        digest.update(f"{split}\x00{len(payload)}\x00".encode())
        digest.update(payload)
    return digest.hexdigest()


def publish(
    records: list[dict],
    datasets_uri: str,
    name: str,
    manifest_fields: dict,
    storage_options: dict | None = None,
) -> PublishedVersion:
    """Write a dataset version unless it exists. Returns where it is and whether it was new."""
    files = canonical_splits(records)
    version = content_hash(files)
    dataset_uri = storage.join(datasets_uri, name)
    version_uri = storage.join(dataset_uri, version)
    manifest_uri = storage.join(version_uri, MANIFEST)
    if storage.exists(manifest_uri, storage_options):
        return PublishedVersion(name, version, version_uri, manifest_uri, created=False)

    manifest = {
        **manifest_fields,
        "name": name,
        "version": version,
        "content_sha256": version,
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "counts": {s: files[s].count(b"\n") for s in SPLITS},
        "files": {
            s: {"uri": storage.join(version_uri, f"{s}.jsonl"), "sha256": hashlib.sha256(files[s]).hexdigest()}
            for s in SPLITS
        },
    }
    if storage.is_local(dataset_uri):
        _publish_local(dataset_uri, version_uri, files, manifest)
    else:
        _publish_object_store(version_uri, files, manifest, storage_options)
    return PublishedVersion(name, version, version_uri, manifest_uri, created=True)


def _publish_local(dataset_uri: str, version_uri: str, files: dict[str, bytes], manifest: dict) -> None:
    staging_uri = storage.join(dataset_uri, f".staging-{uuid.uuid4().hex}")
    staging = storage.local_path(staging_uri)
    try:
        for split, payload in files.items():
            storage.write_bytes(storage.join(staging_uri, f"{split}.jsonl"), payload)
        storage.write_json(storage.join(staging_uri, MANIFEST), manifest)
        try:
            os.rename(staging, storage.local_path(version_uri))
        except OSError:
            # Another run published the same content first; its version is this one.
            if not os.path.isfile(os.path.join(storage.local_path(version_uri), MANIFEST)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_object_store(version_uri: str, files: dict[str, bytes], manifest: dict, storage_options) -> None:
    manifest_uri = storage.join(version_uri, MANIFEST)
    written = []
    try:
        for split, payload in files.items():
            uri = storage.join(version_uri, f"{split}.jsonl")
            storage.write_bytes(uri, payload, storage_options)
            written.append(uri)
        storage.write_json(manifest_uri, manifest, storage_options)
    except BaseException:
        # A manifest there means the version is whole: ours landed and only its reply was lost, or
        # another run published the same content (same keys, same bytes). Deleting the splits
        # would leave it pointing at nothing.
        if not _exists_quietly(manifest_uri, storage_options):
            for uri in written:
                with contextlib.suppress(Exception):  # best effort: the error to report is the write's
                    storage.delete(uri, storage_options=storage_options)
        raise


def _exists_quietly(uri: str, storage_options) -> bool:
    """Whether ``uri`` exists; True when the store cannot say, so that nothing is deleted blind."""
    try:
        return storage.exists(uri, storage_options)
    except Exception:
        return True


def list_versions(datasets_uri: str, name: str, storage_options: dict | None = None) -> list[dict]:
    """Manifests of every complete version of ``name``, oldest first."""
    dataset_uri = storage.join(datasets_uri, name)
    manifests = []
    for child in storage.list_dir(dataset_uri, storage_options):
        manifest_uri = storage.join(dataset_uri, child, MANIFEST)
        if not child.startswith(".") and storage.exists(manifest_uri, storage_options):
            manifests.append(storage.read_json(manifest_uri, storage_options))
    return sorted(manifests, key=lambda m: (m["created_at"], m["version"]))


def latest_version(datasets_uri: str, name: str, storage_options: dict | None = None) -> dict | None:
    versions = list_versions(datasets_uri, name, storage_options)
    return versions[-1] if versions else None

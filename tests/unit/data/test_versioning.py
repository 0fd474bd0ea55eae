"""Content-addressed dataset versions: layout, idempotence, ordering, atomicity (local and S3)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws

from llmops import storage
from llmops.data import versioning
from llmops.data.records import SPLITS

NAME = "demo"
BUCKET = "llmops-datasets"
MANIFEST_FIELDS = {
    "source_uris": ["file:///data/raw.jsonl"],
    "validation": {"success": True, "evaluated_expectations": 15},
    "lineage": {"git_sha": "abc123", "run_id": "manual__1"},
}


def make_records(tag: str = "v1") -> list[dict]:
    """Three records per split, with working fields that must never be published."""
    records = []
    for split in SPLITS:
        for i in range(3):
            records.append(
                {
                    "id": f"{split}-{i:02d}",
                    "prompt": f"[{tag}] How do I sort a list in Python? ({split} {i})",
                    "response": f"Use sorted(xs) — café ünïcode {i}.\nSecond line.",
                    "source": "unit",
                    "split": split,
                    "meta": {"lang": "en", "n": i},
                    "_origin": f"file:///raw.jsonl:{len(records) + 1}",
                    "_scratch": {"tmp": True},
                }
            )
    return records


def published(records: list[dict], split: str) -> list[dict]:
    """What the split file should hold: working fields stripped, sorted by id."""
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records if r["split"] == split]
    return sorted(rows, key=lambda r: r["id"])


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file and folder under root (hidden ones included) with its mtime and size."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            state[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size if name in files else -1)
    return state


class _Clock:
    """Stands in for ``versioning.datetime``: each ``now()`` is ``step`` after the previous."""

    def __init__(self, step: timedelta):
        self.current = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
        self.step = step

    def now(self, tz=None):
        self.current += self.step
        return self.current


def test_publish_local_writes_splits_and_a_manifest_that_describes_them(tmp_path):
    base = storage.to_uri(str(tmp_path / "datasets"))
    records = make_records()

    result = versioning.publish(records, base, NAME, MANIFEST_FIELDS)

    assert result.created is True
    assert result.name == NAME
    assert re.fullmatch(r"[0-9a-f]{64}", result.version)
    assert result.uri == f"{base}/{NAME}/{result.version}"
    assert result.manifest_uri == f"{result.uri}/manifest.json"

    dataset_dir = tmp_path / "datasets" / NAME
    version_dir = dataset_dir / result.version
    assert os.listdir(dataset_dir) == [result.version]  # no staging folder left behind
    assert sorted(os.listdir(version_dir)) == ["manifest.json", "test.jsonl", "train.jsonl", "validation.jsonl"]

    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["version"] == manifest["content_sha256"] == result.version
    assert manifest["name"] == NAME
    for key, value in MANIFEST_FIELDS.items():
        assert manifest[key] == value
    datetime.fromisoformat(manifest["created_at"])

    # The version is a sha256 over the split files exactly as they lie on disk.
    digest = hashlib.sha256()
    for split in SPLITS:
        raw = (version_dir / f"{split}.jsonl").read_bytes()
        digest.update(f"{split}\x00{len(raw)}\x00".encode())
        digest.update(raw)
        rows = [json.loads(line) for line in raw.decode("utf-8").split("\n") if line]
        assert rows == published(records, split)
        assert all(not key.startswith("_") for row in rows for key in row)
        assert b'"_origin"' not in raw and b'"_scratch"' not in raw
        assert manifest["counts"][split] == 3
        assert manifest["files"][split]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert manifest["files"][split]["uri"] == f"{result.uri}/{split}.jsonl"
    assert digest.hexdigest() == result.version


def test_same_records_in_another_order_are_the_same_version_and_touch_nothing(tmp_path):
    base = storage.to_uri(str(tmp_path / "datasets"))
    records = make_records()
    first = versioning.publish(records, base, NAME, MANIFEST_FIELDS)
    before = snapshot(tmp_path)

    shuffled = [dict(r, _origin="file:///elsewhere.jsonl:9") for r in records]  # working fields differ too
    random.Random(7).shuffle(shuffled)
    assert [r["id"] for r in shuffled] != [r["id"] for r in records]
    again = versioning.publish(shuffled, base, NAME, {"other": "fields"})

    assert again.version == first.version
    assert again.uri == first.uri
    assert again.created is False
    assert snapshot(tmp_path) == before
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "datasets" / NAME))
    manifest = storage.read_json(first.manifest_uri)
    assert "other" not in manifest  # the existing version is never rewritten


def test_changed_content_is_a_new_version_listed_after_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setattr(versioning, "datetime", _Clock(timedelta(seconds=5)))
    base = storage.to_uri(str(tmp_path / "datasets"))
    assert versioning.list_versions(base, NAME) == []
    assert versioning.latest_version(base, NAME) is None

    old = versioning.publish(make_records("v1"), base, NAME, MANIFEST_FIELDS)
    changed = make_records("v1")
    changed[4]["response"] = "A corrected answer."
    new = versioning.publish(changed, base, NAME, MANIFEST_FIELDS)
    assert new.created is True
    assert new.version != old.version

    # Leftovers that are not versions: a folder without a manifest and a hidden staging folder.
    storage.write_bytes(storage.join(base, NAME, "f" * 64, "train.jsonl"), b"{}\n")
    storage.write_json(storage.join(base, NAME, ".staging-deadbeef", "manifest.json"), {"version": "x"})

    versions = versioning.list_versions(base, NAME)
    assert [m["version"] for m in versions] == [old.version, new.version]
    assert versioning.latest_version(base, NAME)["version"] == new.version
    assert versioning.list_versions(base, "other-dataset") == []


def test_versions_published_in_the_same_second_keep_publication_order(tmp_path, monkeypatch):
    monkeypatch.setattr(versioning, "datetime", _Clock(timedelta(milliseconds=1)))
    base = storage.to_uri(str(tmp_path / "datasets"))
    a, b = make_records("a"), make_records("b")
    hash_of = {id(r): versioning.content_hash(versioning.canonical_splits(r)) for r in (a, b)}
    # Publish the content with the larger hash first, so hash order and age order disagree.
    first, second = sorted((a, b), key=lambda r: hash_of[id(r)], reverse=True)

    old = versioning.publish(first, base, NAME, MANIFEST_FIELDS)
    new = versioning.publish(second, base, NAME, MANIFEST_FIELDS)

    assert [m["version"] for m in versioning.list_versions(base, NAME)] == [old.version, new.version]
    assert versioning.latest_version(base, NAME)["version"] == new.version


def test_published_split_reads_back_with_read_jsonl_for_any_text(tmp_path):
    base = storage.to_uri(str(tmp_path / "datasets"))
    records = make_records()
    records[0]["response"] = "first part\u2028second part"
    result = versioning.publish(records, base, NAME, MANIFEST_FIELDS)
    assert storage.read_jsonl(storage.join(result.uri, "train.jsonl")) == published(records, "train")


@pytest.mark.parametrize("failing", ["manifest", "split"])
def test_failed_local_publish_leaves_no_version_and_no_staging_folder(tmp_path, monkeypatch, failing):
    base = storage.to_uri(str(tmp_path / "datasets"))
    records = make_records()
    if failing == "manifest":

        def broken_write_json(uri, obj, storage_options=None):
            raise storage.StorageError(f"{uri}: write failed: disk full")

        monkeypatch.setattr(storage, "write_json", broken_write_json)
    else:
        real_write_bytes = storage.write_bytes

        def broken_write_bytes(uri, data, storage_options=None):
            if uri.endswith("/validation.jsonl"):
                raise storage.StorageError(f"{uri}: write failed: disk full")
            real_write_bytes(uri, data, storage_options)

        monkeypatch.setattr(storage, "write_bytes", broken_write_bytes)

    with pytest.raises(storage.StorageError, match="disk full"):
        versioning.publish(records, base, NAME, MANIFEST_FIELDS)

    dataset_dir = tmp_path / "datasets" / NAME
    assert not dataset_dir.exists() or os.listdir(dataset_dir) == []
    assert versioning.list_versions(base, NAME) == []

    monkeypatch.undo()
    retry = versioning.publish(records, base, NAME, MANIFEST_FIELDS)
    assert retry.created is True
    assert os.listdir(dataset_dir) == [retry.version]


def _keys(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_publish_to_s3_writes_the_manifest_last_and_is_idempotent(s3, monkeypatch):
    options = {"client": s3}
    base = f"s3://{BUCKET}/datasets"
    writes = []
    real_write_bytes = storage.write_bytes

    def recording_write_bytes(uri, data, storage_options=None):
        writes.append(uri)
        real_write_bytes(uri, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes", recording_write_bytes)
    records = make_records()

    result = versioning.publish(records, base, NAME, MANIFEST_FIELDS, options)

    assert result.created is True
    prefix = f"datasets/{NAME}/{result.version}/"
    assert _keys(s3, f"datasets/{NAME}/") == [
        prefix + f for f in ("manifest.json", "test.jsonl", "train.jsonl", "validation.jsonl")
    ]
    assert len(writes) == 4
    assert writes[-1] == result.manifest_uri == f"s3://{BUCKET}/{prefix}manifest.json"

    manifest = storage.read_json(result.manifest_uri, options)
    assert manifest["content_sha256"] == manifest["version"] == result.version
    assert manifest["lineage"] == MANIFEST_FIELDS["lineage"]
    for split in SPLITS:
        raw = s3.get_object(Bucket=BUCKET, Key=f"{prefix}{split}.jsonl")["Body"].read()
        assert manifest["files"][split]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert [json.loads(line) for line in raw.decode().split("\n") if line] == published(records, split)
        assert manifest["counts"][split] == 3
    assert [m["version"] for m in versioning.list_versions(base, NAME, options)] == [result.version]
    assert versioning.latest_version(base, NAME, options)["version"] == result.version

    writes.clear()
    again = versioning.publish(list(reversed(records)), base, NAME, MANIFEST_FIELDS, options)
    assert (again.version, again.created) == (result.version, False)
    assert writes == []


def test_failed_s3_manifest_write_deletes_the_split_objects(s3, monkeypatch):
    options = {"client": s3}
    base = f"s3://{BUCKET}/datasets"
    records = make_records()
    version = versioning.content_hash(versioning.canonical_splits(records))
    split_writes = []
    real_write_bytes = storage.write_bytes

    def recording_write_bytes(uri, data, storage_options=None):
        real_write_bytes(uri, data, storage_options)
        split_writes.append(uri)

    def broken_write_json(uri, obj, storage_options=None):
        assert len(split_writes) == 3  # the splits really were written before the manifest failed
        raise storage.StorageError(f"{uri}: write failed: AccessDenied")

    monkeypatch.setattr(storage, "write_bytes", recording_write_bytes)
    monkeypatch.setattr(storage, "write_json", broken_write_json)

    with pytest.raises(storage.StorageError, match="manifest.json: write failed: AccessDenied"):
        versioning.publish(records, base, NAME, MANIFEST_FIELDS, options)

    assert _keys(s3, f"datasets/{NAME}/{version}/") == []
    assert _keys(s3, "") == []
    monkeypatch.undo()
    assert versioning.list_versions(base, NAME, options) == []

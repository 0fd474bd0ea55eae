from __future__ import annotations

import errno
import os

import boto3
import pytest
from moto import mock_aws

from llmops import storage


def test_local_round_trip_and_listing(tmp_path):
    base = storage.to_uri(str(tmp_path))
    storage.write_json(storage.join(base, "a", "x.json"), {"k": 1})
    storage.write_jsonl(storage.join(base, "a", "y.jsonl"), [{"b": 2, "a": 1}])
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"k": 1}
    assert storage.read_bytes(storage.join(base, "a", "y.jsonl")) == b'{"a":1,"b":2}\n'
    assert storage.list_dir(storage.join(base, "a")) == ["x.json", "y.jsonl"]
    assert storage.list_dir(storage.join(base, "missing")) == []
    storage.delete(storage.join(base, "a"), recursive=True)
    assert not storage.exists(storage.join(base, "a"))


def test_local_write_leaves_no_temporary_file(tmp_path):
    uri = storage.to_uri(str(tmp_path / "out.txt"))
    storage.write_text(uri, "hello")
    assert os.listdir(tmp_path) == ["out.txt"]


def test_failed_local_write_keeps_the_old_content_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", disk_full)
    with pytest.raises(storage.StorageError, match=r"f.txt: write failed: .*No space left"):
        storage.write_text(storage.to_uri(str(target)), "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


class _DiskFillsUp:
    """``open`` for the storage module: a file opened for writing takes half of what is written,
    then the disk is full."""

    def __init__(self):
        self.opened = []

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if "w" not in mode:
            return handle
        self.opened.append(path)

        class Full:
            def write(self, data):
                handle.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

        return Full()


def test_a_write_that_fills_the_disk_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")
    full = _DiskFillsUp()
    monkeypatch.setattr(storage, "open", full, raising=False)
    with pytest.raises(storage.StorageError, match=r"f.txt: write failed: .*No space left on device"):
        storage.write_text(storage.to_uri(str(target)), "new content")
    with pytest.raises(storage.StorageError, match=r"g.txt: write failed"):
        storage.write_text(storage.to_uri(str(tmp_path / "g.txt")), "new content")
    assert len(full.opened) == 2, "the fault was not hit"
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_denied_write_names_the_uri_and_leaves_nothing(tmp_path, monkeypatch):
    def denied(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return open(path, mode, *args, **kwargs)

    # Injected: as root (the tests' user in CI containers) a chmod 0o500 folder is writable anyway.
    monkeypatch.setattr(storage, "open", denied, raising=False)
    uri = storage.to_uri(str(tmp_path / "sub" / "x.json"))
    with pytest.raises(storage.StorageError, match=rf"{uri}: write failed: .*Permission denied"):
        storage.write_json(uri, {"k": 1})
    assert os.listdir(tmp_path / "sub") == []


def test_missing_object_is_reported_with_its_uri(tmp_path):
    uri = storage.to_uri(str(tmp_path / "nope.json"))
    with pytest.raises(storage.StorageError, match="nope.json: no such file"):
        storage.read_bytes(uri)


@mock_aws
def test_s3_round_trip_listing_and_delete():
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket="llmops-test")
    options = {"client": client}
    storage.write_json("s3://llmops-test/p/v1/manifest.json", {"v": 1}, options)
    storage.write_bytes("s3://llmops-test/p/v1/train.jsonl", b"{}\n", options)
    storage.write_bytes("s3://llmops-test/p/v2/train.jsonl", b"{}\n", options)
    assert storage.read_json("s3://llmops-test/p/v1/manifest.json", options) == {"v": 1}
    assert storage.exists("s3://llmops-test/p/v1", options)
    assert storage.exists("s3://llmops-test/p/v1/manifest.json", options)
    assert not storage.exists("s3://llmops-test/p/v3", options)
    assert storage.list_dir("s3://llmops-test/p", options) == ["v1", "v2"]
    storage.delete("s3://llmops-test/p/v1", recursive=True, storage_options=options)
    assert storage.list_dir("s3://llmops-test/p", options) == ["v2"]
    with pytest.raises(storage.StorageError, match="s3://llmops-test/p/v1/manifest.json: no such file"):
        storage.read_bytes("s3://llmops-test/p/v1/manifest.json", options)

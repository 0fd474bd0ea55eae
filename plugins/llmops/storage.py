"""URIs in, bytes out: the one place that touches the artifact store.

Code above this module sees URIs only (``file:///...`` locally, ``s3://...`` on AWS). S3 goes
through boto3 (credentials from the environment, an instance role, or a client built from an
Airflow connection and passed as ``storage_options={"client": ...}``); every other scheme
through fsspec. s3fs is not used: no release of its aiobotocore dependency accepts the botocore
that the Amazon provider needs.

Writes are atomic per object: locally through a temporary file and a rename, on S3 by the nature
of a PUT. A *folder* is committed by writing its marker object (a manifest) last; see
``llmops.data.versioning``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from typing import Any

from fsspec.core import url_to_fs


class StorageError(OSError):
    """An object could not be read or written; the message names the URI."""


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return uri.startswith("file://") or "://" not in uri


def local_path(uri: str) -> str:
    """The filesystem path of a ``file://`` URI (or a plain path)."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"{uri} is not a local URI")
    return uri


def to_uri(path_or_uri: str) -> str:
    """A plain path becomes an absolute ``file://`` URI; a URI is returned unchanged."""
    if "://" in path_or_uri:
        return path_or_uri
    return "file://" + os.path.abspath(path_or_uri)


def _fs(uri: str, storage_options: dict[str, Any] | None = None):
    try:
        return url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{uri}: no filesystem for this URI ({exc})") from exc


def _s3(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, str] | None:
    """(client, bucket, key) for an ``s3://`` URI, else None."""
    if not uri.startswith("s3://"):
        return None
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket")
    options = dict(storage_options or {})
    client = options.pop("client", None)
    if client is None:
        import boto3

        client = boto3.client("s3", **options)
    return client, bucket, key


def _s3_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    if s3 := _s3(uri, storage_options):
        client, bucket, key = s3
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if not _s3_missing(exc):
                raise StorageError(f"{uri}: {exc}") from exc
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return bool(listing.get("KeyCount"))
    fs, path = _fs(uri, storage_options)
    return fs.exists(path)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    if s3 := _s3(uri, storage_options):
        client, bucket, key = s3
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _s3_missing(exc):
                raise StorageError(f"{uri}: no such file or object") from None
            raise StorageError(f"{uri}: read failed: {exc}") from exc
    fs, path = _fs(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file or object") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a folder, expected a file") from None
    except PermissionError as exc:
        raise StorageError(f"{uri}: permission denied ({exc})") from None


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(uri, storage_options))


def read_jsonl(uri: str, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """Read JSON lines written by this project (trusted). Raw user files go through
    ``llmops.data.ingest``, which reports defects by line and column."""
    # Split on "\n" only: str.splitlines() also breaks at U+2028/U+0085, which JSON leaves unescaped.
    return [json.loads(line) for line in read_bytes(uri, storage_options).decode("utf-8").split("\n") if line]


def list_dir(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Child names (not URIs) of a folder; empty when it does not exist."""
    if s3 := _s3(uri, storage_options):
        client, bucket, key = s3
        prefix = key.rstrip("/") + "/" if key else ""
        names: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        return sorted(n for n in names if n)
    fs, path = _fs(uri, storage_options)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write one object so that readers see either nothing or all of it."""
    if s3 := _s3(uri, storage_options):
        client, bucket, key = s3
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise StorageError(f"{uri}: write failed: {exc}") from exc
        return
    try:
        if is_local(uri):
            path = local_path(uri)
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs, path = _fs(uri, storage_options)
            fs.pipe_file(path, data)
    except OSError as exc:
        raise StorageError(f"{uri}: write failed: {exc}") from exc


def write_text(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage_options)


def write_json(uri: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", storage_options)


def jsonl_bytes(records: Iterable[dict]) -> bytes:
    """Canonical JSON lines: sorted keys, no ASCII escaping, one record per line."""
    return b"".join(
        (json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        for r in records
    )


def write_jsonl(uri: str, records: Iterable[dict], storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(uri, jsonl_bytes(records), storage_options)


def upload_dir(local_dir: str, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a local folder's files under ``uri``, keeping relative paths."""
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as fh:
                write_bytes(join(uri, rel), fh.read(), storage_options)


def delete(uri: str, recursive: bool = False, storage_options: dict[str, Any] | None = None) -> None:
    """Remove an object, or with ``recursive`` everything under a folder. Missing is fine."""
    if s3 := _s3(uri, storage_options):
        client, bucket, key = s3
        keys = [key]
        if recursive:
            prefix = key.rstrip("/") + "/"
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", [])]
        for k in keys:
            client.delete_object(Bucket=bucket, Key=k)
        return
    fs, path = _fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)

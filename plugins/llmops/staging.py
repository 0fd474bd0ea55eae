"""Base models and files staged once in the store (S3 on AWS), for the containers that need them:
a model folder goes up under ``<store>/base-models/<name>/`` with a marker written last, so a
half-finished upload is never taken for a complete one."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from llmops import storage
from llmops.config import ConfigError
from llmops.models import ModelNotFoundError, resolve_model


def base_model_uri(store_uri: str, name: str) -> str:
    """Where the base model's folder sits for the ``base_model`` channel (uploaded once). A model
    given as a folder is keyed by the folder's name."""
    key = re.sub(r"[^A-Za-z0-9._-]", "-", Path(name).name) or "model"
    return storage.join(store_uri, "base-models", key) + "/"


STAGED_MARKER = "_STAGED.json"


def stage_files(files: dict[str, bytes], uri: str, storage_options: dict | None = None, source: str = "") -> dict:
    """Upload files under the prefix ``uri`` once. The marker (the file list with hashes) is
    written last, so a half-finished upload is never taken for a complete one."""
    marker_uri = storage.join(uri, STAGED_MARKER)
    if storage.exists(marker_uri, storage_options):
        return storage.read_json(marker_uri, storage_options)
    for relative, data in sorted(files.items()):
        storage.write_bytes(storage.join(uri, relative), data, storage_options)
    staged = {"source": source, "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}}
    storage.write_json(marker_uri, staged, storage_options)
    return staged


def stage_base_model(folder: Path, uri: str, storage_options: dict | None = None) -> dict:
    """Upload a model folder to ``uri`` once (see ``stage_files``)."""
    if storage.exists(storage.join(uri, STAGED_MARKER), storage_options):
        return storage.read_json(storage.join(uri, STAGED_MARKER), storage_options)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return stage_files(files, uri, storage_options, source=str(folder))


def ensure_model_staged(settings, name: str, storage_options: dict | None = None, log=print) -> str:
    """The S3 prefix of model ``name`` (a base model or the encoder), staged from this machine when
    it is not there yet; a ``ConfigError`` saying how to stage it when it is on neither."""

    uri = base_model_uri(settings.store_uri, name)
    if not storage.exists(storage.join(uri, STAGED_MARKER), storage_options):
        try:
            folder = resolve_model(name, settings.models.cache_dir)
        except ModelNotFoundError as exc:
            raise ConfigError(
                f"model {name!r} is not staged at {uri} and not on this machine ({exc}); stage it once with:"
                f" python -m devtools.aws stage-model {name}"
            ) from None
        stage_base_model(folder, uri, storage_options)
        log(f"staged model {name} at {uri}")
    return uri

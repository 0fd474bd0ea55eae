"""Model artifacts (``model.tar.gz``, SageMaker's layout) unpacked safely on this machine."""

from __future__ import annotations

from pathlib import Path

from training.archive import model_archive_limits, safe_extract


def extract_model(artifact_bytes: bytes, target: Path, name: str = "model.tar.gz") -> Path:
    """Unpack a ``model.tar.gz`` into ``target`` (new or empty) with ``training.archive.safe_extract``:
    an unsafe, corrupt or oversized archive raises ``ArchiveError`` naming ``name`` and leaves nothing."""

    return safe_extract(artifact_bytes, target, name=name, **model_archive_limits())

"""``verify_version``: an intact, validated dataset version passes; any change after publishing,
to a split file, the manifest or the validation verdict, is refused with what does not match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llmops import storage
from llmops.data import versioning
from llmops.data.integrity import verify_version
from llmops.data.records import SPLITS, DataQualityError

NAME = "demo"


@pytest.fixture
def published(tmp_path) -> tuple[str, dict]:
    """(datasets URI, manifest) of a version whose saved validation result passed."""
    result = tmp_path / "runs" / "validation" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"success": True}))
    records = [
        {"id": f"{split}-{i}", "prompt": f"Question {split} {i}?", "response": "Answer.", "split": split}
        for split in SPLITS
        for i in range(2)
    ]
    datasets = storage.to_uri(str(tmp_path / "datasets"))
    fields = {"validation": {"success": True, "result_uri": storage.to_uri(str(result))}}
    version = versioning.publish(records, datasets, NAME, fields)
    return datasets, storage.read_json(version.manifest_uri)


def _file(manifest: dict, split: str) -> Path:
    return Path(storage.local_path(manifest["files"][split]["uri"]))


def test_an_intact_version_passes(published):
    datasets, manifest = published
    verify_version(datasets, NAME, manifest)


def _refused(datasets: str, manifest: dict) -> str:
    with pytest.raises(DataQualityError) as info:
        verify_version(datasets, NAME, manifest)
    return str(info.value)


def test_an_edited_split_file_is_refused(published):
    datasets, manifest = published
    train = _file(manifest, "train")
    train.write_text(train.read_text().replace("Answer.", "Answer!"))
    message = _refused(datasets, manifest)
    assert f"dataset {NAME}@{manifest['version'][:12]}: {manifest['files']['train']['uri']} has sha256" in message
    assert "the file changed after it was published" in message


def test_a_deleted_split_file_is_refused(published):
    datasets, manifest = published
    _file(manifest, "test").unlink()
    assert "the test split is missing" in _refused(datasets, manifest)


def test_files_and_manifest_hashes_changed_together_are_refused_by_the_content_hash(published):
    datasets, manifest = published
    train = _file(manifest, "train")
    train.write_text(train.read_text().replace("Answer.", "Answer!"))
    manifest["files"]["train"]["sha256"] = hashlib.sha256(train.read_bytes()).hexdigest()
    assert "the content hash of its files is" in _refused(datasets, manifest)


def test_edited_counts_are_refused(published):
    datasets, manifest = published
    manifest["counts"]["validation"] = 200
    assert "the manifest counts 200 validation records, the file holds 2" in _refused(datasets, manifest)


def test_a_manifest_of_another_dataset_is_refused(published):
    datasets, manifest = published
    manifest["name"] = "other"
    assert "it is not a manifest of 'demo'" in _refused(datasets, manifest)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"success": False}, "says it failed"),
        (None, "cannot be read"),
    ],
    ids=["result-says-failed", "result-missing"],
)
def test_the_saved_validation_result_must_have_passed(published, result, expected):
    datasets, manifest = published
    path = Path(storage.local_path(manifest["validation"]["result_uri"]))
    if result is None:
        path.unlink()
    else:
        path.write_text(json.dumps(result))
    assert expected in _refused(datasets, manifest)

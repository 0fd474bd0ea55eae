"""Curation of good input publishes a version, and a re-run finds it instead of writing again.

The bad inputs (each refused with a message naming the defect, and no version written) are the
reliability suite's corpus: ``tests/reliability/test_bad_data.py``."""

from __future__ import annotations

import pytest

from llmops import storage
from llmops.data import stages

pytestmark = pytest.mark.model


def _curate(settings, raw, **overrides):
    data = settings.data.model_copy(update={"raw_uri": str(raw), **overrides})
    return stages.curate(settings, data)


def test_good_input_publishes_a_version_and_rerun_writes_nothing(settings, good_raw):
    first = _curate(settings, good_raw)
    assert first["created"]
    assert sum(first["counts"].values()) == 40
    manifest = storage.read_json(first["manifest_uri"])
    assert manifest["validation"]["success"] is True
    assert storage.exists(manifest["validation"]["data_docs_uri"])
    assert manifest["source_uris"] == [storage.to_uri(str(good_raw))]
    assert manifest["records"] == {"read": 40, "published": 40, "dropped": 0}
    assert manifest["dropped"] == {"by_reason": {}, "records": []}
    second = _curate(settings, good_raw)
    assert second["version"] == first["version"] and not second["created"]

from __future__ import annotations

from pathlib import Path

import pytest

from tests.datagen import good_records, write_jsonl


@pytest.fixture
def good_raw(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", good_records())

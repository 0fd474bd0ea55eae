"""The reliability table itself: every case named with its outcome and records, a lost record fails
its case, and the same table comes out when pytest-xdist runs the cases in worker processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # not from tests.conftest: importing it again would redo its setup

CASES = """
import pytest

@pytest.mark.reliability("load")
def test_all_arrive(ledger):
    ledger.account(expected=10, delivered=10)
    ledger.figure("p99_ms", 12.345)

@pytest.mark.reliability("faults")
def test_one_goes_missing(ledger):
    ledger.expect(3)
    ledger.deliver(2)

@pytest.mark.reliability("security")
def test_skipped_with_a_reason():
    pytest.skip("no scanner here")

@pytest.mark.reliability("bad data")
class TestGroup:
    def test_refused(self):
        assert True

def test_not_a_case():
    assert True
"""


def _run(pytester, monkeypatch, *args):
    """pytest in a child process on ``CASES`` with the plugin loaded, as ``make test`` loads it."""
    pytester.makepyfile(test_cases=CASES)
    report = pytester.path / "report.json"
    monkeypatch.setenv("LLMOPS_RELIABILITY_REPORT", str(report))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))
    result = pytester.runpytest_subprocess("-p", "tests.reliability_report", "-p", "no:cacheprovider", *args)
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist-workers"])
def test_the_table_names_every_case_and_counts_lost_records(pytester, monkeypatch, workers):
    result, report = _run(pytester, monkeypatch, *workers)

    result.assert_outcomes(passed=4, errors=1, skipped=1)  # the body passes; the lost record fails teardown
    result.stdout.re_match_lines(
        [
            r"category +cases tried +passed +failed +skipped +records lost",
            r"faults +1 +0 +1 +0 +1",
            r"load +1 +1 +0 +0 +0",
            r"security +1 +0 +0 +1 +0",
            r"all +4 +2 +1 +1 +1",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(
        [
            "bad data:",
            "  PASSED  TestGroup.test_refused",
            "faults:",
            "  FAILED  test_one_goes_missing records 2/3 (Failed: 1 of 3 records lost)",
            "load:",
            "  PASSED  test_all_arrive records 10/10 p99_ms=12.35",
            "security:",
            "  SKIPPED test_skipped_with_a_reason (Skipped: no scanner here)",
        ]
    )
    assert "test_not_a_case" not in result.stdout.str().split("= reliability =")[-1]
    assert report["records_lost"] == 1
    assert {c["name"]: (c["outcome"], c["lost"]) for c in report["cases"]} == {
        "TestGroup.test_refused": ("passed", 0),
        "test_all_arrive": ("passed", 0),
        "test_one_goes_missing": ("failed", 1),
        "test_skipped_with_a_reason": ("skipped", 0),
    }


def test_a_case_needs_a_known_category(pytester, monkeypatch):
    pytester.makepyfile(test_bad='import pytest\n\n@pytest.mark.reliability("weather")\ndef test_x():\n    pass\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))
    result = pytester.runpytest_subprocess("-p", "tests.reliability_report", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*reliability marker needs one of*got ('weather',)*"])

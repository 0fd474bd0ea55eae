"""The reliability table: what ``make reliability`` prints, and what every test run prints when it
ran a case of the reliability suite.

A case is a test marked ``@pytest.mark.reliability("<category>")`` (categories: ``CATEGORIES``).
A case that moves records (captured requests, dataset rows, model versions) accounts for them
through the ``ledger`` fixture: ``ledger.expect(n)`` what had to arrive, ``ledger.deliver(n)`` what
did; the difference is the case's records lost. A case may also report figures
(``ledger.figure("p99_ms", 41.2)``) that the table prints next to it. The table goes to the
terminal and to ``.llmops/reliability/report.json`` (or ``$LLMOPS_RELIABILITY_REPORT``).

A case that fails, errors or loses a record fails the run: the ledger is checked after the test
body, so a case cannot pass with a record missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CATEGORIES = ("bad data", "faults", "load", "idempotency", "security")
REPORT = Path(
    os.environ.get("LLMOPS_RELIABILITY_REPORT")
    or Path(__file__).resolve().parents[1] / ".llmops" / "reliability" / "report.json"
)


@dataclass
class Case:
    category: str
    name: str
    outcome: str = "not run"  # passed, failed, skipped
    expected: int = 0
    delivered: int = 0
    figures: dict[str, float | int | str] = field(default_factory=dict)
    reason: str = ""

    @property
    def lost(self) -> int:
        return max(self.expected - self.delivered, 0)


class Ledger:
    """Records a case had to keep and the ones it kept."""

    def __init__(self, case: Case):
        self.case = case

    def expect(self, n: int) -> None:
        self.case.expected += int(n)

    def deliver(self, n: int) -> None:
        self.case.delivered += int(n)

    def account(self, expected: int, delivered: int) -> None:
        self.expect(expected)
        self.deliver(delivered)

    def figure(self, name: str, value: float | int | str) -> None:
        self.case.figures[name] = round(value, 2) if isinstance(value, float) else value


_PROPERTY = "llmops_reliability_case"
_cases: dict[str, Case] = {}  # the cases this process runs, by node id: the ledger writes here
_reported: dict[str, Case] = {}  # the cases' outcomes as reported: the table reads these


def _case_of(item) -> Case | None:
    marker = item.get_closest_marker("reliability")
    if marker is None:
        return None
    if not marker.args or marker.args[0] not in CATEGORIES:
        raise pytest.UsageError(f"{item.nodeid}: reliability marker needs one of {CATEGORIES}, got {marker.args}")
    if item.nodeid not in _cases:
        _cases[item.nodeid] = Case(marker.args[0], item.nodeid.split("::", 1)[-1].replace("::", "."))
    return _cases[item.nodeid]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"reliability(category): a case of the reliability suite; category is one of {CATEGORIES}"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        _case_of(item)


@pytest.fixture
def ledger(request) -> Ledger:
    case = _case_of(request.node)
    if case is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses the ledger but is not marked reliability(...)")
    book = Ledger(case)
    yield book
    if case.lost:
        pytest.fail(f"{case.lost} of {case.expected} records lost")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Put the case's book on its reports, which is all that reaches the process that prints the
    table when pytest-xdist runs the tests in workers."""
    report = yield
    case = _cases.get(item.nodeid)
    if case is not None:
        book = {k: case.__dict__[k] for k in ("category", "name", "expected", "delivered", "figures")}
        report.user_properties.append((_PROPERTY, book))
    return report


def pytest_runtest_logreport(report):
    book = next((value for key, value in report.user_properties if key == _PROPERTY), None)
    if book is None:
        return
    case = _reported.setdefault(report.nodeid, Case(book["category"], book["name"]))
    case.expected, case.delivered, case.figures = book["expected"], book["delivered"], dict(book["figures"])
    if report.failed:
        case.outcome = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr or "")
        case.reason = text.strip().splitlines()[0][:160] if text.strip() else ""
    elif report.skipped and case.outcome != "failed":
        case.outcome = "skipped"
        case.reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    elif report.when == "call" and report.passed:
        case.outcome = "passed"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ran = [c for c in _reported.values() if c.outcome != "not run"]
    if not ran:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability")
    header = f"{'category':<12} {'cases tried':>11} {'passed':>7} {'failed':>7} {'skipped':>8} {'records lost':>13}"
    write(header)
    write("-" * len(header))
    totals = [0, 0, 0, 0, 0]
    for category in CATEGORIES:
        cases = [c for c in ran if c.category == category]
        if not cases:
            continue
        row = [
            len(cases),
            sum(c.outcome == "passed" for c in cases),
            sum(c.outcome == "failed" for c in cases),
            sum(c.outcome == "skipped" for c in cases),
            sum(c.lost for c in cases),
        ]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        write(f"{category:<12} {row[0]:>11} {row[1]:>7} {row[2]:>7} {row[3]:>8} {row[4]:>13}")
    write("-" * len(header))
    write(f"{'all':<12} {totals[0]:>11} {totals[1]:>7} {totals[2]:>7} {totals[3]:>8} {totals[4]:>13}")
    for category in CATEGORIES:
        cases = sorted((c for c in ran if c.category == category), key=lambda c: c.name)
        if not cases:
            continue
        write("")
        write(f"{category}:")
        for c in cases:
            records = f" records {c.delivered}/{c.expected}" if c.expected else ""
            figures = "".join(f" {k}={v}" for k, v in c.figures.items())
            why = f" ({c.reason})" if c.outcome in ("failed", "skipped") and c.reason else ""
            write(f"  {c.outcome.upper():<7} {c.name}{records}{figures}{why}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        json.dumps(
            {
                "cases": [c.__dict__ | {"lost": c.lost} for c in sorted(ran, key=lambda c: (c.category, c.name))],
                "records_lost": totals[4],
                "pid": os.getpid(),
            },
            indent=2,
        )
    )

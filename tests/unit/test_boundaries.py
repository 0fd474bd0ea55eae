"""training/, serving/ and the decision logic must not import Airflow (STYLE.md principle 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "plugins" / "llmops"
AIRFLOW_FREE = [
    *sorted((ROOT / "training").rglob("*.py")),
    *sorted((ROOT / "serving").rglob("*.py")),
    *sorted((LIBRARY / "data").rglob("*.py")),
    *sorted((LIBRARY / "rollout").rglob("*.py")),
    *sorted((LIBRARY / "drift").rglob("*.py")),
    *sorted((LIBRARY / "backends" / "training").rglob("*.py")),
    *sorted((LIBRARY / "backends" / "evaluation").rglob("*.py")),
    *(LIBRARY / name for name in ("config.py", "storage.py", "models.py", "prompts.py", "comparison.py", "gate.py")),
    *(LIBRARY / name for name in ("evaluation.py", "contracts.py", "costs.py", "staging.py", "runs.py", "capture.py")),
    LIBRARY / "evaluation_report.py",
    LIBRARY / "backends" / "endpoints" / "base.py",
    LIBRARY / "backends" / "endpoints" / "gateway.py",
    ROOT / "devtools" / "traffic.py",
]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", AIRFLOW_FREE, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_does_not_import_airflow(path):
    offending = sorted(m for m in imported_modules(path) if m.split(".")[0] == "airflow")
    assert offending == []


def test_the_check_sees_airflow_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from airflow.sdk import dag\n")
    assert "airflow.sdk" in imported_modules(sample)

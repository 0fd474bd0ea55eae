"""training/, serving/ and the decision logic must not import Airflow (STYLE.md principle 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_FREE = [
    *sorted((ROOT / "training").rglob("*.py")),
    *sorted((ROOT / "serving").rglob("*.py")),
    *sorted((ROOT / "plugins" / "llmops" / "data").rglob("*.py")),
    ROOT / "plugins" / "llmops" / "config.py",
    ROOT / "plugins" / "llmops" / "storage.py",
    ROOT / "plugins" / "llmops" / "models.py",
    ROOT / "plugins" / "llmops" / "prompts.py",
    ROOT / "plugins" / "llmops" / "comparison.py",
    ROOT / "plugins" / "llmops" / "gate.py",
    ROOT / "plugins" / "llmops" / "evaluation.py",
    ROOT / "plugins" / "llmops" / "rollout.py",
    ROOT / "plugins" / "llmops" / "deployment.py",
    ROOT / "plugins" / "llmops" / "drift.py",
    ROOT / "plugins" / "llmops" / "monitoring.py",
    ROOT / "plugins" / "llmops" / "traffic.py",
    ROOT / "plugins" / "llmops" / "backends" / "local.py",
    ROOT / "plugins" / "llmops" / "backends" / "sagemaker.py",
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

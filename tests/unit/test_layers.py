"""The library's layers hold (pyproject.toml's import-linter contracts), no two first-party modules
import each other even through a chain or an import inside a function, and every module of
``llmops`` sits in a declared layer. Each check is shown to fail on a planted violation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"llmops": ROOT / "plugins" / "llmops", "training": ROOT / "training", "serving": ROOT / "serving"}
PACKAGES["devtools"] = ROOT / "devtools"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint_imports(path: list[Path]) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts, over the packages found on ``path``."""
    command = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    return subprocess.run(
        [*command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_graph(path: list[Path]) -> dict[str, list[str]]:
    """Each first-party module found on ``path`` and the first-party modules it imports directly,
    at its top or inside a function (grimp's graph), built in a fresh interpreter: this one has
    the real packages imported already."""
    script = (
        "import grimp, json, sys; g = grimp.build_graph(*sys.argv[1:], cache_dir=None);"
        "print(json.dumps({m: sorted(i for i in g.find_modules_directly_imported_by(m)"
        " if i.split('.')[0] in sys.argv[1:]) for m in g.modules if m.split('.')[0] in sys.argv[1:]}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    result = subprocess.run(
        [sys.executable, "-c", script, *PACKAGES], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(result.stdout)


def import_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected groups of modules (more than one module each): Tarjan's algorithm."""
    modules = sorted(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return cycles


def layer_of(module: str, layers: list[str]) -> int | None:
    for depth, layer in enumerate(layers):
        for name in layer.replace("|", ":").split(":"):
            name = name.strip()
            if module == name or module.startswith(name + "."):
                return depth
    return None


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A copy of the four packages where the rollout policy (a pure decision module, near the
    bottom) imports the rollout steps (a stage, above the backends): a layer violation and a cycle."""
    root = tmp_path_factory.mktemp("planted")
    for name, source in PACKAGES.items():
        shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    policy = root / "llmops" / "rollout" / "policy.py"
    policy.write_text(
        policy.read_text() + "\n\ndef _planted():\n    from llmops.rollout import steps\n\n    return steps\n"
    )
    return root


def test_the_layer_contracts_hold():
    result = lint_imports([ROOT / "plugins", ROOT])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_planted_upward_import_breaks_the_layers(planted):
    result = lint_imports([planted])
    assert result.returncode != 0
    assert "llmops.rollout.policy -> llmops.rollout.steps" in result.stdout


def test_no_first_party_import_cycles():
    assert import_cycles(import_graph([ROOT / "plugins", ROOT])) == []


def test_a_planted_cycle_is_found(planted):
    cycles = import_cycles(import_graph([planted]))
    assert any({"llmops.rollout.policy", "llmops.rollout.steps"} <= set(cycle) for cycle in cycles), cycles


def test_every_library_module_is_in_a_layer():
    layers = next(c for c in CONFIG["contracts"] if c["type"] == "layers")["layers"]
    modules = sorted(
        ".".join(p.relative_to(ROOT / "plugins").with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGES["llmops"].rglob("*.py")
    )
    packages = {"llmops", "llmops.data", "llmops.rollout", "llmops.drift"}  # docstrings only
    assert [m for m in modules if m not in packages and layer_of(m, layers) is None] == []


def test_training_and_serving_stand_alone_and_tooling_stays_out_of_the_runtime():
    graph = import_graph([ROOT / "plugins", ROOT])
    runtime = {m: imported for m, imported in graph.items() if m.split(".")[0] != "devtools"}
    assert {m: i for m, imported in runtime.items() for i in imported if i.split(".")[0] == "devtools"} == {}
    standalone = {m: imported for m, imported in graph.items() if m.split(".")[0] in ("training", "serving")}
    assert {m: i for m, imported in standalone.items() for i in imported if i.split(".")[0] == "llmops"} == {}

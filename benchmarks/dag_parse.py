"""DAG parsing: importing ``airflow.sdk`` and filling a DagBag of the whole ``dags/`` folder,
against importing ``airflow.sdk`` alone, each in fresh interpreters (median of several). The
ratio (sdk + DagBag fill) / sdk is what the DAGs cost on top of Airflow. Importing the DagBag
module itself is Airflow's own cost, the same with no DAGs at all: it is reported apart."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Figure

ROOT = Path(__file__).resolve().parents[1]
RUNS = 7
TARGET = 1.5

_IMPORT = """
import json, time
started = time.perf_counter()
import airflow.sdk
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

_PARSE = """
import json, sys, time
import airflow.sdk  # not counted here: it is the other side of the ratio
started = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag  # Airflow's own, loaded in any DAG processor
loaded = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
done = time.perf_counter()
print(json.dumps({"seconds": done - loaded, "dagbag_import": loaded - started, "dags": len(bag.dag_ids),
                  "errors": len(bag.import_errors)}))
"""


def _measure(code: str, env: dict[str, str], *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> list[Figure]:
    import os

    from devtools.localstack import environment

    with tempfile.TemporaryDirectory(prefix="bench-dags-") as home:
        env = {**os.environ, **environment(Path(home))}
        imports, parses, modules = [], [], []
        for _ in range(RUNS):  # interleaved, so a busy moment hits both sides
            imports.append(_measure(_IMPORT, env)["seconds"])
            parsed = _measure(_PARSE, env, str(ROOT / "dags"))
            if parsed["errors"]:
                raise RuntimeError(f"{parsed['errors']} DAG import errors; run the DAG tests")
            parses.append(parsed["seconds"])
            modules.append(parsed["dagbag_import"])
    sdk, dags = statistics.median(imports), statistics.median(parses)
    ratio = (sdk + dags) / sdk
    return [
        Figure("dag_parse", "import airflow.sdk", sdk * 1000, "ms", detail=f"median of {RUNS} fresh interpreters"),
        Figure("dag_parse", "import of the DagBag module (Airflow's)", statistics.median(modules) * 1000, "ms"),
        Figure("dag_parse", f"DagBag fill of dags/ ({parsed['dags']} DAGs)", dags * 1000, "ms"),
        Figure("dag_parse", "(sdk + DagBag fill) / sdk", ratio, "x", f"<= {TARGET}x", ratio <= TARGET),
    ]

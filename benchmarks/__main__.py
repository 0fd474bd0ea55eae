"""Run the benchmarks, print the table, write ``benchmarks/results.{json,md}``.

python -m benchmarks                 # every benchmark
python -m benchmarks dag_parse drift # some of them
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks.common import table, write

BENCHMARKS = ("training", "dag_parse", "drift", "gateway", "serving")
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name", help="any of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    figures = []
    for name in args.names or BENCHMARKS:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        measured = module.run()
        for figure in measured:
            print(
                f"   {figure.name}: {figure.value:.4g} {figure.unit}" + (f" ({figure.detail})" if figure.detail else "")
            )
        figures += measured
    print()
    print(table(figures))
    about = write(figures, args.out)
    where = f"{args.out}/results.json and results.md"
    print(f"\n{about['machine']['cpu']}, {about['machine']['cores']} cores; written to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

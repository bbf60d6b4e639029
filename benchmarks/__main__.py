"""Run a benchmark and write ``benchmarks/results/NAME.json`` and ``NAME.md``.

    python -m benchmarks kmeans [--rows N] [--skip-dask-ml] ...
    python -m benchmarks outofcore [--size large]
    python -m benchmarks logreg [--rows N] [--classes K] ...
    python -m benchmarks sgd [--rows N] [--epochs E] ...
    python -m benchmarks knn [--rows N] [--queries Q] [--n-probe P ...] ...
    python -m benchmarks floor [--chunks N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import floor, kmeans, knn, logreg, outofcore, sgd

BENCHMARKS = {"kmeans": kmeans, "outofcore": outofcore, "logreg": logreg, "sgd": sgd,
              "knn": knn, "floor": floor}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="name", required=True)
    for name, mod in BENCHMARKS.items():
        mod.add_arguments(sub.add_parser(name, help=mod.__doc__.splitlines()[0]))
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    mod = BENCHMARKS[args.name]
    results = mod.run(args)
    text = mod.report(results)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str))
    (out / f"{args.name}.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")


if __name__ == "__main__":
    main()

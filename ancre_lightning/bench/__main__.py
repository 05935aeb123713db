"""``python -m ancre_lightning.bench [aggregation] [step] [memory] [framework] [loader] [--json] ...``

Prints one Markdown table per sub-benchmark (paste-ready for BENCHMARKS.md), or with ``--json``
one JSON document on stdout (everything else the runs print goes to stderr). ``--out FILE`` also
writes the JSON document to a file. ``--quick`` runs every sub-benchmark at a tiny size (a smoke
test: the numbers mean nothing). ``--set NAME.KEY=VALUE`` overrides one option of a
sub-benchmark, VALUE read as JSON when it parses (``--set step.reps=9``,
``--set 'step.modes=["eager"]'``, ``--set framework.data_path=/path/to/text``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

import torch

from . import SUITES
from ._common import load_average, machine_info, resolve_device


def _parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or name not in SUITES:
            raise SystemExit(f"--set wants NAME.KEY=VALUE with NAME one of {', '.join(SUITES)}, got {item!r}")
        valid = sorted({*SUITES[name].FULL, *SUITES[name].QUICK})
        if option not in valid:
            raise SystemExit(f"--set {item!r}: {name} has no option {option!r}; options: {', '.join(valid)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[option] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ancre_lightning.bench",
        description="Benchmarks of the connectivity backbone against the machine's limits.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"sub-benchmarks to run: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--device", default="auto", help="auto (GPU if any, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of tables")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON document to FILE")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="override one option of a sub-benchmark (VALUE parsed as JSON when possible)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    names = args.names or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise SystemExit(f"unknown sub-benchmark(s) {unknown}; choose from {', '.join(SUITES)}")
    overrides = _parse_sets(args.sets)
    device = resolve_device(args.device)
    doc: dict[str, Any] = {"suite": "ancre_lightning.bench", "format": 1, "quick": args.quick,
                           "machine": machine_info(device), "results": {}}
    report = sys.stdout
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    # Kernels for the benchmark's fixed shapes only: no dynamic-shape decisions carried over from
    # earlier processes (the automatic-dynamic profile kept in the compile cache).
    with quiet, torch._dynamo.config.patch(automatic_dynamic_local_pgo=False):
        for name in names:
            suite = SUITES[name]
            options = {**(suite.QUICK if args.quick else suite.FULL), **overrides.get(name, {})}
            start = time.perf_counter()
            result = suite.run(device, **options)
            result["wall_s"] = time.perf_counter() - start
            doc["results"][name] = result
            if not args.json:
                print(f"## {name}\n\n{suite.table(result)}\n\n(wall time {result['wall_s']:.0f} s)\n", file=report, flush=True)
    doc["machine"]["load_average_at_end"] = load_average()
    text = json.dumps(doc, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text, file=report, flush=True)
    return doc


if __name__ == "__main__":
    main()

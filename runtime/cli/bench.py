"""`facert bench`: the benchmarks in benchmarks/, from the facert command (registered by runtime/cli).

  facert bench all      the CPU suite: server load + perf_analyzer + per-stage latency, each next to
                        transformers; results under benchmarks/results/<date>-cpu-<machine id>/
  facert bench stages   per-stage latency per backend and batch size, in-process
  facert bench serve    the server under load: starts tritonserver on the demo model's onnxruntime
                        engines (or loads --url), our gRPC streaming load generator and perf_analyzer

The benchmarks live in the source checkout (benchmarks/ beside runtime/), not in the installed
package: the command needs that checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _benchmarks_importable() -> bool:
    if not (REPO_ROOT / "benchmarks" / "cpu_suite.py").exists():
        return False
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return True


def _run(module: str, skip: str = ""):
    def run(args) -> int:
        import importlib

        mod = importlib.import_module(f"benchmarks.{module}")
        if skip:
            args.skip = ",".join(p for p in (args.skip, skip) if p)
        return mod.run(args)

    return run


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput benchmarks, next to transformers",
                       description="Benchmarks of the demo model on this machine (see benchmarks/README.md).")
    if not _benchmarks_importable():
        p.set_defaults(func=lambda _a: _missing())
        return
    from benchmarks import cpu_suite, stages

    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    q = bench.add_parser("all", help="the CPU suite (about 10 minutes on 2 cores)", description=cpu_suite.__doc__,
                         formatter_class=_raw())
    cpu_suite.add_arguments(q)
    q.set_defaults(func=_run("cpu_suite"))

    q = bench.add_parser("stages", help="per-stage latency per backend and batch size", description=stages.__doc__,
                         formatter_class=_raw())
    stages.add_arguments(q)
    q.set_defaults(func=_run("stages"))

    q = bench.add_parser("serve", help="the server under load: TTFT, inter-token latency, p50/p90/p99, throughput",
                         description="The serve and perf_analyzer phases of the CPU suite (facert bench all): "
                                     "start tritonserver on the model's onnxruntime engines, or load --url, at "
                                     "each concurrency level. No per-stage run, so no peer column.")
    cpu_suite.add_arguments(q)
    q.set_defaults(func=_run("cpu_suite", skip="stages,compile"))


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _missing() -> int:
    print(f"facert: error: facert bench needs the source checkout's benchmarks/ folder, which is not at "
          f"{REPO_ROOT / 'benchmarks'}", file=sys.stderr)
    return 2

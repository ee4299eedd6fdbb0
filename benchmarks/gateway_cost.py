"""What the gateway in front of tritonserver costs: the same load with and without it.

    .venv/bin/python benchmarks/gateway_cost.py [--checkpoint DIR] [--rounds 3] [--concurrency 1,8]
        [--requests 24] [--max-tokens 16] [--out DIR] [--shared "note"]

`facert serve` puts facert's gateway (runtime/serving/gateway.py) on the public ports and
tritonserver behind it; `TritonServer(gateway=False)` lets clients reach tritonserver itself, as
before. For each round, and in a new order each round, one server of each kind is started on the
same repository (the tiny checkpoint unless --checkpoint), warmed up, and loaded with
benchmarks/loadgen.py's closed loop at every --concurrency level (streamed answers of --max-tokens
tokens); then stopped. Reported per kind and level: the median over the rounds of time to first
token, inter-token latency, request latency (p50 each) and output tokens/s, with the spread
(min-max over the rounds). Results: <out>/gateway_cost.json and README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIGURES = (("ttft_ms_p50", "time to first token p50 (ms)"), ("itl_ms_p50", "inter-token latency p50 (ms)"),
           ("latency_ms_p50", "request latency p50 (ms)"), ("output_tokens_per_s", "output tokens/s"))


def measure(repo: Path, gateway: bool, levels: list[int], requests: int, max_tokens: int, image: bytes,
            question: str, say) -> list[dict]:
    from benchmarks.loadgen import run_level
    from runtime.serving.repo import validate_repository
    from runtime.serving.server import TritonServer, free_ports

    model = next(n for n, c in validate_repository(repo).items() if c.platform == "ensemble")
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, gateway=gateway,
                          log=lambda _l: None, say=say, provision_log=say, exit_timeout_s=3)
    server.start(timeout_s=600)
    try:
        asyncio.run(run_level(server.grpc_url, 1, 2, 120.0, image, question, max_tokens, model=model))  # warm-up
        rows = []
        for c in levels:
            row = asyncio.run(run_level(server.grpc_url, c, max(requests, 2 * c), 300.0, image, question,
                                        max_tokens, model=model))
            say(f"{'gateway' if gateway else 'direct '} concurrency {c}: TTFT p50 {row['ttft_ms_p50']} ms, ITL p50 "
                f"{row['itl_ms_p50']} ms, {row['output_tokens_per_s']} tok/s, {row['errors']} errors")
            rows.append({"gateway": gateway, **row})
        return rows
    finally:
        server.stop()


def table(rows: list[dict], levels: list[int]) -> str:
    from benchmarks.report import md_table

    out = []
    for c in levels:
        for key, label in FIGURES:
            cells = []
            for gateway in (False, True):
                vals = [r[key] for r in rows if r["gateway"] == gateway and r["concurrency"] == c and r.get(key)]
                cells.append(f"{np.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})" if vals else "")
            d = [r[key] for r in rows if r["gateway"] and r["concurrency"] == c and r.get(key)]
            b = [r[key] for r in rows if not r["gateway"] and r["concurrency"] == c and r.get(key)]
            ratio = f"{np.median(d) / np.median(b):.3f}" if d and b else ""
            out.append([c, label, *cells, ratio])
    return md_table(["concurrency", "figure", "direct (tritonserver's ports)", "through the gateway",
                     "gateway / direct"], out, align="rlrrr")


def main(argv=None) -> int:
    from benchmarks.report import _jsonable, new_record, results_dir
    from runtime.cli.common import DEMO_IMAGE, DEMO_QUESTION

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: the tiny one, built in a temp dir)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8", help="levels, comma-separated (default 1,8)")
    ap.add_argument("--requests", type=int, default=24, help="requests per level (at least 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="orders the two kinds in each round")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-cpu-<machine>)")
    ap.add_argument("--shared", help="note when the machine was shared with other work")
    args = ap.parse_args(argv)
    say = lambda m: print(f"[gateway_cost] {m}", file=sys.stderr, flush=True)  # noqa: E731
    levels = [int(c) for c in args.concurrency.split(",")]

    from runtime.checkpoint import init_checkpoint
    from runtime.serving.repo import fill_repository

    with tempfile.TemporaryDirectory(prefix="facert-gateway-cost-") as tmp:
        checkpoint = args.checkpoint or init_checkpoint("tiny", Path(tmp) / "tiny", seed=0, progress=lambda *a: None)
        repo = Path(tmp) / "repository"
        fill_repository(repo, checkpoint=checkpoint)
        settings = {"checkpoint": str(args.checkpoint or "tiny (seeded random weights)"), "rounds": args.rounds,
                    "concurrency": levels, "requests": args.requests, "max_tokens": args.max_tokens}
        record = new_record("gateway-cost", shared=args.shared, settings=settings)
        rng = random.Random(args.seed)
        rows = []
        image = DEMO_IMAGE.read_bytes()
        for r in range(args.rounds):
            order = rng.sample([False, True], 2)
            for gateway in order:
                say(f"round {r + 1}/{args.rounds}: {'through the gateway' if gateway else 'direct'}")
                for row in measure(repo, gateway, levels, args.requests, args.max_tokens, image, DEMO_QUESTION, say):
                    rows.append({"round": r + 1, **row})
    record["rows"] = rows
    out = Path(args.out) if args.out else results_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway_cost.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    text = "\n".join([
        "# What the gateway costs: the same load through it and straight to tritonserver", "",
        f"- command: `{record['command']}`", f"- date: {record['date']}, git {record['git']}",
        f"- machine: {record['machine']['cpu']}, {record['machine']['cores']} cores"
        + (f" ({record['machine']['shared']})" if record['machine'].get('shared') else ""),
        f"- model: {settings['checkpoint']}; {args.rounds} rounds, each a fresh server of each kind in a new order; "
        f"{args.requests} streamed requests of {args.max_tokens} tokens per level (benchmarks/loadgen.py)", "",
        "Median over the rounds (min-max):", "", table(rows, levels), ""])
    (out / "README.md").write_text(text)
    print(text)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The CPU suite: every CPU figure of the demo model, each next to Hugging Face transformers, in one run.

    .venv/bin/python benchmarks/cpu_suite.py [--shared "what else ran"]      (about 10 minutes on 2 cores)
    facert bench all ...                                                       (the same)

Phases, in this order (each can be left out with --skip):
  serve          the demo model's onnxruntime engines in a Triton model repository, served by a
                 real tritonserver on 127.0.0.1; our asynchronous gRPC streaming load generator
                 (benchmarks/loadgen.py) at concurrency 1, 2, 4, 8: TTFT, inter-token latency,
                 request latency p50/p90/p99, requests/s, output tokens/s
  perf_analyzer  Triton's perf_analyzer on the same server (benchmarks/perf_analyzer.py), where it runs
  stages         per-stage latency at batch 1, 2, 4, 8 for onnxruntime, torch and the peer
                 (benchmarks/stages.py); `generate` with a static cache at batch 1
  compile        the peer's static cache + torch.compile at batch 1 (the compile itself is timed apart)

The peer for the server figures is transformers `generate` (eager, DynamicCache) in-process with a
batch as large as the concurrency: the same image and question, the same weights, no server in
between; its TTFT is the time to its first token, its inter-token latency its per-step time.
`--budget-s` (default 600) bounds the run: a phase that would not fit is skipped and recorded so.
Results: benchmarks/results/<date>-cpu-suite-<machine id>/ (results.json, CSVs, PNGs, README.md).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import loadgen, perf_analyzer  # noqa: E402
from benchmarks.report import load_average, md_table, new_record, results_dir, write_results  # noqa: E402
from benchmarks.stages import (  # noqa: E402
    QUESTION, ensure_model, open_pipelines, parse_list, run_stages, stage_markdown,
)

PHASES = ("serve", "perf_analyzer", "stages", "compile")
# Rough cost of the optional phases on a quiet 2-core machine (s): skipped when they would not fit.
PHASE_ESTIMATE_S = {"perf_analyzer": 40, "compile": 120}
# The server phase (start, load levels, perf_analyzer) gets this share of the budget; the stages the rest.
SERVE_SHARE = 0.4
REPORT_S = 15  # writing the results at the end


def log(message: str) -> None:
    print(f"[cpu suite {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_server(url: str, args, image: bytes, run_perf_analyzer: bool, stop_at: float) -> dict:
    """The load generator, then perf_analyzer if there is time, against the server at `url`, until `stop_at`."""
    out: dict = {"serve": [], "perf_analyzer": [], "perf_analyzer_skipped": None}
    out["serve"] = loadgen.sweep(url, args.concurrency_levels, image, QUESTION, args.max_new_tokens,
                                 requests_per_level=args.requests, max_seconds=args.level_seconds, stop_at=stop_at,
                                 log=log)
    left = stop_at - time.perf_counter()
    if run_perf_analyzer and left < PHASE_ESTIMATE_S["perf_analyzer"]:
        out["perf_analyzer_skipped"] = (f"{max(left, 0):.0f} s of the server phase's time left, it takes about "
                                        f"{PHASE_ESTIMATE_S['perf_analyzer']} s")
        log(f"perf_analyzer skipped: {out['perf_analyzer_skipped']}")
    elif run_perf_analyzer:
        try:
            out["perf_analyzer"] = perf_analyzer.run(url, args.pa_levels, image, QUESTION, args.max_new_tokens,
                                                     requests_per_window=args.pa_window,
                                                     timeout_s=left / len(args.pa_levels), log=log)
        except perf_analyzer.PerfAnalyzerUnavailable as e:
            out["perf_analyzer_skipped"] = str(e)
            log(f"perf_analyzer skipped: {e}")
    return out


def serve_phase(engines: Path, args, image: bytes, run_perf_analyzer: bool, work: Path, stop_at: float) -> dict:
    """Fill a repository from the engines, start tritonserver on loopback, load it, stop it."""
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports

    repo = work / "bench_repository"
    fill_repository(repo, engines=engines, backend="onnxruntime", max_batch_size=max(args.concurrency_levels),
                    overwrite=True)
    http_port, grpc_port, metrics_port = free_ports(3)
    server_log: list[str] = []
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log=server_log.append, provision_log=log)
    t0 = time.perf_counter()
    server.start(timeout_s=300)
    start_s = round(time.perf_counter() - t0, 2)
    log(f"tritonserver ready in {start_s} s at {server.grpc_url}")
    try:
        out = load_server(server.grpc_url, args, image, run_perf_analyzer, stop_at)
    finally:
        server.stop()
    return dict(out, server_start_s=start_s)


def peer_rows(requests: list[dict], peer: str = "transformers") -> list[dict]:
    """The peer at batch = concurrency, in the server table's terms."""
    return [{"backend": peer, "concurrency": r["batch"], "ttft_ms": r["ttft_ms"], "itl_ms": r["itl_ms"],
             "latency_ms": r["end_to_end_ms"], "requests_per_s": r["requests_per_s"],
             "output_tokens_per_s": r["output_tokens_per_s"]} for r in requests if r["backend"] == peer]


def summary_table(tables: dict, peer: str = "transformers") -> str | None:
    """The headline figures: in-process backends and the server, each with its ratio to the peer."""
    requests = tables.get("requests") or []
    if not requests:
        return None
    e2e = {(r["backend"], r["batch"]): r for r in requests}
    served = {r["concurrency"]: r for r in tables.get("serve") or [] if r["requests"]}
    top = max(r["batch"] for r in requests)
    backends = [b for b in ("onnxruntime", "torch") if (b, 1) in e2e]
    figures = [  # (label, batch, key in requests rows, key in serve rows, higher is better)
        ("time to first token, batch 1 (ms)", 1, "ttft_ms", "ttft_ms_p50", False),
        ("per-token latency, batch 1 (ms)", 1, "itl_ms", "itl_ms_p50", False),
        ("request latency, batch 1 (ms)", 1, "end_to_end_ms", "latency_ms_p50", False),
        (f"requests/s, batch = concurrency {top}", top, "requests_per_s", "requests_per_s", True),
        (f"output tokens/s, batch = concurrency {top}", top, "output_tokens_per_s", "output_tokens_per_s", True),
    ]
    header = ["figure", *backends, "served (p50)", peer, *[f"{b} vs {peer}" for b in backends], f"served vs {peer}"]
    rows = []
    for label, batch, key, serve_key, higher in figures:
        ref = e2e.get((peer, batch), {}).get(key)
        values = [e2e.get((b, batch), {}).get(key) for b in backends]
        srv = served.get(batch, {}).get(serve_key)

        def ratio(x):
            if not x or not ref:
                return None
            return f"{(x / ref if higher else ref / x):.2f}x"

        rows.append([label, *values, srv, ref, *[ratio(v) for v in values], ratio(srv)])
    return md_table(header, rows)


def markdown(record: dict, tables: dict) -> str:
    m, v, s = record["machine"], record["versions"], record["settings"]
    model = ("demo (SmolLM2-135M-Instruct LLM, fp32; seeded random vision tower, parser, seg branch, attribute head)"
             if s["spec"] == "demo" else f"{s['spec']} (seeded random weights)")
    lines = [f"# CPU suite, {s['spec']} model — {record['date'][:10]}", "",
             f"- command: `{record['command']}` (git {record['git']})",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']} (id {m['id']}); load average "
             f"{m['load_average']} at the start, {record.get('load_average_end')} at the end"]
    if m.get("shared"):
        lines.append(f"- **shared machine**: {m['shared']}")
    lines += [
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- model: {model}; one image ({s['image']}), one question, {s['prompt_tokens']} prompt tokens, "
        f"{s['max_new_tokens']} new tokens (greedy)",
        f"- wall time: {record['wall_s']:.0f} s ({', '.join(f'{k} {x:.0f} s' for k, x in record['phase_s'].items())})",
        "",
    ]
    if record.get("completed") != "all":
        lines += [f"**Partial results**: the run had completed these phases: {record.get('completed')}.", ""]
    summary = summary_table(tables)
    if summary:
        lines += ["## Summary", "",
                  "In-process backends and the served model (Triton, onnxruntime engines, gRPC streaming; "
                  "p50 at concurrency = batch) against transformers `generate` (eager) on the same weights, "
                  "image and prompt. Ratios > 1 mean facert is faster.", "", summary, ""]
    if tables.get("serve"):
        lines += ["## Served (Triton, onnxruntime engines, gRPC streaming, closed loop)", "",
                  "Peer: transformers `generate` (eager) in-process, batch = concurrency, same image/question/weights. "
                  "Ratios > 1 mean facert is better.", "",
                  loadgen.serve_table(tables["serve"], tables.get("peer")), "",
                  "![latency](latency_vs_concurrency.png) ![throughput](throughput_vs_concurrency.png)", ""]
    if tables.get("perf_analyzer"):
        pa = [r for r in tables["perf_analyzer"] if "error" not in r]
        peer = {p["concurrency"]: p for p in tables.get("peer", [])}
        rows = [[r["concurrency"], r.get("measured_requests"), r.get("ttft_ms_p50"), r.get("latency_ms_p50"),
                 r.get("latency_ms_p99"), r["requests_per_s"],
                 f"{r['requests_per_s'] / peer[r['concurrency']]['requests_per_s']:.2f}x"
                 if r["concurrency"] in peer else None] for r in pa]
        lines += ["## perf_analyzer (tritonclient 2.51.0, streaming, count_windows)", "",
                  md_table(["concurrency", "requests", "TTFT p50 ms", "latency p50 ms", "latency p99 ms",
                            "requests/s", "throughput vs peer"], rows), ""]
        lines += [f"- concurrency {r['concurrency']}: {r['error']}" for r in tables["perf_analyzer"] if "error" in r]
    if record.get("perf_analyzer_skipped"):
        lines += [f"perf_analyzer skipped: {record['perf_analyzer_skipped']}", ""]
    if tables.get("stages"):
        lines += ["## Per stage, in-process", ""]
        for b in sorted({r["batch"] for r in tables["requests"]}):
            lines += [stage_markdown(tables["stages"], tables["requests"], batch=b), ""]
        lines += ["![stages](stages.png)", ""]
    if record.get("peer_errors"):
        lines += ["Peers that did not run: " + "; ".join(f"{k}: {e}" for k, e in record["peer_errors"].items()), ""]
    if record.get("peer_first_call_s"):
        lines += ["First call of each extra peer (for transformers-compile: mostly torch.compile, shorter when "
                  "inductor's on-disk cache already holds the kernels): "
                  + ", ".join(f"{k} {x} s" for k, x in record["peer_first_call_s"].items()), ""]
    if record.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {x}" for k, x in record["skipped"].items()), ""]
    lines += ["Notes: medians after a warm-up, backends interleaved run by run; a batch whose rounds disagree "
              f"by more than {record['settings']['max_spread']}x (another process stalled some) is measured again, up "
              "to 3 attempts within the budget, and the attempt whose rounds agree best is kept (the `attempts` "
              "column of requests.csv). Decode is one step for the whole batch (tokens/s = batch / step time). "
              "`transformers` runs the same vision, parser, seg and "
              "attribute modules as `torch` (those are facert's torch backend), so its ratios differ only in the "
              "LLM stages and in detokenisation.", ""]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--work", default=str(ROOT / "demo_out"),
                    help="where the checkpoint and onnxruntime engines live (built there once; default demo_out/)")
    ap.add_argument("--spec", default="demo", help="model spec (default demo; tiny for a quick smoke run)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer (default 16)")
    ap.add_argument("--url", help="load this running server (gRPC HOST:PORT on this machine) instead of starting "
                    "one on the model's onnxruntime engines")
    ap.add_argument("--concurrency", default="1,2,4,8", help="server load levels (default 1,2,4,8)")
    ap.add_argument("--requests", type=int, help="requests per level (default 2 x concurrency + 2)")
    ap.add_argument("--level-seconds", type=float, default=60, help="stop a level's new requests after (default 60)")
    ap.add_argument("--pa-concurrency", default="1,2", help="perf_analyzer levels (default 1,2)")
    ap.add_argument("--pa-window", type=int, default=3, help="perf_analyzer count_windows size (default 3)")
    ap.add_argument("--batches", default="1,2,4,8", help="stage batch sizes (default 1,2,4,8)")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds per stage batch (default 3)")
    ap.add_argument("--max-spread", type=float, default=1.5,
                    help="re-measure (up to 3 attempts, within the budget) a stage batch whose rounds differ by more "
                         "than this factor, max/min (default 1.5)")
    ap.add_argument("--skip", default="", help=f"phases to leave out, comma-separated, from {','.join(PHASES)}")
    ap.add_argument("--budget-s", type=float, default=600, help="wall-time budget; optional phases that would not "
                    "fit are skipped (default 600)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="in-process intra-op threads")
    ap.add_argument("--shared", default="", help="a note on other load on the machine, recorded as is")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-cpu-suite-<machine id>)")


def run(args) -> int:
    from runtime.cli import DEMO_IMAGE
    from runtime.client import RemoteError
    from runtime.serving.repo import RepositoryError
    from runtime.serving.server import ServerError

    t_start = time.perf_counter()
    args.concurrency_levels = parse_list(args.concurrency, "--concurrency")
    args.pa_levels = parse_list(args.pa_concurrency, "--pa-concurrency")
    batches = parse_list(args.batches, "--batches")
    skip = {p for p in args.skip.split(",") if p}
    if skip - set(PHASES):
        raise SystemExit(f"--skip takes phases from {PHASES}, got {sorted(skip - set(PHASES))}")
    work = Path(args.work)
    image = DEMO_IMAGE.read_bytes()
    record = new_record("cpu_suite", shared=args.shared, settings={
        "spec": args.spec, "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency_levels,
        "server": args.url or "started by the suite (onnxruntime engines, portable repository)",
        "requests_per_level": args.requests, "level_seconds": args.level_seconds, "perf_analyzer": args.pa_levels,
        "batches": batches, "repeats": args.repeats, "max_spread": args.max_spread, "threads": args.threads,
        "question": QUESTION,
        "image": DEMO_IMAGE.name, "budget_s": args.budget_s})
    tables: dict[str, list] = {}
    phase_s: dict[str, float] = {}
    skipped: dict[str, str] = {}

    def remaining() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    out = Path(args.out) if args.out else results_dir("cpu-suite")

    def finish(done: str) -> None:
        """Write what there is so far (a run stopped later still leaves its results)."""
        record["completed"] = done
        record["settings"].setdefault("prompt_tokens", None)
        record["skipped"] = skipped
        record["phase_s"] = {k: round(x, 1) for k, x in phase_s.items()}
        record["wall_s"] = round(time.perf_counter() - t_start, 1)
        record["load_average_end"] = load_average()
        write_results(out, record, tables, markdown=markdown(record, tables))

    ckpt = engines = None
    if "stages" not in skip or ("serve" not in skip and not args.url):
        t0 = time.perf_counter()
        ckpt, engines = ensure_model(work, args.spec, log=log)
        phase_s["setup"] = time.perf_counter() - t0

    if "serve" in skip:
        skipped["serve"] = skipped["perf_analyzer"] = "--skip"
    else:
        t0 = time.perf_counter()
        run_pa = "perf_analyzer" not in skip
        share = SERVE_SHARE if "stages" not in skip else 1.0
        stop_at = t0 + remaining() * share - (0 if "stages" not in skip else REPORT_S)
        try:
            if args.url:
                served = dict(load_server(args.url, args, image, run_pa, stop_at), server_start_s=None)
            else:
                served = serve_phase(engines, args, image, run_pa, work, stop_at)
        except (ServerError, RepositoryError, RemoteError, loadgen.LoadError) as e:
            print(f"cpu suite: error: the server phase failed: {e}", file=sys.stderr)
            return 2
        tables["serve"], tables["perf_analyzer"] = served["serve"], served["perf_analyzer"]
        record["server_start_s"] = served["server_start_s"]
        record["perf_analyzer_skipped"] = served["perf_analyzer_skipped"] or ("--skip" if not run_pa else None)
        left_out = [c for c in args.concurrency_levels if c not in {r["concurrency"] for r in served["serve"]}]
        if left_out:
            skipped["serve"] = f"concurrency {left_out}: out of the server phase's time"
        phase_s["serve"] = time.perf_counter() - t0
        finish("serve")

    if "stages" not in skip:
        t0 = time.perf_counter()
        ort_pipe, torch_pipe = open_pipelines(ckpt, engines, args.threads)
        peers = ("transformers", "transformers-static")
        stop_at = t0 + remaining() - REPORT_S
        # re-measure a batch whose rounds disagree while that leaves the compile phase its time
        res = run_stages(ort_pipe, torch_pipe, image, batches, args.max_new_tokens, args.repeats, peers=peers,
                         peer_batches={"transformers-static": batches[:1]}, max_spread=args.max_spread,
                         max_attempts=3, retry_until=stop_at - PHASE_ESTIMATE_S["compile"], stop_at=stop_at, log=log)
        phase_s["stages"] = time.perf_counter() - t0
        if res["skipped_batches"]:
            skipped["stages"] = f"batches {res['skipped_batches']}: out of the budget"
        tables["stages"], tables["requests"] = res["stages"], res["requests"]
        tables["peer"] = peer_rows(res["requests"])
        record["peer_errors"], record["peer_first_call_s"] = res["peer_errors"], res["peer_first_call_s"]
        record["settings"]["prompt_tokens"] = res["requests"][0]["prompt_tokens"] if res["requests"] else None
        finish("serve, stages" if "serve" not in skip else "stages")
        if "compile" in skip:
            skipped["compile"] = "--skip"
        elif remaining() - REPORT_S < PHASE_ESTIMATE_S["compile"]:
            skipped["compile"] = f"{remaining():.0f} s of the budget left, it takes {PHASE_ESTIMATE_S['compile']} s"
        else:
            t0 = time.perf_counter()
            comp = run_stages(None, torch_pipe, image, batches[:1], args.max_new_tokens, args.repeats,
                              peers=("transformers-compile",), log=log)
            # its own rounds also timed torch again: keep only the compiled peer's rows
            tables["stages"] += [r for r in comp["stages"] if r["backend"] == "transformers-compile"]
            tables["requests"] += [r for r in comp["requests"] if r["backend"] == "transformers-compile"]
            record["peer_errors"].update(comp["peer_errors"])
            record["peer_first_call_s"].update(comp["peer_first_call_s"])
            phase_s["compile"] = time.perf_counter() - t0
        del ort_pipe, torch_pipe
        gc.collect()
    else:
        skipped["stages"] = skipped["compile"] = "--skip"

    finish("all")
    print(markdown(record, tables))
    log(f"wrote {out} in {record['wall_s']:.0f} s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

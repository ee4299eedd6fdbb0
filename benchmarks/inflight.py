"""Static vs in-flight batching of the served LLM step: one server build, the same workloads, one run.

    python benchmarks/inflight.py [--engines DIR] [--rates 0.1,0.2,0.4] [--duration 90] [--rounds 3]
        [--faces 4] [--out DIR] [--shared "what else ran on the machine"]

Every server is the same build: one repository per configuration, filled from the same onnxruntime
engines (the demo model's by default, built into demo_out/ on first use) with the same settings but
the llm step's scheduler and caches:

  static            `facert repo --scheduler static` (each batch the dynamic batcher hands over runs
                    to the end of its longest answer)
  inflight          the default: in-flight batching, prefix and encoder caches on
  inflight-nocache  in-flight with `--prefix-cache-mb 0 --encoder-cache-mb 0` (the five-question
                    workload only: what the caches add)

Workloads, each configuration in turn per round (rounds repeat everything, alternating the order,
so that a verdict stands on several runs with their spread on a machine whose load moves):

  open loop         for each rate of --rates: Poisson arrivals (benchmarks/loadgen.py) for --duration
                    seconds; every request its own image (a distinct crop of the face photo: no cache
                    can help), a question asking for a long answer, MAX_TOKENS drawn log-uniformly
                    from 8..256. The same seed gives both schedulers the same plan.
  same face         --faces faces, each asked five different questions one after the other (closed
                    loop, nothing else running): time to first token of the first question against
                    the four that follow.

Figures use genai-perf's names (time_to_first_token, inter_token_latency, request_latency,
output_sequence_length, request_throughput, output_token_throughput) and are checked against the
issue's goals: at each offered rate, in-flight TTFT p90 at most half of static's and output tokens/s
at least 1.5x; the repeated face's TTFT at least 3x lower with the caches than without. Where a goal
is missed, the server's own timings (per stage, and the llm step's queue, prefill and decode) say
what bound it. Results: benchmarks/results/<date>-inflight-<machine>/ (results.json, CSVs, plots,
README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import (Planned, genai_perf_metrics, log_uniform_tokens, poisson_times,  # noqa: E402
                                run_open_loop)

CONFIGS = {
    "static": {"scheduler": "static"},
    "inflight": {"scheduler": "inflight"},
    "inflight-nocache": {"scheduler": "inflight", "prefix_cache_mb": 0, "encoder_cache_mb": 0},
}
LONG_QUESTIONS = (
    "Describe this person in as much detail as you can: face, hair, eyes, expression, clothing and background.",
    "Write a long, detailed story about the person in this photo.",
    "List everything you can see in this image, one item per line, with a sentence about each.",
    "Explain step by step how you would describe this face to someone who cannot see it.",
)
FIVE_QUESTIONS = ("Is this person smiling?", "What colour is the hair?", "Does this person wear glasses?",
                  "How old does this person look?", "Describe the background.")
MIN_TOKENS, MAX_TOKENS = 8, 256
FACE_TOKENS = 16  # the five-question answers: TTFT is the figure, a short answer keeps the run short


def log(message: str) -> None:
    print(f"[inflight] {message}", file=sys.stderr, flush=True)


def face_variants(photo: bytes, n: int, seed: int) -> list[bytes]:
    """n different PNGs of the photo (random crops of at least half its side, some mirrored)."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(photo)).convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = img.size
    out = []
    for _ in range(n):
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def open_loop_plan(rate: float, duration_s: float, seed: int, photo: bytes) -> list[Planned]:
    rng = np.random.default_rng(seed)
    times = poisson_times(rate, duration_s, rng)
    lengths = log_uniform_tokens(len(times), MIN_TOKENS, MAX_TOKENS, rng)
    images = face_variants(photo, len(times), seed + 1)
    return [Planned(t, [img], LONG_QUESTIONS[i % len(LONG_QUESTIONS)], n, tag=f"rate {rate}")
            for i, (t, n, img) in enumerate(zip(times, lengths, images))]


def server_means(records) -> dict:
    """Means of the server's own timings (TIMINGS of each answer) over the completed requests."""
    ok = [r for r in records if r.ok and r.server_timings]
    keys = sorted({k for r in ok for k in r.server_timings if k.endswith("_ms") or k == "prefix_cached_tokens"})
    return {k: round(statistics.fmean(r.server_timings[k] for r in ok if k in r.server_timings), 2) for k in keys}


def start_server(repo: Path, log_file) -> object:
    from runtime.serving.server import TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log=lambda line: print(line, file=log_file, flush=True), provision_log=log,
                          exit_timeout_s=5)
    server.start(timeout_s=900)
    return server


def warm_up(url: str, photo: bytes) -> None:
    plan = [Planned(0.0, [photo], FIVE_QUESTIONS[0], 8), Planned(0.5, [photo], LONG_QUESTIONS[0], 8)]
    asyncio.run(run_open_loop(url, plan, grace_seconds=600))


def five_questions(url: str, faces: list[bytes]) -> dict:
    """Each face asked the five questions in turn; TTFT (ms) of the first and of the repeats."""
    first, repeated, records = [], [], []
    for face in faces:
        for i, q in enumerate(FIVE_QUESTIONS):
            (r,) = asyncio.run(run_open_loop(url, [Planned(0.0, [face], q, FACE_TOKENS, tag=f"q{i + 1}")],
                                             grace_seconds=600))
            records.append(r)
            if r.ok and r.token_times:
                (first if i == 0 else repeated).append((r.token_times[0] - r.sent) * 1e3)
    return {"first_ttft_ms": first, "repeated_ttft_ms": repeated, "server": server_means(records),
            "errors": sum(r.error is not None for r in records),
            "prefix_cached_tokens": [r.server_timings.get("prefix_cached_tokens") for r in records if r.ok]}


def run_config(name: str, engines: Path, work: Path, args, photo: bytes, faces: list[bytes], round_no: int,
               log_file) -> dict:
    from runtime.serving.repo import fill_repository

    repo = work / f"repo-{name}"
    fill_repository(repo, engines=engines, overwrite=True, max_batch_size=args.max_batch,
                    max_queue_size=args.max_queue_size, **CONFIGS[name])
    log(f"round {round_no}: {name}: starting tritonserver")
    server = start_server(repo, log_file)
    out = {"config": name, "round": round_no, "open_loop": [], "five_questions": None}
    try:
        warm_up(server.grpc_url, photo)
        if name != "inflight-nocache":
            for rate in args.rates:
                plan = open_loop_plan(rate, args.duration, args.seed + round_no * 1000 + int(rate * 1000), photo)
                t0 = time.monotonic()
                records = asyncio.run(run_open_loop(server.grpc_url, plan, grace_seconds=args.grace))
                m = genai_perf_metrics(records)
                row = {"config": name, "round": round_no, "rate": rate, "planned": len(plan),
                       "wall_s": round(time.monotonic() - t0, 1), **flatten(m), "server": server_means(records),
                       # faults of tritonserver 2.51 during the run (a stub or the server restarted)
                       "server_restarts": len(server.restarts),
                       "stub_recoveries": len(server.supervisor.recoveries) if server.supervisor else 0}
                out["open_loop"].append(row)
                log(f"round {round_no}: {name} at {rate}/s: {m['request_count']['avg']}/{len(plan)} done, TTFT p90 "
                    f"{m['time_to_first_token']['p90']} ms, {m['output_token_throughput']['avg']} tok/s")
        if name != "static" or args.five_on_static:
            out["five_questions"] = five_questions(server.grpc_url, faces)
            f = out["five_questions"]
            log(f"round {round_no}: {name}: five questions: first TTFT median "
                f"{_median(f['first_ttft_ms'])} ms, repeated {_median(f['repeated_ttft_ms'])} ms")
    finally:
        server.stop()
    return out


def flatten(m: dict) -> dict:
    row = {}
    for name, stats in m.items():
        for k, v in stats.items():
            if k != "unit":
                row[f"{name}_{k}"] = v
    return row


def _median(values):
    return round(statistics.median(values), 1) if values else None


def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}–{max(values):.1f})" if len(values) > 1 else f"{med:.1f}"


def summarize(runs: list[dict], rates: list[float]) -> dict:
    """Per rate: both schedulers' medians over the rounds (with min-max), the ratios and the goals."""
    rows, goals = [], []
    for rate in rates:
        per = {c: [r for run in runs for r in run["open_loop"] if r["config"] == c and r["rate"] == rate]
               for c in ("static", "inflight")}
        row = {"rate": rate}
        for c, rs in per.items():
            for key in ("time_to_first_token_p50", "time_to_first_token_p90", "time_to_first_token_p99",
                        "inter_token_latency_p50", "inter_token_latency_p90", "inter_token_latency_p99",
                        "token_gap_p99", "request_throughput_avg", "output_token_throughput_avg",
                        "output_sequence_length_avg", "request_count_avg", "unfinished_count_avg", "error_count_avg"):
                row[f"{c}_{key}"] = [r.get(key) for r in rs]
            for key in ("llm_queue_ms", "prefill_ms", "decode_ms", "vision_ms", "parser_ms", "preprocess_ms"):
                row[f"{c}_server_{key}"] = [r["server"].get(key) for r in rs]
        pairs = list(zip(row["static_time_to_first_token_p90"], row["inflight_time_to_first_token_p90"]))
        row["ttft_p90_ratio"] = [s / i for s, i in pairs if s and i]
        pairs = list(zip(row["static_output_token_throughput_avg"], row["inflight_output_token_throughput_avg"]))
        row["tok_s_ratio"] = [i / s for s, i in pairs if s and i]
        rows.append(row)
        goals.append({"rate": rate,
                      "ttft_p90_half": bool(row["ttft_p90_ratio"]) and statistics.median(row["ttft_p90_ratio"]) >= 2,
                      "tok_s_1_5x": bool(row["tok_s_ratio"]) and statistics.median(row["tok_s_ratio"]) >= 1.5})
    five = {}
    for c in ("static", "inflight", "inflight-nocache"):
        fs = [run["five_questions"] for run in runs if run["config"] == c and run["five_questions"]]
        if fs:
            five[c] = {"first": [_median(f["first_ttft_ms"]) for f in fs],
                       "repeated": [_median(f["repeated_ttft_ms"]) for f in fs],
                       "server": [f["server"] for f in fs]}
    if "inflight" in five and "inflight-nocache" in five:
        ratios = [n / c for c, n in zip(five["inflight"]["repeated"], five["inflight-nocache"]["repeated"]) if c and n]
        five["repeated_ratio_nocache_over_cache"] = ratios
        goals.append({"five_questions_3x": bool(ratios) and statistics.median(ratios) >= 3})
    return {"rates": rows, "five_questions": five, "goals": goals}


def markdown(record: dict, summary: dict) -> str:
    from benchmarks.report import md_table

    m = record["machine"]
    lines = [f"# Static vs in-flight batching: the served LLM step ({record['settings']['model']})", "",
             f"- command: `{record['command']}`",
             f"- date: {record['date']}, git {record['git']}",
             f"- machine: {m.get('cpu')}, {m.get('cores')} cores; load average (1, 5, 15 min) at the start "
             f"{m.get('load_average')}, at the end {record.get('load_after')}",
             f"- shared: {m.get('shared') or 'no note'}",
             f"- settings: {record['settings']}", "",
             "Medians over the rounds, (min–max) beside them. genai-perf's names: time_to_first_token (TTFT), "
             "inter_token_latency (per request: (latency - TTFT) / (tokens - 1)), output_token_throughput, "
             "request_throughput; token_gap is every gap between two tokens (stalls).", "",
             "## Open loop: Poisson arrivals, every request its own image, MAX_TOKENS 8..256", ""]
    header = ["offered req/s", "scheduler", "done / unfinished", "TTFT p50 / p90 / p99 ms", "ITL p50 / p90 / p99 ms",
              "token gap p99 ms", "requests/s", "output tokens/s", "output tokens mean", "server: queue / prefill / "
              "decode ms (llm)"]
    table = []
    for row in summary["rates"]:
        for c in ("static", "inflight"):
            def g(key):
                return row[f"{c}_{key}"]
            table.append([row["rate"], c, f"{_spread(g('request_count_avg'))} / {_spread(g('unfinished_count_avg'))}",
                          " / ".join(_spread(g(f"time_to_first_token_p{p}")) for p in (50, 90, 99)),
                          " / ".join(_spread(g(f"inter_token_latency_p{p}")) for p in (50, 90, 99)),
                          _spread(g("token_gap_p99")), _spread(g("request_throughput_avg")),
                          _spread(g("output_token_throughput_avg")), _spread(g("output_sequence_length_avg")),
                          " / ".join(_spread(g(f"server_{k}")) for k in ("llm_queue_ms", "prefill_ms", "decode_ms"))])
    lines += [md_table(header, table), ""]
    header = ["offered req/s", "TTFT p90 static / in-flight (goal >= 2x)", "output tokens/s in-flight / static (goal >= 1.5x)"]
    lines += [md_table(header, [[r["rate"], _spread(r["ttft_p90_ratio"]) + "x", _spread(r["tok_s_ratio"]) + "x"]
                                for r in summary["rates"]]), ""]
    five = summary["five_questions"]
    if five:
        lines += ["## Same face, five questions (closed loop, one at a time)", ""]
        header = ["server", "TTFT first question ms", "TTFT questions 2-5 ms", "server prefix-cached tokens / prefill ms"]
        table = []
        for c in ("static", "inflight", "inflight-nocache"):
            if c in five:
                f = five[c]
                table.append([c, _spread(f["first"]), _spread(f["repeated"]),
                              " / ".join(_spread([s.get(k) for s in f["server"]]) for k in ("prefix_cached_tokens",
                                                                                            "prefill_ms"))])
        lines += [md_table(header, table), ""]
        if "repeated_ratio_nocache_over_cache" in five:
            lines += [f"Repeated-face TTFT, caches off / on: {_spread(five['repeated_ratio_nocache_over_cache'])}x "
                      "(goal >= 3x).", ""]
    lines += ["## Goals", "", "```", *[str(g) for g in summary["goals"]], "```", ""]
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> Path | None:
    """TTFT p90 and output tokens/s against the offered rate, both schedulers (median, min-max bars)."""
    from benchmarks.report import _pyplot

    rows = summary["rates"]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "time_to_first_token_p90", "time to first token p90 (ms)"),
                           (axes[1], "output_token_throughput_avg", "output tokens / s")):
        for c in ("static", "inflight"):
            xs, med, lo, hi = [], [], [], []
            for r in rows:
                vals = [v for v in r[f"{c}_{key}"] if v is not None]
                if vals:
                    xs.append(r["rate"])
                    med.append(statistics.median(vals))
                    lo.append(med[-1] - min(vals))
                    hi.append(max(vals) - med[-1])
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=c)
        ax.set_xlabel("offered load (requests / s, Poisson)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "inflight_vs_static.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from benchmarks.report import load_average, new_record, results_dir, write_results
    from benchmarks.stages import ensure_model
    from runtime.cli import DEMO_IMAGE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--engines", help="onnxruntime engines folder (default: the demo's, built into --work)")
    ap.add_argument("--work", default="demo_out", help="where the demo model is built and the repositories go")
    ap.add_argument("--rates", default="0.1,0.2,0.4", help="offered requests per second, comma-separated")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per rate (default 90)")
    ap.add_argument("--grace", type=float, default=300.0, help="seconds the last requests may take after the last "
                                                               "arrival before they count as unfinished")
    ap.add_argument("--rounds", type=int, default=3, help="repeat everything this many times (default 3)")
    ap.add_argument("--faces", type=int, default=4, help="faces in the five-question workload (default 4)")
    ap.add_argument("--five-on-static", action="store_true", help="also run the five-question workload on static")
    ap.add_argument("--max-batch", type=int, default=8, help="max_batch_size (and in-flight KV-cache slots), both")
    ap.add_argument("--max-queue-size", type=int, default=256, help="queue bound of every step (default 256: an "
                                                                    "open loop must not be refused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-inflight-<machine>)")
    ap.add_argument("--shared", help="what else ran on the machine")
    args = ap.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)  # the repositories and the servers' log go here, engines given or not
    if args.engines:
        engines = Path(args.engines)
    else:
        _, engines = ensure_model(work, log=log)
    photo = DEMO_IMAGE.read_bytes()
    faces = face_variants(photo, args.faces, args.seed + 99)
    out = Path(args.out) if args.out else results_dir("inflight")
    out.mkdir(parents=True, exist_ok=True)
    record = new_record("inflight", shared=args.shared,
                        settings={"model": engines.name, "engines": str(engines), "rates": args.rates,
                                  "duration_s": args.duration, "rounds": args.rounds, "faces": args.faces,
                                  "max_batch": args.max_batch, "max_queue_size": args.max_queue_size,
                                  "max_tokens": [MIN_TOKENS, MAX_TOKENS], "face_tokens": FACE_TOKENS,
                                  "seed": args.seed, "configs": CONFIGS})
    runs = []
    with open(work / "inflight-tritonserver.log", "w") as log_file:  # the servers' log: not a result
        for round_no in range(1, args.rounds + 1):
            order = ["static", "inflight", "inflight-nocache"]
            if round_no % 2 == 0:
                order = order[::-1]
            for name in order:
                runs.append(run_config(name, engines, work, args, photo, faces, round_no, log_file))
                summary = summarize(runs, args.rates)
                record.update(load_after=load_average(), runs=runs, summary=summary)
                write_results(out, record, {"open_loop": [r for run in runs for r in run["open_loop"]]},
                              markdown(record, summary))
                plot(summary, out)
    log(f"wrote {out}")
    print(markdown(record, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

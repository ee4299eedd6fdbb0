"""What the OpenAI-compatible endpoint adds to a request, against the same request over gRPC.

    .venv/bin/python benchmarks/openai_overhead.py [--spec tiny] [--requests 200] [--runs 3] [--max-tokens 16]
        [--out benchmarks/results/DATE-openai-overhead] [--shared "what else ran on the machine"]

Starts tritonserver on a fresh checkpoint of --spec (seeded, built in a temporary folder) behind
facert's gateway serving the endpoint (TritonServer(openai_port=...), as `facert serve
--openai-port` does), then sends the same workload both ways, one request at a time, alternating
(gRPC then OpenAI, then OpenAI then gRPC, ...) so that both see the same machine: the astronaut
photo and one question, MAX_TOKENS new tokens, greedy, streamed (gRPC: the ensemble's stream with
STREAM=true, tritonclient.grpc.aio, one stream per request on one channel; OpenAI: `POST
/v1/chat/completions` with the image as a data URL, `stream: true`, on one keep-alive connection,
aiohttp). Both clients are benchmarks/loadgen.py's.

Reported per run: request latency and TTFT p50/p99 per protocol; the added latency as the
difference of the p50s and of the p99s, and as the p50/p99 of the paired differences (each OpenAI
request against the gRPC request next to it); the same for the time each request spends outside
the server's own account of it (latency less the server's total_ms, which both protocols report):
on a busy machine the generation's variance swamps the first, not the second; and the gateway
process's CPU time per request of each protocol (its main thread's, the event loop that serves
both, from /proc's schedstat, counted around each request, less what it spends idle, measured for
20 s before and after each run): their difference is the endpoint's own work, and the other load
on the machine disturbs it much less than the latencies. Writes results.json and README.md under
--out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import RequestRecord, _openai_user, _user, openai_body  # noqa: E402

def cpu_seconds(pid: int) -> float:
    """CPU time so far of a process's main thread (the gateway's event loop, where the endpoint runs;
    gRPC's own threads spend little): the scheduler's count of nanoseconds on a CPU, not ticks."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def pct(values, p) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), p)), 2)


async def idle_cpu_per_s(pid: int, seconds: float) -> float:
    """CPU seconds per second the process's main thread spends while no request is sent."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)


async def paired_run(grpc_url: str, openai_url: str, model: str, image: bytes, question: str, max_tokens: int,
                     requests: int, warmup: int, gateway_pid: int, idle_s: float = 20.0) -> dict:
    """`requests` pairs, alternating which protocol goes first; returns the run's figures."""
    import aiohttp
    import tritonclient.grpc.aio as aioclient

    from runtime.client import Request, _grpc_inputs
    from runtime.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens).validate()
    body = openai_body(model, image, question, max_tokens)
    grpc_client = aioclient.InferenceServerClient(grpc_url)
    records = {"grpc": [], "openai": []}
    cpu = {"grpc": 0.0, "openai": 0.0}  # the gateway's CPU seconds during each protocol's requests
    busy = {"grpc": 0.0, "openai": 0.0}  # and their wall seconds

    def once():
        left = [1]

        def claim():
            left[0] -= 1
            return left[0] >= 0
        return claim

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def one(protocol: str, into: list) -> None:
            if protocol == "grpc":
                await _user(grpc_client, model, lambda: _grpc_inputs(Request([image], question), params, True),
                            once(), into)
            else:
                await _openai_user(session, openai_url, body, once(), into)

        try:
            for _ in range(warmup):
                await one("grpc", [])
                await one("openai", [])
            idle_before = await idle_cpu_per_s(gateway_pid, idle_s)
            t0 = time.perf_counter()
            for i in range(requests):
                for protocol in (("grpc", "openai") if i % 2 == 0 else ("openai", "grpc")):
                    cpu0, wall0 = cpu_seconds(gateway_pid), time.perf_counter()
                    await one(protocol, records[protocol])
                    cpu[protocol] += cpu_seconds(gateway_pid) - cpu0
                    busy[protocol] += time.perf_counter() - wall0
            wall_s = time.perf_counter() - t0
            idle_after = await idle_cpu_per_s(gateway_pid, idle_s)
        finally:
            await grpc_client.close()
    bad = [r.error or "no answer" for rs in records.values() for r in rs if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed; first: {bad[0]}")
    lat = {p: [(r.done - r.sent) * 1e3 for r in rs] for p, rs in records.items()}
    # what a request spends outside the server's own account of it (its total_ms: from preprocessing
    # to the last response): the clients, the transport and, for OpenAI, the endpoint. Taking the
    # server's time out leaves what the generation's own variance (large on a busy machine) hides.
    outside = {p: [(r.done - r.sent) * 1e3 - r.server_timings["total_ms"] for r in rs] for p, rs in records.items()}
    ttft = {p: [(r.token_times[0] - r.sent) * 1e3 for r in rs] for p, rs in records.items()}
    tokens = {p: sorted({r.tokens for r in rs}) for p, rs in records.items()}
    diffs = [o - g for o, g in zip(lat["openai"], lat["grpc"])]
    outside_diffs = [o - g for o, g in zip(outside["openai"], outside["grpc"])]
    row = {"pairs": requests, "wall_s": round(wall_s, 1), "output_tokens": tokens}
    for p in ("grpc", "openai"):
        row[f"{p}_latency_p50_ms"], row[f"{p}_latency_p99_ms"] = pct(lat[p], 50), pct(lat[p], 99)
        row[f"{p}_ttft_p50_ms"] = pct(ttft[p], 50)
    row["added_p50_ms"] = round(row["openai_latency_p50_ms"] - row["grpc_latency_p50_ms"], 2)
    row["added_p99_ms"] = round(row["openai_latency_p99_ms"] - row["grpc_latency_p99_ms"], 2)
    row["paired_diff_p50_ms"], row["paired_diff_p99_ms"] = pct(diffs, 50), pct(diffs, 99)
    for p in ("grpc", "openai"):
        row[f"{p}_outside_p50_ms"], row[f"{p}_outside_p99_ms"] = pct(outside[p], 50), pct(outside[p], 99)
    row["added_outside_p50_ms"] = round(row["openai_outside_p50_ms"] - row["grpc_outside_p50_ms"], 2)
    row["added_outside_p99_ms"] = round(row["openai_outside_p99_ms"] - row["grpc_outside_p99_ms"], 2)
    row["paired_outside_diff_p50_ms"] = pct(outside_diffs, 50)
    row["paired_outside_diff_p99_ms"] = pct(outside_diffs, 99)
    # the gateway's work per request of each protocol: its CPU time during them less what it spends idle
    # (uvicorn's and gRPC's timers) over as long, at the idle rate measured before and after the run;
    # the difference is the endpoint's own work
    idle_per_s = (idle_before + idle_after) / 2
    row["gateway_idle_cpu_ms_per_s"] = [round(idle_before * 1e3, 2), round(idle_after * 1e3, 2)]
    for p in ("grpc", "openai"):
        row[f"gateway_cpu_ms_per_{p}_request"] = round((cpu[p] - idle_per_s * busy[p]) * 1e3 / requests, 2)
    row["added_gateway_cpu_ms_per_request"] = round(row["gateway_cpu_ms_per_openai_request"]
                                                    - row["gateway_cpu_ms_per_grpc_request"], 2)
    return row


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("fastapi", "uvicorn", "starlette", "pydantic", "pybase64", "tritonclient",
                                    "grpcio", "aiohttp")}


def main(argv=None) -> int:
    from runtime.checkpoint import init_checkpoint
    from runtime.cli import DEMO_IMAGE, DEMO_QUESTION
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--spec", default="tiny", help="model spec of the seeded checkpoint (default tiny)")
    ap.add_argument("--requests", type=int, default=200, help="pairs per run (default 200)")
    ap.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured pairs before each run (default 3)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--question", default=DEMO_QUESTION)
    ap.add_argument("--out", help="results folder (default: print only)")
    ap.add_argument("--shared", default="", help="what else ran on the machine, for the record")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run stops its server and endpoint too
    say = lambda m: print(f"[openai-overhead] {m}", file=sys.stderr, flush=True)  # noqa: E731
    image = DEMO_IMAGE.read_bytes()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="facert-openai-") as tmp:
        ckpt = init_checkpoint(args.spec, Path(tmp) / args.spec, seed=0, progress=lambda m: None)
        fill_repository(Path(tmp) / "repo", checkpoint=ckpt)
        http_port, grpc_port, metrics_port, openai_port = free_ports(4)
        say(f"starting tritonserver on the {args.spec} checkpoint")
        server = TritonServer(Path(tmp) / "repo", http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                              log=lambda _l: None, provision_log=say, openai_port=openai_port)
        with server.start(timeout_s=600):
            from runtime.client import find_model

            model = find_model(server.grpc_url)
            openai_url = server.openai_url.split("//", 1)[1].split("/", 1)[0]
            for run in range(args.runs):
                row = asyncio.run(paired_run(server.grpc_url, openai_url, model, image, args.question,
                                             args.max_tokens, args.requests, args.warmup, server.gateway.pid))
                row["run"] = run + 1
                say(json.dumps(row))
                runs.append(row)
    load_after = os.getloadavg()
    result = {"what": "added latency of the OpenAI-compatible endpoint against gRPC, same workload",
              "command": "python benchmarks/openai_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "machine": machine(), "versions": versions(), "load_average_before": load_before,
              "load_average_after": load_after, "shared": args.shared, "spec": args.spec,
              "max_tokens": args.max_tokens, "image_bytes": len(image), "runs": runs}
    table = report(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "README.md").write_text(table)
        say(f"wrote {out}/results.json and README.md")
    return 0


def report(r: dict) -> str:
    from benchmarks.report import md_table

    header = ["run", "pairs", "gRPC latency p50 / p99 ms", "OpenAI latency p50 / p99 ms", "added p50 ms",
              "added p99 ms", "paired difference p50 / p99 ms", "outside the server, gRPC p50 / p99 ms",
              "outside the server, OpenAI p50 / p99 ms", "added outside p50 / p99 ms",
              "paired outside difference p50 / p99 ms", "TTFT p50 gRPC / OpenAI ms",
              "gateway CPU ms/request, gRPC / OpenAI (net of idle)", "added gateway CPU ms/request",
              "gateway idle CPU ms/s before / after"]
    rows = [[x["run"], x["pairs"], f"{x['grpc_latency_p50_ms']} / {x['grpc_latency_p99_ms']}",
             f"{x['openai_latency_p50_ms']} / {x['openai_latency_p99_ms']}", x["added_p50_ms"], x["added_p99_ms"],
             f"{x['paired_diff_p50_ms']} / {x['paired_diff_p99_ms']}",
             f"{x['grpc_outside_p50_ms']} / {x['grpc_outside_p99_ms']}",
             f"{x['openai_outside_p50_ms']} / {x['openai_outside_p99_ms']}",
             f"{x['added_outside_p50_ms']} / {x['added_outside_p99_ms']}",
             f"{x['paired_outside_diff_p50_ms']} / {x['paired_outside_diff_p99_ms']}",
             f"{x['grpc_ttft_p50_ms']} / {x['openai_ttft_p50_ms']}",
             f"{x['gateway_cpu_ms_per_grpc_request']} / {x['gateway_cpu_ms_per_openai_request']}",
             x["added_gateway_cpu_ms_per_request"],
             " / ".join(str(v) for v in x["gateway_idle_cpu_ms_per_s"])] for x in r["runs"]]
    m = r["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
    return (f"# OpenAI endpoint overhead against gRPC\n\n"
            f"`{r['command']}` at commit {r['commit']}, {r['date']}, on {m['cpu']} ({m['cores']} cores, "
            f"{m['memory_gb']} GB), Python {m['python']}; {libs}.\n\n"
            f"Workload: the `{r['spec']}` checkpoint (seeded) served by tritonserver 2.51 on CPU; the astronaut photo "
            f"({r['image_bytes']} bytes of PNG), one question, {r['max_tokens']} new tokens, greedy, streamed; one "
            f"request at a time, gRPC and OpenAI alternating. The machine was shared: load average "
            f"{', '.join(f'{x:.1f}' for x in r['load_average_before'])} before and "
            f"{', '.join(f'{x:.1f}' for x in r['load_average_after'])} after (1, 5, 15 min)"
            f"{'; ' + r['shared'] if r['shared'] else ''}.\n\n" + md_table(header, rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Spinning or sleeping onnxruntime workers: the LLM decode step of an engines folder, alone and with
other decoders on the same cores.

    python benchmarks/spin_probe.py ENGINES [--threads 2] [--past 322] [--steps 40] [--rounds 5]
        [--concurrent 1 2] [--out FILE.json]

For each setting of FACERT_ORT_SPIN (unset: facert's default, the decode graph's workers spin while
a step runs; "0": they sleep between ops) and each --concurrent count, that many processes each time
the decode step as the runtime runs it (OrtLLM's bound step: one token onto a --past-row cache,
batch 1, --threads intra-op threads) at once: --rounds rounds of --steps steps, ms per step, median and
min-max over every process's rounds. Settings alternate round by round of the whole sweep, so load
from elsewhere falls on all alike. What it says: how much a dedicated core set gains from spinning,
and what spinning costs when other work wants the cores (runtime/backends/onnxruntime_backend.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default (decode spins)": None, "FACERT_ORT_SPIN=0": "0"}


def bound_decode_step(engines: Path, past: int, options):
    """The LLM decode step of `engines` as the runtime runs it (OrtLLM's bound step: one token onto a
    `past`-row cache of seeded random K/V, batch 1), its graph opened with SessionOptions `options`
    -> (a function that runs one step, the decode Graph)."""
    import numpy as np
    import torch

    from runtime.backends.onnxruntime_backend import Graph, OrtLLM

    manifest = json.loads((engines / "manifest.json").read_text())
    layout = manifest["model"]["llm"]
    decode = Graph(engines / manifest["components"]["llm_decode"]["file"], ["CPUExecutionProvider"], options)
    llm = OrtLLM(decode, decode, np.zeros((layout["vocab_size"], 1), dtype=np.float32), layout)
    cache = llm.new_cache(1, past + 1)
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 1, layout["hidden_size"], generator=torch.Generator().manual_seed(1)) * 0.02
    return (lambda: llm.forward_slots(cache, embeds, 0, [past])), decode


def time_steps(engines: Path, threads: int, past: int, steps: int, rounds: int) -> list[float]:
    """ms per step of each round, in this process (the child's side)."""
    from runtime.backends.onnxruntime_backend import session_options

    step, _ = bound_decode_step(engines, past, session_options(threads, hot_loop=True))
    for _ in range(5):
        step()
    print("ready", flush=True)
    sys.stdin.readline()  # every decoder starts timing at once
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        per_round.append((time.perf_counter() - t0) / steps * 1e3)
    return per_round


def run_setting(args, spin: str | None, concurrent: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "FACERT_ORT_SPIN"}
    if spin is not None:
        env["FACERT_ORT_SPIN"] = spin
    cmd = [sys.executable, __file__, args.engines, "--child", "--threads", str(args.threads), "--past",
           str(args.past), "--steps", str(args.steps), "--rounds", "1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(concurrent)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit("spin_probe: a decoder did not start")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    times = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"spin_probe: a decoder failed (rc {p.returncode})")
        times += json.loads(out)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", help="an onnxruntime engines folder (facert build --backend onnxruntime)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of each decoder")
    ap.add_argument("--past", type=int, default=322, help="filled cache rows the step attends to")
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed in a round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrent", type=int, nargs="+", default=[1, 2],
                    help="decoders (processes) on the machine at once, one measurement each")
    ap.add_argument("--out", help="also write the results here (JSON)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(time_steps(Path(args.engines), args.threads, args.past, args.steps, args.rounds)))
        return 0
    times = {(name, c): [] for name in SETTINGS for c in args.concurrent}
    for r in range(args.rounds):
        print(f"[spin_probe] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for (name, c) in times:
            times[name, c] += run_setting(args, SETTINGS[name], c)
    rows = [{"setting": name, "concurrent": c, "ms_per_step_median": round(statistics.median(v), 2),
             "min": round(min(v), 2), "max": round(max(v), 2), "samples": len(v)} for (name, c), v in times.items()]
    for row in rows:
        print(f"{row['setting']:<24} {row['concurrent']} decoder(s): {row['ms_per_step_median']:.2f} ms/step "
              f"({row['min']:.2f}-{row['max']:.2f}, {row['samples']} rounds)")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "load_average": os.getloadavg(), "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

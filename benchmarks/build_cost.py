"""Build cost: peak memory and wall time of `facert build`, against the size of what it writes.

    .venv/bin/python benchmarks/build_cost.py --spec facellm-1b [--layers N] [--precision fp32]
        [--work /tmp/build-cost] [--code DIR] [--ask] [--results DIR] [--shared "what else ran"]

For one checkpoint (written with `facert init` into --work unless it is there already) it runs
`facert build --backend onnxruntime` in a child process and records:

  peak RSS       the child's own high-water mark (getrusage ru_maxrss via os.wait4: exact, not sampled)
  timeline       RSS sampled every 0.1 s with psutil, each sample tagged with the build step the
                 child last printed, so the peak can be attributed to a step
  wall s         the child's wall time
  folder bytes   the engines folder's size (every file), and peak RSS / folder bytes

With --ask it then times, each in a fresh process, the folder's verification alone
(runtime.engines.verify_engines) with `full` (every byte hashed, as every load did before hashes
were recorded) and `cached` (the build recorded the hashes of what it wrote), three times each,
alternating; and `facert ask --engines` (load + a 4-token answer) with --verify full, then cached.

--code DIR runs another checkout's facert (e.g. main, to measure the previous build at the same
size). Results are appended to DIR/results.json (one record per run) and DIR/README.md is
rewritten from them. The checkpoint and engines stay in --work; delete them when done (--clean
removes the engines folder after the run, the checkpoint too with --clean-checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.report import cpu_name  # noqa: E402

IMAGE = ROOT / "runtime" / "assets" / "astronaut.png"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gib(n: float) -> float:
    return round(n / 1024**3, 3)


def run_measured(cmd: list[str], env: dict, label: str) -> dict:
    """Run cmd; its exact peak RSS (ru_maxrss), wall time and a step-tagged RSS timeline."""
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    step = ["start"]
    timeline: list[tuple[float, int, str]] = []
    stderr_lines: list[str] = []
    done = threading.Event()

    def read_stderr() -> None:
        for line in child.stderr:
            stderr_lines.append(line.rstrip("\n"))
            if line.startswith("[facert"):
                step[0] = line.split("]", 1)[-1].strip()[:100]
            print(f"  [{label}] {line.rstrip()}", file=sys.stderr, flush=True)

    def sample() -> None:
        while not done.is_set():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                break
            timeline.append((round(time.perf_counter() - t0, 2), rss, step[0]))
            done.wait(0.1)

    threads = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join(timeout=5)
    stdout = child.stdout.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    peak_sampled = max(timeline, key=lambda s: s[1]) if timeline else (0, 0, "")
    by_step: dict[str, int] = {}
    for _, rss, s in timeline:
        by_step[s] = max(by_step.get(s, 0), rss)
    return {"returncode": child.returncode, "wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_sampled_at_s": peak_sampled[0], "peak_sampled_step": peak_sampled[2],
            "peak_rss_by_step_gib": {s: gib(v) for s, v in by_step.items()},
            "stdout_tail": stdout[-2000:], "stderr_tail": "\n".join(stderr_lines[-30:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="model spec for `facert init`, e.g. facellm-1b")
    ap.add_argument("--layers", type=int, default=None, help="cap the depth (full widths); default full size")
    ap.add_argument("--precision", default="fp32", help="facert build --precision")
    ap.add_argument("--work", default="/tmp/build-cost", help="where the checkpoint and engines go")
    ap.add_argument("--code", default=str(ROOT), help="the facert checkout whose build is measured")
    ap.add_argument("--no-simplify", action="store_true", help="pass --no-simplify to facert build")
    ap.add_argument("--build-args", default="", help="more `facert build` arguments, e.g. '--no-accuracy-check'")
    ap.add_argument("--ask", action="store_true", help="also time two `facert ask --engines` (4 tokens)")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results/<date>-build-cost)")
    ap.add_argument("--shared", default="", help="what else ran on the machine during the run")
    ap.add_argument("--clean", action="store_true", help="remove the engines folder after the run")
    ap.add_argument("--clean-checkpoint", action="store_true", help="remove the checkpoint after the run too")
    args = ap.parse_args(argv)

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    results = Path(args.results or ROOT / "benchmarks" / "results" / f"{date}-build-cost")
    results.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    name = args.spec + (f"-L{args.layers}" if args.layers else "")
    ckpt = work / f"ck-{name}"
    engines = work / f"engines-{name}-{args.precision}"
    code = Path(args.code).resolve()
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    facert = [sys.executable, "-m", "runtime.cli"]

    if not (ckpt / "checksums.json").exists():
        init = [*facert, "init", "--model", args.spec, "--out", str(ckpt)]
        if args.layers:
            init += ["--layers", str(args.layers)]
        subprocess.run(init, env={**env, "PYTHONPATH": str(ROOT)}, check=True)

    build = [*facert, "build", "--checkpoint", str(ckpt), "--backend", "onnxruntime", "--precision",
             args.precision, "--out", str(engines), "--force"]
    if args.no_simplify:
        build.append("--no-simplify")
    build += shlex.split(args.build_args)
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"measuring {shlex.join(build)} (code {code} @ {commit})", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    measured = run_measured(build, env, "build")
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "spec": args.spec, "layers": args.layers,
        "precision": args.precision, "build_args": args.build_args, "code": str(code), "commit": commit,
        "command": shlex.join(build),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "cpu": cpu_name(),
                    "memory_gib": gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                    "load_average_before": load_before, "shared": args.shared},
        "checkpoint_bytes": folder_bytes(ckpt), **measured,
    }
    if measured["returncode"] == 0:
        record["folder_bytes"] = folder_bytes(engines)
        record["files"] = {p.name: p.stat().st_size for p in sorted(engines.iterdir()) if p.is_file()}
        record["peak_over_folder"] = round(record["peak_rss_bytes"] / record["folder_bytes"], 2)
        record["peak_over_checkpoint"] = round(record["peak_rss_bytes"] / record["checkpoint_bytes"], 2)
        if args.ask:
            record["verify_s"] = {"full": [], "cached": []}
            for _ in range(3):
                for mode in ("full", "cached"):
                    record["verify_s"][mode].append(_time_verify(env, engines, mode))
            record["ask"] = [_time_ask(facert, env, engines, mode) for mode in ("full", "cached")]
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("_tail")}, indent=2))

    path = results / "results.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(record)
    path.write_text(json.dumps(records, indent=2) + "\n")
    write_readme(results, records)
    if args.clean:
        shutil.rmtree(engines, ignore_errors=True)
    if args.clean_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    return measured["returncode"]


def _time_verify(env: dict, engines: Path, mode: str) -> float:
    """Seconds verify_engines takes on the folder in a fresh process (imports not counted)."""
    code = ("import sys, time; from runtime.engines import verify_engines; t0 = time.perf_counter(); "
            f"verify_engines(sys.argv[1], verify_mode={mode!r}); print(time.perf_counter() - t0)")
    done = subprocess.run([sys.executable, "-c", code, str(engines)], env=env, capture_output=True, text=True,
                          check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def _time_ask(facert: list[str], env: dict, engines: Path, verify: str) -> dict:
    cmd = [*facert, "ask", str(IMAGE), "Describe this face.", "--engines", str(engines), "--max-tokens", "4",
           "--json", "--verify", verify]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return {"command": shlex.join(cmd), "verify": verify, "returncode": done.returncode,
            "wall_s": round(time.perf_counter() - t0, 1), "stderr_tail": done.stderr[-500:]}


def write_readme(results: Path, records: list[dict]) -> None:
    rows = []
    for r in records:
        ask = " / ".join(f"{a.get('verify', 'cached')} {a['wall_s']}" for a in r.get("ask", [])) or "-"
        verify = " / ".join(f"{mode} {min(v)}-{max(v)}" for mode, v in r.get("verify_s", {}).items()) or "-"
        extra = " " + r["build_args"] if r.get("build_args") else ""
        rows.append(f"| {r['date'][:16]} | {r['spec']}{' --layers ' + str(r['layers']) if r['layers'] else ''} | "
                    f"{r['precision']}{extra} | {r['commit']} | {gib(r['checkpoint_bytes'])} | "
                    f"{gib(r['folder_bytes']) if 'folder_bytes' in r else 'failed'} | {gib(r['peak_rss_bytes'])} | "
                    f"{r.get('peak_over_folder', '-')} | {r['wall_s']} | {r['peak_sampled_step'][:60]} | {verify} | {ask} | "
                    f"{' '.join(r['machine']['load_average_before'])} |")
    text = (HEADER + "\n| date (UTC) | model | precision | commit | checkpoint GiB | folder GiB | peak RSS GiB | "
            "peak / folder | wall s | step at the sampled peak | verify s (3 runs) | ask --engines s (--verify) | "
            "load avg before |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    notes = results / "NOTES.md"
    if notes.exists():
        text += "\n" + notes.read_text()
    (results / "README.md").write_text(text)


HEADER = """# facert build cost

`python benchmarks/build_cost.py --spec SPEC [--layers N] [--precision P] [--ask]` (see its docstring);
every run's full record (command, code and commit, machine, load average, RSS per build step) is in
`results.json`. Peak RSS is the build process's own high-water mark (getrusage), the folder is
every file `facert build` wrote. The machine is a shared development host (2 cores, 24 GB, other
agents' jobs running): wall times are disturbed by them, peak memory is not.
"""


if __name__ == "__main__":
    sys.exit(main())

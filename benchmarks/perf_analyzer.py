"""Drive Triton's perf_analyzer against a running `facert serve`, where it can run here.

    .venv/bin/python benchmarks/perf_analyzer.py --url 127.0.0.1:8001 [--concurrency 1,2] [--max-tokens 16]

perf_analyzer is a C++ binary that ships in the `tritonclient` wheel up to 2.51.0 (later wheels are
built against glibc 2.38). It links libb64.so.0d and libcudart.so.12, which nvidia-pytriton's
bundled libraries carry under hashed names. `provision()` puts the pieces into the git-ignored
tools folder on first use:

  tools/perf_analyzer-2.51.0/bin/perf_analyzer      unzipped from the tritonclient==2.51.0 wheel (pip download, no deps)
  tools/perf_analyzer-2.51.0/lib/libb64.so.0d       symlinks into tools/nvidia_pytriton.libs
  tools/perf_analyzer-2.51.0/lib/libcudart.so.12    (unpacked by runtime.serving.server.provision)

It runs in streaming mode (the ensemble's LLM step is decoupled, so only gRPC streaming reaches it)
with `--measurement-mode count_windows` (time windows rarely stabilise on a 2-core machine), on
one request's worth of real input: the image, the question, MAX_TOKENS, STREAM=true. It reports
requests/s and request latency percentiles from its CSV and, from its profile export, time to
first response, inter-response gaps and responses per request. When perf_analyzer cannot run
here, `PerfAnalyzerUnavailable` says why and the caller records a skip.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WHEEL = "tritonclient==2.51.0"
WHEEL_BINARY = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
NEEDED_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer cannot run on this machine; the message says why."""


def _tools_dir() -> Path:
    from runtime.serving.server import default_tools_dir

    return default_tools_dir()


def provision(tools: Path | None = None, log=print) -> tuple[Path, Path]:
    """(binary, lib folder) of perf_analyzer in the tools folder, fetched and linked if missing."""
    from runtime.serving.server import ServerError, TritonInstall
    from runtime.serving.server import provision as provision_server

    tools = Path(tools) if tools else _tools_dir()
    home = tools / "perf_analyzer-2.51.0"
    binary, libs = home / "bin" / "perf_analyzer", home / "lib"
    if not binary.exists():
        wheels = tools / ".wheels"
        found = sorted(wheels.glob("tritonclient-2.51.0-*.whl"))
        if not found:
            log(f"downloading {WHEEL} (14 MB, no dependencies) for its perf_analyzer")
            r = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
                                "-d", str(wheels)], capture_output=True, text=True)
            found = sorted(wheels.glob("tritonclient-2.51.0-*.whl"))
            if r.returncode != 0 or not found:
                raise PerfAnalyzerUnavailable(f"pip could not download {WHEEL}: {(r.stderr or r.stdout)[-500:]}")
        with zipfile.ZipFile(found[-1]) as zf:
            if WHEEL_BINARY not in zf.namelist():
                raise PerfAnalyzerUnavailable(f"{found[-1].name} holds no {WHEEL_BINARY} (not manylinux x86_64?)")
            binary.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(WHEEL_BINARY) as src, open(binary, "wb") as dst:
                shutil.copyfileobj(src, dst)
        binary.chmod(0o755)
    libs.mkdir(parents=True, exist_ok=True)
    missing = [name for name in NEEDED_LIBS if not (libs / name).exists()]
    if missing:
        try:
            bundled = TritonInstall(tools).libs
            if not bundled.is_dir():
                bundled = provision_server(tools, log=log).libs
        except ServerError as e:
            raise PerfAnalyzerUnavailable(f"nvidia-pytriton's libraries are not available: {e}") from None
        for name in missing:
            candidates = sorted(bundled.glob(NEEDED_LIBS[name]))
            if not candidates:
                raise PerfAnalyzerUnavailable(f"{bundled} has no {NEEDED_LIBS[name]} to stand in for {name}")
            (libs / name).symlink_to(candidates[-1])
    return binary, libs


def check_runs(binary: Path, libs: Path) -> None:
    """perf_analyzer --help must start: the loader finds its libraries and this glibc is new enough."""
    r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=_env(libs), timeout=60)
    text = (r.stdout or "") + (r.stderr or "")
    if "perf_analyzer" not in text.lower() or "error while loading shared libraries" in text or "GLIBC_" in text:
        raise PerfAnalyzerUnavailable(f"{binary} does not run here (exit {r.returncode}): {text.strip()[-400:]}")


def _env(libs: Path) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _bytes_element(data: bytes) -> str:
    """One BYTES element as Triton serialises it (4-byte little-endian length, then the bytes), base64."""
    return base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")


def input_data(image: bytes, question: str, max_tokens: int) -> dict:
    """perf_analyzer's --input-data JSON for one streamed request to the facert ensemble."""
    return {"data": [{
        "IMAGE": {"content": {"b64": _bytes_element(image)}, "shape": [1]},
        "QUESTION": {"content": [question], "shape": [1]},
        "MAX_TOKENS": {"content": [int(max_tokens)], "shape": [1]},
        "TEMPERATURE": {"content": [0.0], "shape": [1]},
        "TOP_P": {"content": [1.0], "shape": [1]},
        "STREAM": {"content": [True], "shape": [1]},
    }]}


def command(binary: Path, url: str, model: str, concurrency: int, data_path: Path, csv_path: Path,
            export_path: Path, requests_per_window: int, max_trials: int) -> list[str]:
    return [str(binary), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--async",
            f"--concurrency-range={concurrency}:{concurrency}", f"--input-data={data_path}",
            "--measurement-mode=count_windows", f"--measurement-request-count={requests_per_window}",
            # stability is judged over 3 windows of a few requests each: on a shared 2-core machine they
            # rarely agree within any useful percentage, so the check is off and the spread shows in p90/p99
            f"--max-trials={max_trials}", "--stability-percentage=999", "-f", str(csv_path),
            f"--profile-export-file={export_path}"]


def parse_csv(path: Path) -> list[dict]:
    """perf_analyzer's CSV: one row per concurrency, latencies in microseconds. For this decoupled
    model they are request latencies (send -> last response): they match the profile export's last
    response times, whatever its "using the first response" banner says."""
    import csv

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {"concurrency": int(float(r["Concurrency"])),
                   "requests_per_s": round(float(r["Inferences/Second"]), 4)}
            if r.get("Response Throughput"):
                row["responses_per_s"] = round(float(r["Response Throughput"]), 3)
            for p in (50, 90, 99):
                if r.get(f"p{p} latency"):
                    row[f"latency_ms_p{p}"] = round(float(r[f"p{p} latency"]) / 1e3, 2)
            rows.append(row)
    return rows


def parse_export(path: Path) -> dict[int, dict]:
    """{concurrency: time to first response and inter-response percentiles, responses per request}
    from the profile export (per request: send timestamp and every response's timestamp, in ns)."""
    if not path.exists():
        return {}
    # the export echoes the request inputs, the image's raw bytes among them: not all UTF-8
    doc = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    out = {}
    for exp in doc.get("experiments", []):
        value = int(exp.get("experiment", {}).get("value", 0))
        ttft, gaps, responses = [], [], []
        for req in exp.get("requests", []):
            times = req.get("response_timestamps") or []
            if times:
                ttft.append((times[0] - req["timestamp"]) / 1e6)
                gaps += [(b - a) / 1e6 for a, b in zip(times, times[1:])]
                responses.append(len(times))
        if ttft:
            row = {"measured_requests": len(ttft), "responses_per_request": round(float(np.mean(responses)), 2)}
            for p in (50, 90, 99):
                row[f"ttft_ms_p{p}"] = round(float(np.percentile(ttft, p)), 2)
            for p in (50, 99):
                row[f"itl_ms_p{p}"] = round(float(np.percentile(gaps, p)), 2) if gaps else None
            out[value] = row
    return out


def run(url: str, concurrencies: list[int], image: bytes, question: str, max_tokens: int = 16,
        model: str | None = None, requests_per_window: int = 4, max_trials: int = 3, timeout_s: float = 180.0,
        log=lambda m: None) -> list[dict]:
    """One perf_analyzer run per concurrency level; rows like the load generator's (where it reports them)."""
    from benchmarks.loadgen import check_loopback
    from runtime.client import find_model

    url = check_loopback(url)
    binary, libs = provision(log=log)
    check_runs(binary, libs)
    model = model or find_model(url, "grpc")
    rows = []
    with tempfile.TemporaryDirectory(prefix="facert-pa-") as tmp:
        tmp = Path(tmp)
        data = tmp / "input.json"
        data.write_text(json.dumps(input_data(image, question, max_tokens)))
        for c in concurrencies:
            csv_path, export = tmp / f"c{c}.csv", tmp / f"c{c}.json"
            cmd = command(binary, url, model, c, data, csv_path, export, requests_per_window, max_trials)
            log("$ " + " ".join(cmd))
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=_env(libs), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rows.append({"concurrency": c, "error": f"perf_analyzer took longer than {timeout_s:.0f} s"})
                continue
            if r.returncode != 0 or not csv_path.exists():
                tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
                rows.append({"concurrency": c, "error": f"exit {r.returncode}: " + " | ".join(tail)[-500:]})
                continue
            for row in parse_csv(csv_path):
                row.update(parse_export(export).get(row["concurrency"], {}))
                row.update({"model": model, "max_tokens": max_tokens, "requests_per_window": requests_per_window})
                rows.append(row)
            log(f"concurrency {c}: {rows[-1]}")
    return rows


def main(argv=None) -> int:
    from benchmarks.loadgen import LoadError
    from benchmarks.stages import parse_list
    from runtime.client import RemoteError
    from runtime.cli import DEMO_IMAGE, DEMO_QUESTION

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT of the server (loopback only)")
    ap.add_argument("--concurrency", default="1,2", help="levels, comma-separated (default 1,2)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests-per-window", type=int, default=4, help="count_windows size (default 4)")
    ap.add_argument("--image", default=str(DEMO_IMAGE))
    ap.add_argument("--question", default=DEMO_QUESTION)
    args = ap.parse_args(argv)
    try:
        rows = run(args.url, parse_list(args.concurrency, "--concurrency"), Path(args.image).read_bytes(),
                   args.question, args.max_tokens, requests_per_window=args.requests_per_window,
                   log=lambda m: print(f"[perf_analyzer] {m}", file=sys.stderr, flush=True))
    except (PerfAnalyzerUnavailable, LoadError, RemoteError) as e:
        print(f"perf_analyzer: skipped: {e}", file=sys.stderr)
        return 3
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

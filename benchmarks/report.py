"""Benchmark results on disk: one folder per run with JSON, CSV, PNG plots and a markdown summary.

    benchmarks/results/<YYYY-MM-DD>-<kind>-<machine id>/     (kind: cpu-suite, cpu-stages, ...)
        results.json          everything: command, date, machine, versions, settings, every table
        <table>.csv           one CSV per table (stages, serve, perf_analyzer, ...), one row per measurement
        stages.png            per-stage latency per backend (stacked bars), batch by batch
        latency_vs_concurrency.png, throughput_vs_concurrency.png   the server under load, next to the peer
        README.md             the summary tables (written by the suite that made the run)

The record says where the numbers come from, so a later reader can judge them: the command line,
the git commit, the CPU and its core count, the load average before and after, a free-text note
when the machine was shared, and the versions of everything that ran.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The order stages run in a request, for tables and the stacked bars.
STAGE_ORDER = ("preprocess", "vision", "parser", "seg", "attributes", "prefill", "decode_token", "postprocess")


# ---------------------------------------------------------------------------------- provenance

def machine_id() -> str:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(p).read_text().strip()[:8]
        except OSError:
            continue
    return platform.node()[:8] or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(shared: str | None = None) -> dict:
    return {"id": machine_id(), "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "load_average": load_average(), "shared": shared or None}


def versions() -> dict:
    """Versions of what a benchmark may run; a package that is not installed is left out."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "onnxruntime", "numpy", "tritonclient", "grpcio", "matplotlib"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        from runtime.serving.server import SERVER_VERSION

        out["tritonserver"] = SERVER_VERSION
    except ImportError:
        pass
    return out


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def command_line() -> str:
    """How this process was started, as one would type it again (`python benchmarks/x.py ...`, `facert ...`)."""
    head = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if head.endswith(".py"):
        script = Path(sys.argv[0]).resolve()
        head = f"python {script.relative_to(ROOT) if script.is_relative_to(ROOT) else script}"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def new_record(benchmark: str, shared: str | None = None, **fields) -> dict:
    """The provenance every results.json starts with."""
    return {"benchmark": benchmark, "command": command_line(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": git_commit(),
            "machine": machine(shared), "versions": versions(), **fields}


def results_dir(kind: str, root: Path = RESULTS) -> Path:
    """benchmarks/results/<date>-<kind>-<machine id>: one folder per benchmark, day and machine."""
    return root / f"{datetime.now().strftime('%Y-%m-%d')}-{kind}-{machine_id()}"


# --------------------------------------------------------------------------------------- files

def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows of flat dicts as CSV; the columns are the union of the keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def write_results(out: Path, record: dict, tables: dict[str, list[dict]], markdown: str | None = None) -> list[Path]:
    """results.json (record + tables), one CSV per non-empty table, the plots, README.md. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(record, tables=tables)
    record["machine"] = dict(record["machine"], load_average_after=load_average())
    written = [out / "results.json"]
    written[0].write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    for name, rows in tables.items():
        if rows:
            written.append(write_csv(out / f"{name}.csv", rows))
    written += plot_all(out, tables)
    if markdown is not None:
        (out / "README.md").write_text(markdown)
        written.append(out / "README.md")
    return written


def _jsonable(x):
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_all(out: Path, tables: dict[str, list[dict]]) -> list[Path]:
    paths = []
    if tables.get("stages"):
        paths.append(plot_stages(tables["stages"], out / "stages.png"))
    if tables.get("serve"):
        paths += plot_concurrency(tables["serve"], tables.get("peer", []), out)
    return paths


def plot_stages(rows: list[dict], path: Path) -> Path:
    """Stacked per-stage milliseconds per request, one bar per backend, one panel per batch size.

    Rows: {backend, batch, stage, ms}. A request's decode is drawn as its per-token latency, so the
    bar is "time to first token + one more token", the part that does not scale with answer length.
    """
    plt = _pyplot()
    batches = sorted({r["batch"] for r in rows})
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s for r in rows)]
    colors = plt.get_cmap("tab10").colors
    ncols = min(len(batches), 2)
    nrows = -(-len(batches) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols + 1.5, (0.5 * len(backends) + 1.6) * nrows + 0.8),
                             sharey=True, squeeze=False)
    panels = list(axes.flat)
    for ax in panels[len(batches):]:
        ax.set_visible(False)
    for ax, b in zip(panels, batches):
        for y, backend in enumerate(backends):
            left = 0.0
            for i, stage in enumerate(stages):
                ms = next((r["ms"] for r in rows if r["backend"] == backend and r["batch"] == b
                           and r["stage"] == stage), None)
                if ms is None:
                    continue
                ax.barh(y, ms, left=left, color=colors[i % len(colors)], label=stage if y == 0 else None)
                left += ms
        ax.set_title(f"batch {b}")
        ax.set_xlabel("ms (decode: one token)")
        ax.set_yticks(range(len(backends)), backends)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    handles, labels = [], []
    for ax in panels:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Per-stage latency per backend (median)")
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_concurrency(serve: list[dict], peer: list[dict], out: Path) -> list[Path]:
    """Latency (TTFT, inter-token, request p50/p99) and throughput against concurrency, with the peer."""
    plt = _pyplot()
    serve = sorted(serve, key=lambda r: r["concurrency"])
    peer = sorted(peer, key=lambda r: r["concurrency"])
    c = [r["concurrency"] for r in serve]
    pc = [r["concurrency"] for r in peer]
    peer_name = peer[0].get("backend", "transformers") if peer else ""

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("time to first token", "ttft_ms"), ("inter-token latency", "itl_ms"), ("request latency", "latency_ms"))
    for ax, (title, key) in zip(axes, panels):
        ax.plot(c, [r[f"{key}_p50"] for r in serve], "o-", label="server p50")
        ax.plot(c, [r[f"{key}_p99"] for r in serve], "o--", label="server p99")
        if peer:
            ax.plot(pc, [r[key] for r in peer], "s:", color="gray", label=f"{peer_name} (batch = concurrency)")
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    lat = out / "latency_vs_concurrency.png"
    fig.savefig(lat, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, key) in zip(axes, (("requests/s", "requests_per_s"), ("output tokens/s", "output_tokens_per_s"))):
        ax.plot(c, [r[key] for r in serve], "o-", label="server")
        if peer:
            ax.plot(pc, [r[key] for r in peer], "s:", color="gray", label=f"{peer_name} (batch = concurrency)")
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    thr = out / "throughput_vs_concurrency.png"
    fig.savefig(thr, dpi=110)
    plt.close(fig)
    return [lat, thr]


# ------------------------------------------------------------------------------------ markdown

def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one character per column, l or r (default: l then r...)."""
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return str(x)

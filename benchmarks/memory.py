"""Memory of a running server, watched from outside: resident memory of tritonserver, its python-backend
stubs and facert's gateway, sampled while a load runs, and the verdict on memory at rest."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    from runtime.serving.server import process_stat

    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = process_stat(int(entry.name))
            if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def gateway_of(server_pid: int) -> int | None:
    """The gateway beside a tritonserver (both children of the `facert serve` that runs them)."""
    from runtime.serving.server import process_stat

    st = process_stat(server_pid)
    for pid in children(st[1]) if st else []:
        try:
            if b"runtime.serving.gateway" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


class MemorySampler(threading.Thread):
    """Every interval: RSS of the server, its gateway and each of its stub processes, and their
    shared-memory regions."""

    def __init__(self, server_pid: int, interval_s: float = 1.0, done_count=lambda: 0,
                 gateway_pid: int | None = None):
        super().__init__(daemon=True, name="soak-memory")
        self.server_pid, self.interval_s, self.done_count = server_pid, interval_s, done_count
        self.gateway_pid = gateway_pid if gateway_pid is not None else gateway_of(server_pid)
        self.samples: list[dict] = []
        self.t0 = time.perf_counter()
        self._halt = threading.Event()

    def sample(self) -> dict:
        procs = {"tritonserver": rss_mb(self.server_pid) or 0.0}
        if self.gateway_pid is not None:
            procs["gateway"] = rss_mb(self.gateway_pid) or 0.0
        shm = 0.0
        for pid in children(self.server_pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
                name = Path(argv[1].decode(errors="replace")).parts[-3]  # <repository>/<model>/<version>/model.py
                region = Path("/dev/shm") / argv[2].decode(errors="replace")  # the stub's shared-memory region
                try:
                    shm += region.stat().st_blocks * 512 / 2**20
                except OSError:
                    pass
            else:
                name = f"pid {pid}"
            procs[name] = procs.get(name, 0.0) + (rss_mb(pid) or 0.0)
        return {"t": round(time.perf_counter() - self.t0, 2), "done": self.done_count(),
                "rss_mb": {k: round(v, 1) for k, v in procs.items()}, "total_rss_mb": round(sum(procs.values()), 1),
                "shm_mb": round(shm, 1)}

    def run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._halt.wait(self.interval_s):
                self.samples.append(self.sample())
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def _total(s: dict) -> float:
    return s["total_rss_mb"] + s["shm_mb"]


def at_rest(samples: list[dict], window: tuple[float, float]) -> dict:
    """Memory at rest in a window (sampler seconds): the median of its second half, once frees have settled."""
    inside = [s for s in samples if window[0] <= s["t"] <= window[1]]
    settled = inside[len(inside) // 2:] or inside or samples[-1:]
    names = sorted({k for s in settled for k in s["rss_mb"]})
    return {"total_mb": round(float(np.median([_total(s) for s in settled])), 1),
            "shm_mb": round(float(np.median([s["shm_mb"] for s in settled])), 1),
            "by_process_mb": {k: round(float(np.median([s["rss_mb"].get(k, 0.0) for s in settled])), 1)
                              for k in names}}


def memory_verdict(samples: list[dict], rests: dict[str, tuple[float, float]]) -> dict:
    """Memory at rest at the start, after the warm-up and at the end (the windows in `rests`), the peak
    under load, and the verdict: flat when the end exceeds the after-warm-up rest by less than
    max(2 %, 64 MB). Each process's own change is kept, so that a rise can be placed."""
    rest = {name: at_rest(samples, w) for name, w in rests.items()}
    warm, end = rest["after_warmup"], rest["end"]
    growth = end["total_mb"] - warm["total_mb"]
    bound = max(0.02 * warm["total_mb"], 64.0)
    loaded = [s for s in samples if rests["after_warmup"][1] < s["t"] < rests["end"][0]] or samples
    per_process = {k: round(end["by_process_mb"].get(k, 0.0) - warm["by_process_mb"].get(k, 0.0), 1)
                   for k in sorted(set(end["by_process_mb"]) | set(warm["by_process_mb"]))}
    return {"rests": {k: list(v) for k, v in rests.items()},
            "start_mb": rest["start"]["total_mb"], "after_warmup_mb": warm["total_mb"], "end_mb": end["total_mb"],
            "peak_under_load_mb": round(max(_total(s) for s in loaded), 1),
            "growth_mb": round(growth, 1), "growth_pct": round(100 * growth / warm["total_mb"], 2),
            "growth_by_process_mb": per_process, "rest_by_process_mb": {k: v["by_process_mb"] for k, v in rest.items()},
            "flat_bound_mb": round(bound, 1), "flat": growth < bound}

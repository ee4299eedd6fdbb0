"""Run the Triton Inference Server that ships in the nvidia-pytriton wheel.

The wheel carries a complete tritonserver 2.51 (`pytriton/tritonserver/bin/tritonserver`), the
python backend, and python-backend stubs for each Python minor version. facert uses only that
server, not the wheel's Python package (which pins numpy<2 and an older tritonclient), so the
wheel is unpacked into a tools folder instead of being installed:

  tools/pytriton/tritonserver/   the server (its RPATH finds ../../../nvidia_pytriton.libs)
  tools/nvidia_pytriton.libs/    the shared libraries it links against
  tools/triton-backends-py3.X/   backends/python with the stub for the running Python
  tools/triton-env-py3.X/        the Python environment the stubs run in (see below)

Why a separate environment for the stubs: the 2.51 python-backend stub is built with a pybind11
that predates numpy 2. Under numpy 2 every input tensor it hands to Python has zero strides (every
element reads as the first one) and BYTES tensors crash the stub (measured here). So the stubs
run in a small venv that holds numpy<2 and then, through a .pth file, the project environment's
own site-packages (torch, transformers, onnxruntime, facert itself). A stub finds its Python
through PATH (it embeds libpython and resolves its prefix from the first `python3` on PATH), so
that venv's bin goes first on PATH, and LD_LIBRARY_PATH starts with the interpreter's own LIBDIR
(else the stub loads the system libpython).

`provision()` builds the tools folder idempotently from PyPI (pip download of the wheel, no
dependencies); `TritonServer` starts the server, waits until it is ready, forwards its log and
stops it.

Recovery. Each python-backend model runs in its own stub process. If one dies (killed, out of
memory, a crash in native code), tritonserver 2.51 does not restart it: the requests in flight
fail with "Stub process '<instance>' is not healthy." and so does every later request to that
model, while the server still reports the model READY (measured here). So the server runs with
explicit model control (`--model-control-mode=explicit --load-model=*`: every model loads at
start, as without it) and `TritonServer` supervises the stubs: a thread watches them in /proc and
reloads a model whose stub died through the repository API, which starts a fresh stub (the
model's own initialize, weights included). A stub's death can also take tritonserver down with it
(2.51's python backend aborts on a lock the dead stub held); the same thread then starts the server
again over the same repository and ports. `stop()` leaves nothing behind: the stubs are gone, the
ports are free and the python backend's shared-memory regions (named by `shm_prefix`, which a
killed stub never removes) are deleted.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from runtime.serving.cancel import CANCEL_DIR_ENV, cancel_flag_dir

PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"  # carries tritonserver 2.51.0
SERVER_VERSION = "2.51.0"
STUB_NUMPY = "numpy<2"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Lines tritonserver prints on every CPU-only start; not worth alarming anyone with.
CPU_ONLY_NOISE = re.compile(r"CudaDriverHelper|NVML|DCGM|unable to create stream|CUDA driver version")


class ServerError(RuntimeError):
    """The server cannot start or stopped: a port is taken, the repository is invalid, a model failed."""


def default_tools_dir() -> Path:
    return Path(os.environ.get("FACERT_TOOLS") or REPO_ROOT / "tools")


def _py_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class TritonInstall:
    """Where the pieces of the unpacked server live inside a tools folder."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_tools_dir()
        self.server_dir = self.root / "pytriton" / "tritonserver"
        self.binary = self.server_dir / "bin" / "tritonserver"
        self.libs = self.root / "nvidia_pytriton.libs"
        self.backends = self.root / f"triton-backends-py{_py_tag()}"
        self.stub_env = self.root / f"triton-env-py{_py_tag()}"
        self.stamp = self.root / f".facert-triton-py{_py_tag()}"

    def ready(self) -> bool:
        return self.stamp.exists() and self.stamp.read_text() == self._stamp_text() and self.binary.exists()

    def _stamp_text(self) -> str:
        return f"{PYTRITON_WHEEL}\n{STUB_NUMPY}\n" + "\n".join(_project_site_dirs()) + "\n"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.stub_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH", "")) if p)
        tcmalloc = find_tcmalloc()
        if tcmalloc and "tcmalloc" not in env.get("LD_PRELOAD", "") and env.get("FACERT_TCMALLOC", "1") != "0":
            env["LD_PRELOAD"] = os.pathsep.join(p for p in (tcmalloc, env.get("LD_PRELOAD", "")) if p)
            env.setdefault("TCMALLOC_AGGRESSIVE_DECOMMIT", "true")
        elif not user_chose_allocator(env):
            env.update(GLIBC_MALLOC_ENV)
            env[GLIBC_MALLOC_MARK] = "1"  # the stubs give their own threshold back (python_backend.py)
        return env


# With glibc's malloc, tritonserver 2.51's RSS keeps creeping up under a mix of refused requests that
# carry images (measured: +0.2 MB per such request, linearly); with tcmalloc, which Triton's own docs
# recommend against memory growth, the same load levels off. So the server (and its stubs) run with
# tcmalloc where the system has it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4);
# FACERT_TCMALLOC=0 turns it off. It runs with TCMALLOC_AGGRESSIVE_DECOMMIT so that freed pages go back
# to the system at once: the resident memory then tracks what the server holds, not its high-water
# mark (the default kept +88 MB of freed pages through a 1,000-request soak; aggressive decommit, the
# same throughput within noise). Set TCMALLOC_AGGRESSIVE_DECOMMIT=false to keep tcmalloc's default.
# Without tcmalloc, tritonserver 2.51 on glibc's malloc keeps what a busy server's request buffers
# (a 0.8 MB image per request, 64 at once) leave fragmented in its arenas: a fresh server's RSS at rest
# rose ~90 MB over the first 1,000-request soak and kept creeping in the next ones. With a fixed mmap
# threshold of 128 KiB (glibc's own starting value, which it otherwise raises to the largest block
# freed), every request buffer is its own mapping and goes back to the system when freed, and two
# arenas instead of 8 per core hold the rest: four soaks in a row each ended within 36 MB of their
# after-warm-up rest (benchmarks/results/2026-11-30-soak-*). The python stubs inherit the environment, but there a fixed
# threshold mmaps every large numpy array anew (logits, pixels), so they set glibc's ceiling back at
# start (runtime/serving/python_backend.py). A user's own MALLOC_* settings are kept as they are.
GLIBC_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
GLIBC_MALLOC_MARK = "FACERT_GLIBC_MALLOC"
# The gateway, on glibc's malloc, handles an image request's megabytes in a handful of buffers of
# about its size (the OpenAI body, its JSON string, the decoded image, the gRPC message), all freed
# when it is forwarded; with glibc's defaults the freed top of the heap goes back to the system at
# once and the next request faults every page in again: parsing and forwarding a 1 MB OpenAI body
# took 2.1 ms instead of 0.3 ms (benchmarks/results/2026-11-30-openai-overhead-in-gateway/NOTES.md).
# Padding the heap's top by 16 MiB keeps that much for the next request, and no more.
GATEWAY_MALLOC_ENV = {"MALLOC_TOP_PAD_": str(16 * 2**20)}


def user_chose_allocator(env: dict) -> bool:
    """The user preloads tcmalloc or tunes glibc's malloc (MALLOC_*): facert's allocator settings stay out."""
    return "tcmalloc" in env.get("LD_PRELOAD", "") or any(k.startswith("MALLOC_") for k in env)


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
    return next((p for p in TCMALLOC_PATHS if Path(p).exists()), None)


def _project_site_dirs() -> list[str]:
    import site

    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def _pip(*args: str, log: Callable[[str], None]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ServerError(f"pip failed ({' '.join(args)}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def provision(root: str | Path | None = None, log: Callable[[str], None] = print) -> TritonInstall:
    """Unpack tritonserver from the nvidia-pytriton wheel and prepare the stub environment (idempotent)."""
    inst = TritonInstall(root)
    if inst.ready():
        return inst
    inst.root.mkdir(parents=True, exist_ok=True)
    if not inst.binary.exists():
        wheels = inst.root / ".wheels"
        found = sorted(wheels.glob("nvidia_pytriton-0.7.0-*.whl"))
        if not found:
            log(f"downloading {PYTRITON_WHEEL} (55 MB, no dependencies) for its tritonserver {SERVER_VERSION}")
            _pip("download", PYTRITON_WHEEL, "--no-deps", "--only-binary=:all:", "-d", str(wheels), log=log)
            found = sorted(wheels.glob("nvidia_pytriton-0.7.0-*.whl"))
        log(f"unpacking tritonserver into {inst.root}")
        with zipfile.ZipFile(found[-1]) as zf:
            for info in zf.infolist():
                name = info.filename
                keep = name.startswith("nvidia_pytriton.libs/") or (
                    name.startswith("pytriton/tritonserver/") and not name.startswith("pytriton/tritonserver/include/"))
                if not keep or name.endswith("/"):
                    continue
                target = inst.root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = (info.external_attr >> 16) & 0o777
                os.chmod(target, (mode or 0o644) & 0o755)
    stub = inst.server_dir / "python_backend_stubs" / _py_tag() / "triton_python_backend_stub"
    if not stub.exists():
        have = sorted(p.name for p in (inst.server_dir / "python_backend_stubs").iterdir())
        raise ServerError(f"tritonserver {SERVER_VERSION} ships python-backend stubs for Python {', '.join(have)}; "
                          f"this is Python {_py_tag()}")
    python_dir = inst.backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (inst.server_dir / "backends" / "python" / "libtriton_python.so",
                inst.server_dir / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(src, python_dir / src.name)

    if not (inst.stub_env / "bin" / "python3").exists():
        log(f"creating the python-backend stub environment {inst.stub_env}")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(inst.stub_env)], check=True)
    site_dir = inst.stub_env / "lib" / f"python{_py_tag()}" / "site-packages"
    if not any(site_dir.glob("numpy-1.*.dist-info")):
        _pip("install", "--quiet", "--no-deps", "--only-binary=:all:", "--target", str(site_dir), STUB_NUMPY, log=log)
    # After numpy<2, the project's own environment (its .pth files too: facert's editable install).
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in _project_site_dirs())
    (site_dir / "zz_facert_project_env.pth").write_text(lines)
    inst.stamp.write_text(inst._stamp_text())
    log(f"tritonserver {SERVER_VERSION} ready in {inst.root}")
    return inst


# ------------------------------------------------------------------------------------------ ports

def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that are free right now (the kernel's choice)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# ------------------------------------------------------------------------- stubs and shared memory

STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, exit code) of a process from /proc/PID/stat; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, ppid 4, exit_code 52
    return fields[0], int(fields[1]), int(fields[49]) if len(fields) > 49 else 0


def stub_model(pid: int, repository: Path) -> str | None:
    """The model a python-backend stub serves (its argv[1] is <repository>/<model>/<version>/model.py)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 2 or not argv[0].endswith(STUB_BINARY.encode()):
        return None
    try:
        return Path(argv[1].decode()).relative_to(repository).parts[0]
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def python_stubs(server_pid: int, repository: Path) -> dict[int, str]:
    """{pid: model} of the live python-backend stubs a tritonserver runs for `repository`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = process_stat(int(entry))
        if st is None or st[1] != server_pid or st[0] in ("Z", "X"):
            continue
        model = stub_model(int(entry), repository)
        if model is not None:
            out[int(entry)] = model
    return out


def _describe_exit(pid: int) -> str:
    st = process_stat(pid)
    if st is None or st[0] != "Z":
        return "exited"
    status = st[2]
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _end_stubs(stubs: dict[int, str], shm_prefix: str, timeout_s: float = 5.0) -> None:
    """Wait for a stopped server's stubs to exit (they notice their parent is gone); kill any left."""
    deadline = time.monotonic() + timeout_s
    alive = dict(stubs)
    while alive and time.monotonic() < deadline:
        alive = {p: m for p, m in alive.items() if _is_our_stub(p, shm_prefix)}
        if alive:
            time.sleep(0.1)
    for pid in alive:
        if _is_our_stub(pid, shm_prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s  # a killed process takes a moment to go (on a busy machine)
    while any(_is_our_stub(p, shm_prefix) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.1)


def _is_our_stub(pid: int, shm_prefix: str) -> bool:
    """pid is still a live stub of ours (its argv names our shared-memory prefix), not a reused pid."""
    st = process_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(STUB_BINARY.encode()) and any(
        a.startswith(shm_prefix.encode()) for a in argv[1:])


def shm_regions(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def remove_shm_regions(prefix: str) -> list[Path]:
    """Delete the python backend's shared-memory regions named with `prefix` (a stopped server's)."""
    removed = []
    for path in shm_regions(prefix):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def python_instance_counts(repository: Path) -> collections.Counter:
    """{model: number of stub processes} of the python-backend models in a repository's configs."""
    from runtime.serving.repo import parse_config

    counts = collections.Counter()
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        cfg = parse_config(config)
        if cfg.backend == "python":
            counts[config.parent.name] = sum(g.count or 1 for g in cfg.instance_group) or 1
    return counts


def inflight_models(repository: Path) -> set[str]:
    """The python models whose requests outlive `execute` (parameter scheduler=inflight)."""
    from runtime.serving.repo import parse_config

    out = set()
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        cfg = parse_config(config)
        if cfg.backend == "python" and "scheduler" in cfg.parameters \
                and cfg.parameters["scheduler"].string_value == "inflight":
            out.add(config.parent.name)
    return out


# Run before exec in a server process we start (Linux): the kernel sends it SIGTERM when the thread
# that started it ends (prctl's parent-death signal, kept across exec), so a `facert serve` killed
# outright (SIGKILL, the OOM killer, a test run stopped by a signal) leaves no tritonserver or gateway
# holding its ports and memory; started after its parent already died, it exits at once. The thread
# that starts a server is the caller of start() or the stub supervisor, both alive as long as it is.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                    "if os.getppid() != int(sys.argv[1]):\n"
                    "    sys.exit(70)\n"
                    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def dying_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` started through the parent-death guard above (the same process once it execs; as is off Linux)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class StubSupervisor(threading.Thread):
    """Reloads a model whose python-backend stub died (tritonserver 2.51 does not restart it), and
    restarts tritonserver itself if it exits on its own.

    Every `interval_s` it lists the server's live stubs from /proc. A READY model with fewer live
    stubs than its config's instance count is reloaded through the repository API
    (`reload_model`), which starts fresh ones; the requests it had in flight fail with the backend's
    "Stub process ... is not healthy" error. A model that is not READY (unloaded on purpose, or
    loading) is left alone. A reload that fails is retried with a growing pause. Each recovery is
    said on the log and kept in `recoveries` ({model, pids, cause, seconds}).

    A model whose requests outlive its `execute` (the llm step's in-flight scheduler: a decoupled
    model that queues them and returns) cannot be recovered that way: 2.51 fails a python model's
    requests on a stub's death only inside `execute`, so the ones the dead stub held would wait
    forever. When such a model's stub dies, the supervisor ends tritonserver and starts it again
    (cause "in-flight model <name> lost its process ..."), which fails every stream in flight with
    a clear error (unavailable) and brings the model back.

    tritonserver itself can die of a stub's death: 2.51's python backend sometimes aborts the whole
    server (`terminate called after throwing an instance of 'boost::interprocess::lock_exception'`)
    when a stub is killed while it holds a lock in their shared memory (measured here: 5 of 30
    SIGKILLs mid-request). A server that exits without `stop()` is started again over the same
    repository and ports (`TritonServer.restart`, kept in `restarts`); after MAX_FAILED_RESTARTS
    failed tries in a row the supervisor gives up and `serve_forever` returns the server's exit code.
    """

    MAX_FAILED_RESTARTS = 3

    def __init__(self, server: "TritonServer", interval_s: float = 0.5, enabled: bool = True):
        super().__init__(daemon=True, name="facert-stub-supervisor")
        self.server = server
        self.interval_s = interval_s
        self.enabled = enabled
        self.recoveries: list[dict] = []
        self.seen: dict[int, str] = {}  # every stub pid seen, for stop() to make sure they are gone
        self.expected = python_instance_counts(server.repository)
        self.holds_requests = inflight_models(server.repository)  # restart the server when their stub dies
        self._halt = threading.Event()
        self._retry_at: dict[str, tuple[float, float]] = {}  # model -> (not before, pause) after a failed reload
        self._scan()

    def _scan(self) -> dict[int, str]:
        stubs = python_stubs(self.server.proc.pid, self.server.repository)
        self.seen.update(stubs)
        return stubs

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)

    def run(self) -> None:
        last = self._scan()
        failed = 0
        while not self._halt.wait(self.interval_s):
            if self.server.proc.poll() is not None:
                if not self.enabled or self._halt.is_set():
                    return
                try:
                    self.server.restart(stubs=self.seen)
                    failed = 0
                except ServerError as e:
                    failed += 1
                    self.server.say(f"tritonserver could not be restarted ({failed}/{self.MAX_FAILED_RESTARTS}): {e}")
                    if failed >= self.MAX_FAILED_RESTARTS:
                        return
                    continue
                self.seen.clear()
                last = self._scan()
                continue
            gateway = self.server.gateway
            if gateway is not None and gateway.poll() is not None and self.enabled and not self._halt.is_set():
                self.server.say(f"the gateway exited on its own (code {gateway.returncode}); restarting it")
                try:
                    self.server._start_gateway()
                    self.server.gateway_restarts.append({"code": gateway.returncode})
                except ServerError as e:
                    self.server.say(f"the gateway could not be restarted: {e}")
            live = self._scan()
            count = collections.Counter(live.values())
            short = [m for m, n in self.expected.items() if count[m] < n
                     and time.monotonic() >= self._retry_at.get(m, (0.0, 0.0))[0]]
            if short and self.enabled:
                try:
                    ready = self.server.models_ready()
                except ServerError:
                    ready = {}
                for model in short:
                    if not ready.get(model, False) or self._halt.is_set():
                        continue
                    dead = [p for p, m in last.items() if m == model and p not in live]
                    if model in self.holds_requests and dead:
                        if self._restart_for(model, dead):
                            self.seen.clear()
                        break
                    self._recover(model, dead)
                live = self._scan()
            last = live

    def _restart_for(self, model: str, dead: list[int]) -> bool:
        """End tritonserver and start it again: the only way, in 2.51, to fail the requests that an
        in-flight model's dead stub held (see the class docstring)."""
        cause = (f"in-flight model {model} lost its process (" + ", ".join(f"pid {p} {_describe_exit(p)}" for p in dead)
                 + "); its requests can only be failed by a restart")
        self.server.say(f"model {model!r}: its python-backend process died holding requests in flight; "
                        "restarting tritonserver")
        proc = self.server.proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            self.server.restart(stubs=self.seen, cause=cause)
        except ServerError as e:
            self.server.say(f"tritonserver could not be restarted: {e}")
            return False
        return True

    def _recover(self, model: str, dead: list[int]) -> None:
        cause = ", ".join(f"pid {p} {_describe_exit(p)}" for p in dead) or "gone"
        self.server.say(f"model {model!r}: its python-backend process died ({cause}); reloading it")
        t0 = time.monotonic()
        try:
            self.server.reload_model(model)
        except ServerError as e:
            pause = min(60.0, 2 * self._retry_at.get(model, (0.0, 0.5))[1])
            self._retry_at[model] = (time.monotonic() + pause, pause)
            self.server.say(f"model {model!r} could not be reloaded (next try in {pause:.0f} s): {e}")
            return
        self._retry_at.pop(model, None)
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": model, "pids": dead, "cause": cause, "seconds": round(seconds, 2)})
        self.server.say(f"model {model!r} reloaded in {seconds:.1f} s")


# ----------------------------------------------------------------------------------------- server

class TritonServer:
    """One tritonserver process serving a model repository, behind facert's gateway, on host:ports.

    Clients reach the gateway (runtime/serving/gateway.py) on host:grpc_port and host:http_port;
    tritonserver listens on two loopback ports of its own and answers only requests that carry this
    server's key (drawn at every start: Triton's restricted-API headers, every category), i.e. the
    gateway's and this object's own (health, model reloads). Its metrics stay on host:metrics_port.
    With gateway=False tritonserver takes the public ports itself, only the repository, statistics,
    shared-memory, trace and logging APIs behind the key: for measuring what the gateway costs.

    `start()` validates the repository, checks the ports, starts the server and the gateway and returns
    once every model is ready (or raises ServerError with the server's own error lines). Log lines go
    to `log` (default: stderr) as they arrive. `stop()` stops the gateway, then sends tritonserver
    SIGTERM, waits, then kills.
    """

    def __init__(self, model_repository: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, tools_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None, log_verbose: int = 0, exit_timeout_s: int = 10,
                 provision_log: Callable[[str], None] = print, tritonserver: str | Path | None = None,
                 recover: bool = True, say: Callable[[str], None] | None = None, gateway: bool = True,
                 max_request_mb: float | None = None, openai_port: int | None = None,
                 openai_max_body_mb: float | None = None):
        from runtime.serving.gateway import DEFAULT_MAX_REQUEST_MB

        self.repository = Path(model_repository).resolve()
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = int(http_port), int(grpc_port), int(metrics_port)
        self.tools_dir = tools_dir
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.provision_log = provision_log
        # An installed tritonserver (NVIDIA's containers: /opt/tritonserver/bin/tritonserver) runs with its
        # own backends and environment; without one, the server unpacked from nvidia-pytriton.
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.proc: subprocess.Popen | None = None
        self.recent: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None
        # reload a model whose python-backend stub died (see the module docstring)
        self.recover = recover
        self.say = say if say is not None else (lambda msg: print(f"[facert] {msg}", file=sys.stderr, flush=True))
        self.supervisor: StubSupervisor | None = None
        # python-backend shared-memory regions are per server (several servers can share a host) and
        # per start: a region left by a killed stub is recognised and removed by this prefix
        self.shm_prefix = f"facert{os.getpid()}_{self.grpc_port}_"
        # where the gateway and postprocessing mark cancelled requests for the llm step (runtime/serving/cancel.py)
        self.cancel_dir = cancel_flag_dir(f"{os.getpid()}-{self.grpc_port}")
        self.key = secrets.token_urlsafe(24)  # what tritonserver asks of every request (see the class doc)
        self.use_gateway = gateway
        self.max_request_mb = float(max_request_mb or DEFAULT_MAX_REQUEST_MB)
        # the OpenAI-compatible endpoint, served by the gateway (runtime/serving/openai_frontend.py)
        self.openai_port = None if openai_port is None else int(openai_port)
        self.openai_max_body_mb = openai_max_body_mb
        self.gateway: subprocess.Popen | None = None
        self.internal_http_port = self.internal_grpc_port = 0  # tritonserver's own, with the gateway
        self._reloads = 0
        self.restarts: list[dict] = []  # tritonserver exits the supervisor restarted from: {code, cause, seconds}
        self.gateway_restarts: list[dict] = []  # gateway exits the supervisor restarted from: {code}
        self._launch_args: tuple[list[str], dict] | None = None

    # where to reach it
    @property
    def grpc_url(self) -> str:
        return f"{self._host_for_url}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._host_for_url}:{self.http_port}"

    @property
    def openai_url(self) -> str | None:
        """What an OpenAI client takes as base_url (None: no OpenAI endpoint)."""
        return None if self.openai_port is None else f"http://{self._host_for_url}:{self.openai_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host_for_url}:{self.metrics_port}/metrics"

    @property
    def _host_for_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        return f"[{host}]" if ":" in host else host

    @property
    def _internal_http(self) -> str:
        """tritonserver's own HTTP endpoint (behind the gateway: a loopback port)."""
        return f"127.0.0.1:{self.internal_http_port}" if self.use_gateway else self.http_url

    def command(self, binary: Path, backends: Path | None) -> list[str]:
        from runtime.serving.gateway import KEY_HEADER, RESTRICTED_CATEGORIES

        if self.use_gateway:
            listen = [f"--http-address=127.0.0.1", f"--http-port={self.internal_http_port}",
                      f"--grpc-address=127.0.0.1", f"--grpc-port={self.internal_grpc_port}"]
            restricted = ",".join(RESTRICTED_CATEGORIES)
        else:
            listen = [f"--http-address={self.host}", f"--http-port={self.http_port}",
                      f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}"]
            restricted = "model-repository,statistics,shared-memory,trace,logging"
        return [
            str(binary),
            f"--model-repository={self.repository}",
            *([f"--backend-directory={backends}"] if backends else []),
            *listen,
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            # only holders of the key (see the class doc); the gRPC header is triton-grpc-protocol-<name>
            f"--http-restricted-api={restricted}:{KEY_HEADER}={self.key}",
            f"--grpc-restricted-protocol={restricted}:{KEY_HEADER}={self.key}",
            # configs are used exactly as written (they are generated and validated by `facert repo`)
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # every model loads at start; the repository API can then reload one (recovery)
            "--model-control-mode=explicit", "--load-model=*",
        ]

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        from runtime.serving.repo import RepositoryError, validate_repository

        try:
            validate_repository(self.repository)
        except RepositoryError as e:
            raise ServerError(f"invalid model repository {self.repository}: {e}") from None
        ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        if self.openai_port is not None:
            if not self.use_gateway:
                raise ServerError("the OpenAI endpoint is served by the gateway: it needs gateway=True")
            ports["openai"] = self.openai_port
        if len(set(ports.values())) != len(ports):
            raise ServerError(f"the {', '.join(ports)} ports must differ, got {ports}")
        for name, port in ports.items():
            if not port_is_free(self.host, port):
                raise ServerError(f"{'OpenAI' if name == 'openai' else name} port {port} on {self.host} is taken "
                                  f"(another server running?); choose another with --{name}-port")
        if self.use_gateway:
            self.internal_http_port, self.internal_grpc_port = free_ports(2, "127.0.0.1")
        if self.tritonserver is not None:
            if not os.access(self.tritonserver, os.X_OK):
                raise ServerError(f"{self.tritonserver} is not an executable tritonserver")
            cmd, env = self.command(self.tritonserver, None), dict(os.environ)
        else:
            inst = provision(self.tools_dir, log=self.provision_log)
            cmd, env = self.command(inst.binary, inst.backends), inst.env()
        from runtime.serving.native import ORCHESTRATOR_ENV
        from runtime.serving.repo import tensorrt_llm_world_size

        world = tensorrt_llm_world_size(self.repository)
        if world > 1:  # a TensorRT-LLM engine split over GPUs: its model spawns one worker per rank
            env.update(ORCHESTRATOR_ENV)
            self.say(f"tensorrt_llm runs on {world} GPUs (orchestrator mode: TRTLLM_ORCHESTRATOR=1)")
        env[CANCEL_DIR_ENV] = str(self.cancel_dir)  # the stubs inherit it
        remove_shm_regions(self.shm_prefix)  # a previous server of ours on this port died without cleaning up
        self._launch_args = (cmd, env)
        try:
            self._launch(timeout_s)
            if self.use_gateway:
                self._start_gateway()
        except BaseException:
            self.stop()
            raise
        self.supervisor = StubSupervisor(self, enabled=self.recover)
        self.supervisor.start()
        return self

    def _start_gateway(self, timeout_s: float = 60.0) -> None:
        """Start the gateway on the public ports; returns once it listens (ServerError if it does not)."""
        from runtime.serving.gateway import KEY_ENV

        env = dict(os.environ, **{KEY_ENV: self.key, CANCEL_DIR_ENV: str(self.cancel_dir)})
        if not user_chose_allocator(env):
            env.update(GATEWAY_MALLOC_ENV)
        cmd = [sys.executable, "-m", "runtime.serving.gateway", "--model-repository", str(self.repository),
               "--host", self.host, "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
               "--upstream-grpc", f"127.0.0.1:{self.internal_grpc_port}",
               "--upstream-http", f"127.0.0.1:{self.internal_http_port}", "--max-request-mb", str(self.max_request_mb)]
        if self.openai_port is not None:
            cmd += ["--openai-port", str(self.openai_port)]
            if self.openai_max_body_mb is not None:
                cmd += ["--openai-max-body-mb", str(self.openai_max_body_mb)]
        self.gateway = subprocess.Popen(dying_with_parent(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, text=True, errors="replace", bufsize=1, start_new_session=True)
        ready = threading.Event()

        def forward(proc: subprocess.Popen) -> None:
            for line in proc.stdout:
                line = line.rstrip("\n")
                self.recent.append(line)
                self.log(line)
                if "facert gateway: listening" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=forward, args=(self.gateway,), daemon=True).start()
        if not ready.wait(timeout_s) or self.gateway.poll() is not None:
            code = self.gateway.poll()
            if code is None:
                self.gateway.kill()
            raise ServerError(f"the gateway did not start (exit code {self.gateway.wait()}):\n"
                              + "\n".join(ln for ln in list(self.recent)[-10:] if "gateway" in ln))

    def _stop_gateway(self, timeout_s: float = 15.0) -> None:
        if self.gateway is None or self.gateway.poll() is not None:
            return
        self.gateway.send_signal(signal.SIGTERM)  # it finishes what it is reading, briefly
        try:
            self.gateway.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.gateway.kill()
            self.gateway.wait()

    def _launch(self, timeout_s: float) -> None:
        cmd, env = self._launch_args
        self.proc = subprocess.Popen(dying_with_parent(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)  # Ctrl-C reaches us; we stop it cleanly
        self._reader = threading.Thread(target=self._forward_log, args=(self.proc,), daemon=True)
        self._reader.start()
        self._wait_ready(timeout_s)

    def restart(self, stubs: dict[int, str] | None = None, timeout_s: float = 300.0, cause: str | None = None) -> None:
        """Start tritonserver again after it exited on its own (or, with `cause`, after the supervisor
        ended it): what the old one left (stubs, shared memory, cancellation marks) is cleared first.
        Raises ServerError if the new one does not come up."""
        old = self.proc
        if self._reader is not None:
            self._reader.join(timeout=5)
        code = old.returncode
        if cause is None:
            cause = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            self.say(f"tritonserver exited on its own ({cause}); restarting it over {self.repository}\n"
                     f"{self.error_summary()}")
        else:
            self.say(f"tritonserver ended ({cause}); restarting it over {self.repository}")
        self._clear_leftovers(dict(stubs or {}))
        t0 = time.monotonic()
        try:
            self._launch(timeout_s)
        except ServerError:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            raise
        seconds = time.monotonic() - t0
        self.restarts.append({"code": code, "cause": cause, "seconds": round(seconds, 2)})
        self.say(f"tritonserver restarted in {seconds:.1f} s")

    def _forward_log(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.recent.append(line)
            self.log(line)

    def is_ready(self) -> bool:
        """tritonserver answers ready (asked directly, with the key)."""
        from runtime.serving.gateway import KEY_HEADER

        req = urllib.request.Request(f"http://{self._internal_http}/v2/health/ready", headers={KEY_HEADER: self.key})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} while loading "
                                  f"{self.repository}:\n{self.error_summary()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.error_summary()}")

    def error_summary(self) -> str:
        """The server's own error lines (model load failures first), or its last lines."""
        errors = [ln for ln in self.recent if (ln.startswith("E") or "error" in ln.lower())
                  and not CPU_ONLY_NOISE.search(ln)]
        return "\n".join(errors[-20:] or list(self.recent)[-20:])

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the server; its stubs, ports and shared memory are all released when this returns."""
        if self.proc is None:
            return None
        if self.supervisor is not None:
            self.supervisor.stop()
            if self.supervisor.is_alive():  # in the middle of a restart: end the server it waits on
                if self.proc.poll() is None:
                    self.proc.kill()
                self.supervisor.join(timeout=30)
        self._stop_gateway()  # no new requests
        stubs = python_stubs(self.proc.pid, self.repository) if self.proc.poll() is None else {}
        if self.supervisor is not None:
            stubs.update(self.supervisor.seen)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._clear_leftovers(stubs)
        return self.proc.returncode

    def _clear_leftovers(self, stubs: dict[int, str]) -> None:
        """What an ended server process can leave: its stubs, their shared memory, its cancellation marks."""
        _end_stubs(stubs, self.shm_prefix)
        remove_shm_regions(self.shm_prefix)
        shutil.rmtree(self.cancel_dir, ignore_errors=True)

    def models_ready(self) -> dict[str, bool]:
        """{model: READY?} from the repository index."""
        return {m["name"]: m.get("state") == "READY" for m in self._api("POST", "/v2/repository/index", {})}

    def reload_model(self, name: str, timeout_s: float = 300.0) -> None:
        """Load `name` again with fresh instances (a new stub for a python model); returns once it is ready.

        A plain load of an unchanged model is a no-op in 2.51, and a reload whose config differs only
        in its instances reuses the ones that exist (dead stub included; both measured here). So the
        reload carries the model's config with a changed `facert_reload` parameter, which makes Triton
        load the model anew; the step code ignores that parameter.
        """
        config = self._api("GET", f"/v2/models/{name}/config", None)
        self._reloads += 1
        config.setdefault("parameters", {})["facert_reload"] = {"string_value": str(self._reloads)}
        self._api("POST", f"/v2/repository/models/{name}/load", {"parameters": {"config": json.dumps(config)}},
                  timeout_s)

    def _api(self, method: str, path: str, body: dict | None, timeout_s: float = 30.0):
        from runtime.serving.gateway import KEY_HEADER

        req = urllib.request.Request(f"http://{self._internal_http}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", KEY_HEADER: self.key})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{method} {path}: {e}") from None
        return json.loads(data) if data else {}

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> int:
        """Block until SIGINT/SIGTERM or until the server exits; then stop it. Returns an exit code."""
        say = self.say
        stop = threading.Event()
        old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.is_set():
                restarting = self.supervisor is not None and self.supervisor.enabled and self.supervisor.is_alive()
                if self.proc.poll() is not None and not restarting:
                    say(f"tritonserver exited with code {self.proc.returncode}:\n{self.error_summary()}")
                    return self.proc.returncode or 1
                stop.wait(0.5)
            say("stopping tritonserver")
            code = self.stop()
            say(f"tritonserver stopped (exit code {code})")
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.serving.server [--tools DIR]`: provision the tools folder (used by `make setup`)."""
    import argparse

    ap = argparse.ArgumentParser(description="Unpack tritonserver from nvidia-pytriton into a tools folder")
    ap.add_argument("--tools", default=None, help=f"tools folder (default {default_tools_dir()})")
    args = ap.parse_args(argv)
    provision(args.tools, log=lambda m: print(f"[facert] {m}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

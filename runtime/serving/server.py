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
"""

from __future__ import annotations

import collections
import os
import re
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
        return env


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


# ----------------------------------------------------------------------------------------- server

class TritonServer:
    """One tritonserver process serving a model repository on host:ports.

    `start()` validates the repository, checks the ports, starts the server and returns once every
    model is ready (or raises ServerError with the server's own error lines). Log lines go to `log`
    (default: stderr) as they arrive. `stop()` sends SIGTERM, waits, then kills.
    """

    def __init__(self, model_repository: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, tools_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None, log_verbose: int = 0, exit_timeout_s: int = 10,
                 provision_log: Callable[[str], None] = print, tritonserver: str | Path | None = None):
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

    # where to reach it
    @property
    def grpc_url(self) -> str:
        return f"{self._host_for_url}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._host_for_url}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host_for_url}:{self.metrics_port}/metrics"

    @property
    def _host_for_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        return f"[{host}]" if ":" in host else host

    def command(self, binary: Path, backends: Path | None) -> list[str]:
        return [
            str(binary),
            f"--model-repository={self.repository}",
            *([f"--backend-directory={backends}"] if backends else []),
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            # configs are used exactly as written (they are generated and validated by `facert repo`)
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            # python-backend shared-memory regions are per server, so several servers can share a host
            f"--backend-config=python,shm-region-prefix-name=facert{os.getpid()}_{self.grpc_port}_",
        ]

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        from runtime.serving.repo import RepositoryError, validate_repository

        try:
            validate_repository(self.repository)
        except RepositoryError as e:
            raise ServerError(f"invalid model repository {self.repository}: {e}") from None
        ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        if len(set(ports.values())) != 3:
            raise ServerError(f"the http, grpc and metrics ports must differ, got {ports}")
        for name, port in ports.items():
            if not port_is_free(self.host, port):
                raise ServerError(f"{name} port {port} on {self.host} is taken (another server running?); "
                                  f"choose another with --{name}-port")
        if self.tritonserver is not None:
            if not os.access(self.tritonserver, os.X_OK):
                raise ServerError(f"{self.tritonserver} is not an executable tritonserver")
            cmd, env = self.command(self.tritonserver, None), dict(os.environ)
        else:
            inst = provision(self.tools_dir, log=self.provision_log)
            cmd, env = self.command(inst.binary, inst.backends), inst.env()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)  # Ctrl-C reaches us; we stop it cleanly
        self._reader = threading.Thread(target=self._forward_log, daemon=True)
        self._reader.start()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _forward_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.recent.append(line)
            self.log(line)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
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
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> int:
        """Block until SIGINT/SIGTERM or until the server exits; then stop it. Returns an exit code."""
        def say(msg: str) -> None:
            print(f"[facert] {msg}", file=sys.stderr, flush=True)

        stop = threading.Event()
        old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.is_set():
                if self.proc.poll() is not None:
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

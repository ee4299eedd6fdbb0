"""Cancelled requests, told to the llm step of one server by whoever sees the cancellation first.

A request's cancel key (32 hex digits) names it to every process of the server: the gateway (the
server's front, runtime/serving/gateway.py) draws one per request and passes it in as the request
parameter `facert_cancel_key`; the llm step uses it as the request's CANCEL_KEY. Marking a key is
creating an empty file of that name in the server's cancel directory (under /dev/shm); the llm
checks its request's mark after every token and closes the request when it finds it, and
preprocessing refuses a request whose mark is already there. Two parties mark:

- the gateway, when a client cancels its stream or goes away: it never cancels a request inside
  tritonserver (2.51's gRPC frontend has cancellation races that crash it), it marks the key and
  reads the request's remaining responses itself;
- postprocessing, when Triton hands it a request marked cancelled: 2.51's ensemble marks only the
  step requests it schedules after a cancellation, never the llm request already generating
  (clients that reach tritonserver without the gateway).

The directory comes from FACERT_CANCEL_DIR (set by TritonServer for tritonserver, and so for its
stubs, and for the gateway); without it, one per tritonserver process, named by its pid.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

CANCEL_DIR_ENV = "FACERT_CANCEL_DIR"
CANCEL_KEY_PARAMETER = "facert_cancel_key"
SHM_DIR = Path("/dev/shm")


def cancel_flag_dir(tag: str) -> Path:
    """The cancel directory named by `tag` (a server's own name for itself)."""
    return (SHM_DIR if SHM_DIR.is_dir() else Path(tempfile.gettempdir())) / f"facert-cancel-{tag}"


class CancelFlags:
    KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex

    def __init__(self, directory: str | Path | None = None):
        # without FACERT_CANCEL_DIR: every stub of a server is the tritonserver's child
        self.dir = Path(directory or os.environ.get(CANCEL_DIR_ENV) or cancel_flag_dir(str(os.getppid())))
        self._swept = time.monotonic()

    @classmethod
    def is_key(cls, key: str) -> bool:
        return bool(cls.KEY.fullmatch(key or ""))

    def _path(self, key: str) -> Path | None:
        return self.dir / key if self.is_key(key) else None

    def mark(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            self.dir.mkdir(exist_ok=True)
            path.touch()

    def is_marked(self, key: str) -> bool:
        path = self._path(key)
        return path is not None and path.exists()

    def clear(self, key: str) -> None:
        path = self._path(key)
        if path is not None:
            path.unlink(missing_ok=True)

    def sweep(self, max_age_s: float = 600.0, every_s: float = 60.0) -> None:
        """Remove marks older than max_age_s (at most once every every_s): marks that arrived after
        their request ended, or whose request never reached the llm."""
        if time.monotonic() - self._swept < every_s:
            return
        self._swept = time.monotonic()
        cutoff = time.time() - max_age_s
        for path in self.dir.glob("*") if self.dir.is_dir() else []:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass

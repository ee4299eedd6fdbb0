"""sha256 of checkpoint and engine files, remembered between runs so that checking an unchanged
multi-GB folder again costs a few `stat` calls instead of reading every byte.

Two modes (`FACERT_VERIFY=cached|full`, or `--verify` on the command line):

  cached (default)  a file whose identity (device, inode, size, mtime_ns, ctime_ns) is the one recorded
                    with a full hash of it is not read again; any other file is hashed in full, and
                    the hash recorded for next time.
  full              every file is hashed in full (and its record refreshed).

What `cached` guarantees. The records live outside the folders they describe, in the user's cache
directory ($FACERT_CACHE_DIR, else $XDG_CACHE_HOME/facert, else ~/.cache/facert; created 0700), so
editing a folder cannot edit them. A file changed through the file system has a new ctime: the
kernel sets it to the current time on every write, truncate, chmod or utime, and no system call sets
it back, so restoring the mtime with os.utime still shows; a file replaced (renamed over, copied in)
has a new inode. Either makes the file hashed in full again, and an edited file is refused as
before. A record is written only for a file whose ctime is RACY_SECONDS older than the clock (file
systems stamp times at a coarse clock tick; a file edited within the tick of its record could
otherwise keep its ctime), and only if the file did not change while it was hashed. What `cached`
does not see, and `full` does: bytes changed under the file system (a raw write to the block device,
a disk's silent corruption), an edit made while the system clock was set back to the second of the
recorded ctime (needs root), and a record edited by someone who can write the user's cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

VERIFY_MODES = ("cached", "full")
RACY_SECONDS = 2.0


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The sha256 of every byte of the file (no record consulted)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def add_verify_argument(parser) -> None:
    """`--verify cached|full` on a command that checks hashes; runtime.cli.main exports it as FACERT_VERIFY."""
    parser.add_argument("--verify", choices=VERIFY_MODES,
                        help="how file hashes are checked: cached (default; a file unchanged since its last full "
                             "hash, by inode, size, mtime and ctime, is not read again) or full (every byte, "
                             "every time); default $FACERT_VERIFY")


def verify_mode(mode: str | None = None) -> str:
    """`mode`, else $FACERT_VERIFY, else "cached"; a ValueError for anything but cached or full."""
    mode = mode or os.environ.get("FACERT_VERIFY") or "cached"
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r} "
                         "(FACERT_VERIFY or --verify)")
    return mode


def cache_dir() -> Path:
    if os.environ.get("FACERT_CACHE_DIR"):
        return Path(os.environ["FACERT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facert"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record_path(folder: Path) -> Path:
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:32]
    return cache_dir() / "sha256" / f"{key}.json"


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record.get("files", {}) if isinstance(record, dict) else {}


def _write_record(path: Path, folder: Path, name: str, entry: dict) -> None:
    """Add one file's entry; atomic (readers see the old or the new record), best effort: a cache
    directory that cannot be written only means the file is hashed again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = _read_record(path)  # again: another process may have added entries meanwhile
        files[name] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"folder": str(folder), "files": files}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def file_sha256(path: str | Path, mode: str | None = None) -> str:
    """The sha256 of a file: from its record when `mode` (see verify_mode) is cached and the file is
    the one recorded, else hashed in full (and recorded)."""
    path = Path(path).resolve()
    record = _record_path(path.parent)
    before = os.stat(path)
    if verify_mode(mode) == "cached":
        entry = _read_record(record).get(path.name)
        if isinstance(entry, dict) and entry.get("identity") == _identity(before) and entry.get("sha256"):
            return entry["sha256"]
    digest = sha256_file(path)
    after = os.stat(path)
    settled = time.time_ns() - after.st_ctime_ns > RACY_SECONDS * 1e9
    if _identity(after) == _identity(before) and settled:
        _write_record(record, path.parent, path.name, {"identity": _identity(after), "sha256": digest})
    return digest

"""Hashes recorded between runs (runtime.file_hashes): what is read again, and what is refused.

Reads are observed by counting calls of the function that reads a file's bytes; files are made
RACY_SECONDS old by waiting out a shortened window (0.2 s) instead of the real 2 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from runtime import file_hashes


@pytest.fixture
def reads(monkeypatch, tmp_path):
    """Fresh record directory, a short racy window, and the list of files whose bytes were read."""
    monkeypatch.setenv("FACERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FACERT_VERIFY", raising=False)
    monkeypatch.setattr(file_hashes, "RACY_SECONDS", 0.2)
    seen = []
    real = file_hashes.sha256_file

    def counting(path, *a, **k):
        seen.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(file_hashes, "sha256_file", counting)
    return seen


def _settled_file(tmp_path, name="weights.bin", data=b"facert" * 100_000):
    path = tmp_path / "folder" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    time.sleep(0.3)  # older than the (shortened) racy window
    return path, hashlib.sha256(data).hexdigest()


def test_second_check_reads_nothing_and_full_reads_again(reads, tmp_path, monkeypatch):
    path, digest = _settled_file(tmp_path)
    assert file_hashes.file_sha256(path) == digest
    assert file_hashes.file_sha256(path) == digest
    assert reads == ["weights.bin"]  # the second check was a stat, not a read
    assert file_hashes.file_sha256(path, "full") == digest
    monkeypatch.setenv("FACERT_VERIFY", "full")
    assert file_hashes.file_sha256(path) == digest
    assert reads == ["weights.bin"] * 3
    records = list((tmp_path / "cache" / "sha256").glob("*.json"))
    assert len(records) == 1 and str(path.parent.resolve()) in records[0].read_text()


def test_an_edit_with_the_mtime_put_back_is_read_again(reads, tmp_path):
    """Same size, same mtime (os.utime): the ctime the kernel set on the write tells."""
    path, digest = _settled_file(tmp_path)
    assert file_hashes.file_sha256(path) == digest
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    assert file_hashes.file_sha256(path) == hashlib.sha256(bytes(data)).hexdigest() != digest
    assert reads == ["weights.bin", "weights.bin"]


def test_a_replaced_file_is_read_again(reads, tmp_path):
    path, digest = _settled_file(tmp_path)
    file_hashes.file_sha256(path)
    copy = path.with_name("copy")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # same bytes, a new inode
    assert file_hashes.file_sha256(path) == digest
    assert reads == ["weights.bin", "weights.bin"]


def test_a_fresh_file_is_not_recorded(reads, tmp_path, monkeypatch):
    """A file changed within the racy window could change again within the same clock tick."""
    monkeypatch.setattr(file_hashes, "RACY_SECONDS", 60)
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 1000)
    file_hashes.file_sha256(path)
    file_hashes.file_sha256(path)
    assert reads == ["fresh.bin", "fresh.bin"]


def test_an_unwritable_record_directory_still_verifies(reads, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FACERT_CACHE_DIR", str(blocker))
    path, digest = _settled_file(tmp_path)
    assert file_hashes.file_sha256(path) == digest
    assert file_hashes.file_sha256(path) == digest
    assert reads == ["weights.bin", "weights.bin"]


def test_full_sees_what_the_record_cannot(reads, tmp_path):
    """The stated limit: a record edited by someone who can write the cache directory is trusted by
    `cached`, never by `full`."""
    path, digest = _settled_file(tmp_path)
    file_hashes.file_sha256(path)
    record = next((tmp_path / "cache" / "sha256").glob("*.json"))
    content = json.loads(record.read_text())
    content["files"]["weights.bin"]["sha256"] = "0" * 64
    record.write_text(json.dumps(content))
    assert file_hashes.file_sha256(path) == "0" * 64
    assert file_hashes.file_sha256(path, "full") == digest


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("FACERT_VERIFY", "fast")
    with pytest.raises(ValueError, match="cached, full"):
        file_hashes.verify_mode()

"""The `facert` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def facert(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"facert {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_help_teaches_every_subcommand():
    out = facert("--help").stdout
    for cmd in ("init", "ask", "demo"):
        assert cmd in out
    assert "--layers" in facert("init", "--help").stdout


def test_init_then_ask_json(tmp_path, face_png):
    ck = tmp_path / "ck"
    facert("init", "--model", "tiny", "--out", ck, "--seed", 3)
    img = tmp_path / "face.png"
    img.write_bytes(face_png)
    res = json.loads(facert("ask", img, "Is this person smiling?", "--checkpoint", ck, "--json", "--max-tokens", 5).stdout)
    assert len(res["token_ids"]) == 5 and res["finish_reason"] == "length"
    assert len(res["attributes"]) == 40 and "llm" in res["random_parts"]
    assert res["timings"]["total_ms"] > 0

    from runtime.generate import SamplingParams
    from runtime.pipeline import FacePipeline

    same = FacePipeline.from_checkpoint(ck).ask(face_png, "Is this person smiling?", SamplingParams(max_new_tokens=5))
    assert same.token_ids == res["token_ids"]


def test_ask_stream_prints_answer_attributes_timings_and_random_note(tiny_checkpoint, tmp_path, face_png):
    img = tmp_path / "face.png"
    img.write_bytes(face_png)
    out = facert("ask", img, "Describe the face.", "--checkpoint", tiny_checkpoint, "--stream", "--max-tokens", 4).stdout
    assert "RANDOM weights" in out and "timings:" in out and "constraint rules fired" in out


@pytest.mark.parametrize("content,message", [(b"", "image is empty"), (b"GIF89a garbage", "cannot decode image")])
def test_bad_image_is_a_clear_error(tiny_checkpoint, tmp_path, content, message):
    img = tmp_path / "bad.png"
    img.write_bytes(content)
    proc = facert("ask", img, "Smiling?", "--checkpoint", tiny_checkpoint, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_arguments_are_clear_errors(tiny_checkpoint, tmp_path, face_png):
    img = tmp_path / "face.png"
    img.write_bytes(face_png)
    proc = facert("ask", img, "Smiling?", "--checkpoint", tiny_checkpoint, "--max-tokens", 0, check=False)
    assert proc.returncode == 2 and "max_tokens must be in [1, 4096]" in proc.stderr
    proc = facert("ask", img, "  ", "--checkpoint", tiny_checkpoint, check=False)
    assert proc.returncode == 2 and "question is empty" in proc.stderr
    proc = facert("ask", tmp_path / "missing.png", "Smiling?", "--checkpoint", tiny_checkpoint, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = facert("ask", img, "Smiling?", "--checkpoint", tmp_path, check=False)
    assert proc.returncode == 2 and "config.json is missing" in proc.stderr

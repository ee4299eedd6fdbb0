"""Engines folders: what the manifest records, and the refusals when loading.

Each refusal test edits a copy of a freshly built tiny engines folder and checks that opening it
fails with an EngineError that says which file and which check.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from export.build import Progress, build_engines
from runtime.manifest import EngineError
from runtime.checkpoint import checkpoint_hash
from runtime.cli import DEMO_IMAGE, main
from runtime.engines import open_components, open_pipeline, verify_engines


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    return build_engines(tiny_checkpoint, "onnxruntime", tmp_path_factory.mktemp("engines") / "tiny",
                         progress=Progress(0, quiet=True))


@pytest.fixture
def engines(built, tmp_path):
    """A private copy to edit."""
    return shutil.copytree(built, tmp_path / "engines")


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path, manifest):
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_what_the_issue_asks(built, tiny_checkpoint):
    m = _manifest(built)
    assert m["format"] == "facert-engines" and m["backend"] == "onnxruntime" and m["target"] == "cpu"
    assert m["source"]["sha256"] == checkpoint_hash(tiny_checkpoint)
    assert m["build_command"].startswith("facert build --checkpoint ")
    for tool in ("torch", "onnx", "onnxruntime", "onnxslim", "transformers"):
        assert m["tools"][tool]
    for name, entry in m["components"].items():
        assert len(entry["sha256"]) == 64 and entry["file"]
        assert entry["precision"] == "fp32"
        assert entry["outputs"] and all({"name", "shape", "dtype"} <= set(t) for t in entry["outputs"])
        if entry["kind"] == "onnx":
            assert entry["opset"] >= 17 and entry["target"] == "cpu" and entry["inputs"]
    assert m["components"]["llm_decode"]["data_sha256"]["llm.onnx.data"]
    # the folder runs on its own: config and tokenizer copied, and hashed
    assert {"config.json", "tokenizer.json"} <= set(m["files"])
    assert (built / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()


def test_a_good_folder_opens(engines):
    comps = open_components(engines)
    assert comps.backend == "onnxruntime" and comps.num_image_tokens == 16 and comps.num_seg_tokens == 16


def test_edited_byte_in_a_graph_is_refused(engines):
    _flip_byte(engines / "vision.onnx")
    with pytest.raises(EngineError, match=r"component 'vision'.*vision\.onnx.*sha256.*corrupt or was edited"):
        open_components(engines)


def test_edited_byte_in_the_llm_weights_is_refused(engines):
    _flip_byte(engines / "llm.onnx.data", offset_from_end=1000)
    with pytest.raises(EngineError, match=r"llm\.onnx\.data.*sha256"):
        verify_engines(engines)


def test_edited_config_or_tokenizer_is_refused(engines):
    config = engines / "config.json"
    config.write_text(config.read_text().replace('"seed": 0', '"seed": 1'))
    with pytest.raises(EngineError, match=r"file 'config\.json'.*sha256"):
        open_pipeline(engines)


def test_a_second_open_reads_no_file_and_an_edit_with_the_mtime_put_back_is_refused(engines, monkeypatch):
    """Hashes are recorded by file identity (runtime.file_hashes): reopening an unchanged folder reads
    none of its files; an in-place edit of the same size with the mtime restored is still read and refused."""
    from runtime import file_hashes

    monkeypatch.setattr(file_hashes, "RACY_SECONDS", 0.2)
    time.sleep(0.3)  # the copy's files are older than the (shortened) racy window
    reads = []
    real = file_hashes.sha256_file
    monkeypatch.setattr(file_hashes, "sha256_file", lambda path, *a: reads.append(os.path.basename(path)) or real(path, *a))
    open_components(engines)
    assert {"llm.onnx.data", "vision.onnx", "config.json"} <= set(reads)  # a new copy: read once
    reads.clear()
    open_components(engines)
    assert reads == []
    open_components(engines, verify_mode="full")
    assert "llm.onnx.data" in reads
    reads.clear()
    path = engines / "llm.onnx.data"
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 1000)
        byte = f.read(1)
        f.seek(st.st_size - 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    with pytest.raises(EngineError, match=r"llm\.onnx\.data.*corrupt or was edited"):
        open_components(engines)
    assert reads == ["llm.onnx.data"]


def test_edited_shapes_are_refused(engines):
    m = _manifest(engines)
    out = next(t for t in m["components"]["vision"]["outputs"] if t["name"] == "image_tokens")
    out["shape"][1] = 17  # the graph says 16 image tokens
    _write_manifest(engines, m)
    with pytest.raises(EngineError, match=r"component 'vision'.*image_tokens.*shape mismatch"):
        open_components(engines)


def test_a_graph_swapped_for_another_is_refused(engines):
    """Right hash for the file, but the file is another graph: its names/shapes do not match."""
    m = _manifest(engines)
    shutil.copy(engines / "attributes.onnx", engines / "seg.onnx")
    m["components"]["seg"]["sha256"] = m["components"]["attributes"]["sha256"]
    _write_manifest(engines, m)
    with pytest.raises(EngineError, match=r"component 'seg'.*inputs"):
        open_components(engines)


def test_other_target_is_refused(engines):
    m = _manifest(engines)
    m["target"] = "sm_90"
    for entry in m["components"].values():
        if "target" in entry:
            entry["target"] = "sm_90"
    _write_manifest(engines, m)
    with pytest.raises(EngineError, match=r"built for target sm_90.*runs cpu"):
        open_components(engines)


def test_other_backend_is_refused(engines):
    m = _manifest(engines)
    m["backend"] = "tensorrt"
    _write_manifest(engines, m)
    with pytest.raises(EngineError, match=r"built for backend 'tensorrt', not 'onnxruntime'"):
        open_components(engines)


def test_missing_pieces_are_refused(engines, tmp_path):
    (engines / "llm_decode.onnx").unlink()
    with pytest.raises(EngineError, match=r"component 'llm_decode'.*missing"):
        open_components(engines)
    with pytest.raises(EngineError, match="manifest.json is missing"):
        open_components(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        open_components(tmp_path / "bad")


def test_build_refuses_bad_arguments(tiny_checkpoint, built, tmp_path):
    with pytest.raises(EngineError, match="fp32 graphs only"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "x", precision="fp16")
    with pytest.raises(EngineError, match="--max-batch"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "x", max_batch=0)
    with pytest.raises(EngineError, match="--force"):
        build_engines(tiny_checkpoint, "onnxruntime", built)


def test_tensorrt_build_says_what_is_missing(tiny_checkpoint, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the refusal path cannot be seen")
    except ImportError:
        pass
    with pytest.raises(Exception, match="TensorRT") as info:
        build_engines(tiny_checkpoint, "tensorrt", tmp_path / "trt", progress=Progress(0, quiet=True))
    assert "install" in str(info.value).lower() or "GPU" in str(info.value)
    assert not (tmp_path / "trt").exists()  # it fails before exporting anything
    for backend in ("tensorrt", "tensorrt-llm"):
        assert main(["build", "--checkpoint", str(tiny_checkpoint), "--backend", backend, "--precision", "fp16",
                     "--out", str(tmp_path / backend)]) == 2
        assert "TensorRT" in capsys.readouterr().err  # a one-line error, no traceback


def test_cli_build_then_ask(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACERT_VERIFY", "cached")  # restored after the test: `--verify full` exports it
    out = tmp_path / "engines" / "tiny"
    assert main(["build", "--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "exporting llm" in err and "manifest.json" in err  # the progress display
    assert main(["ask", str(DEMO_IMAGE), "Is this person smiling?", "--engines", str(out), "--max-tokens", "5",
                 "--json", "--verify", "full"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["token_ids"]) == 5 and answer["attributes"]
    assert os.environ["FACERT_VERIFY"] == "full"
    _flip_byte(out / "seg.onnx")
    assert main(["ask", str(DEMO_IMAGE), "Hi?", "--engines", str(out)]) == 2
    assert "seg.onnx" in capsys.readouterr().err

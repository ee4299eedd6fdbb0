"""Shared fixtures: small checkpoints built once per session in a temporary folder."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from runtime.checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, progress=_quiet)


@pytest.fixture(scope="session")
def tiny_facellm_checkpoint(tmp_path_factory):
    from runtime.checkpoint import init_checkpoint

    return init_checkpoint("tiny-facellm", tmp_path_factory.mktemp("ckpt") / "tiny-facellm", seed=0, progress=_quiet)


@pytest.fixture(scope="session")
def tiny_long_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a 4,096-token context (its config only: the same weights, the same
    answers), so that one served answer can run for thousands of tokens: seconds, even behind the
    in-flight scheduler, which makes the tiny model's tokens in a millisecond or two each."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("ckpt") / "tiny-4k"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    config["llm"]["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoint, tmp_path_factory):
    """onnxruntime engines of the tiny checkpoint (shared by the export and in-flight tests)."""
    from export.build import Progress, build_engines

    return build_engines(tiny_checkpoint, "onnxruntime", tmp_path_factory.mktemp("engines") / "tiny",
                         progress=Progress(0, quiet=True))


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """The demo model: real SmolLM2-135M-Instruct LLM (about 30 s to build)."""
    from runtime.checkpoint import init_checkpoint

    return init_checkpoint("demo", tmp_path_factory.mktemp("ckpt") / "demo", seed=0, progress=_quiet)


@pytest.fixture(scope="session")
def demo_engines(demo_checkpoint, tmp_path_factory):
    """The demo model's fp32 onnxruntime engines (about 1-2 minutes to build on 2 cores)."""
    from export.build import Progress, build_engines

    return build_engines(demo_checkpoint, "onnxruntime", tmp_path_factory.mktemp("engines") / "demo",
                         progress=Progress(0, quiet=True))


@pytest.fixture(scope="session")
def face_png() -> bytes:
    from runtime.cli import DEMO_IMAGE

    return DEMO_IMAGE.read_bytes()


@pytest.fixture(scope="session")
def face_images(face_png) -> list[bytes]:
    """Three distinct real-photo crops (PNG bytes) of the astronaut image."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(face_png)).convert("RGB")
    out = []
    for box in ((0, 0, 512, 512), (100, 0, 400, 300), (150, 20, 350, 260)):
        buf = io.BytesIO()
        img.crop(box).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="session", autouse=True)
def _hash_records(tmp_path_factory):
    """Hash records (runtime.file_hashes) go to a private folder, not the user's ~/.cache."""
    os.environ["FACERT_CACHE_DIR"] = str(tmp_path_factory.mktemp("facert-cache"))

"""Checkpoints: byte-identical init, round trip, and refusal of broken or mismatched directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import (
    CheckpointError,
    init_checkpoint,
    load_checkpoint,
    load_parser_pth,
    save_checkpoint,
    sha256_file,
)
from runtime.specs import SPEC_NAMES, get_spec


def quiet(*_a):
    pass


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_init_is_byte_identical_for_a_seed(tmp_path):
    a = init_checkpoint("tiny", tmp_path / "a", seed=5, progress=quiet)
    b = init_checkpoint("tiny", tmp_path / "b", seed=5, progress=quiet)
    c = init_checkpoint("tiny", tmp_path / "c", seed=6, progress=quiet)
    assert _files(a) == _files(b)
    assert _files(a)["model.safetensors"] != _files(c)["model.safetensors"]


def test_round_trip_keeps_every_tensor(tiny_checkpoint, tmp_path):
    model, tok, cfg = load_checkpoint(tiny_checkpoint)
    out = save_checkpoint(model, tok, cfg, tmp_path / "again")
    again, _, cfg2 = load_checkpoint(out)
    assert cfg2 == cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert sha256_file(out / "model.safetensors") == sha256_file(tiny_checkpoint / "model.safetensors")


def test_layers_caps_depth_and_records_it(tmp_path):
    d = init_checkpoint("tiny", tmp_path / "l1", layers=1, progress=quiet)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["llm"]["num_hidden_layers"] == 1
    assert cfg["vision"]["num_hidden_layers"] == 2  # LLaVA reads layer -2, so one more
    model, _, _ = load_checkpoint(d)
    assert len(model.llm.model.layers) == 1


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_is_refused_with_hash_message(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "bad")
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256.*corrupt or was edited"):
        load_checkpoint(d)


def test_truncated_weights_are_refused_clearly(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "trunc")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_checkpoint(d, verify=False)


def _rewrite(d, mutate):
    w = d / "model.safetensors"
    tensors = load_file(str(w))
    mutate(tensors)
    save_file(tensors, str(w), metadata={"format": "pt"})
    (d / "checksums.json").write_text(json.dumps({"model.safetensors": sha256_file(w)}))


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("projector.linear_2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): projector\.linear_2\.weight"):
        load_checkpoint(d)


def test_mis_shaped_tensor_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "shape")
    _rewrite(d, lambda t: t.__setitem__("seg.pos_embed", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*seg\.pos_embed: file \(3, 3\)"):
        load_checkpoint(d)


def test_config_that_does_not_match_weights_is_refused(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm"]["hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="llm.model.embed_tokens.weight: file"):
        load_checkpoint(d)


@pytest.mark.parametrize("remove,message", [("config.json", "config.json is missing"),
                                            ("model.safetensors", "model.safetensors is missing")])
def test_incomplete_directory_is_refused(tiny_checkpoint, tmp_path, remove, message):
    d = _copy(tiny_checkpoint, tmp_path / "inc")
    (d / remove).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_bisenet_pth_loads_with_weights_only_and_refuses_pickled_code(tmp_path):
    from runtime.models.bisenet import BiSeNet

    torch.manual_seed(0)
    src = BiSeNet(19, width=8)
    torch.save(src.state_dict(), tmp_path / "79999_iter.pth")
    dst = BiSeNet(19, width=8)
    state = load_parser_pth(tmp_path / "79999_iter.pth", dst)
    dst.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(src.eval()(x), dst.eval()(x))

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_parser_pth(tmp_path / "evil.pth", dst)
    assert (tmp_path / "victim").exists()


def test_real_bisenet_checkpoint_names():
    """The names the public 79999_iter.pth carries (a sample of each module kind)."""
    from runtime.models.bisenet import BiSeNet

    names = set(BiSeNet(19).state_dict())
    for k in ("cp.resnet.conv1.weight", "cp.resnet.layer1.0.conv1.weight", "cp.resnet.layer2.0.downsample.0.weight",
              "cp.resnet.layer4.1.bn2.running_var", "cp.arm16.conv.conv.weight", "cp.arm32.conv_atten.weight",
              "cp.arm32.bn_atten.weight", "cp.conv_head32.conv.weight", "cp.conv_head16.bn.bias",
              "cp.conv_avg.conv.weight", "ffm.convblk.conv.weight", "ffm.conv1.weight", "ffm.conv2.weight",
              "conv_out.conv.conv.weight", "conv_out.conv_out.weight", "conv_out16.conv_out.weight",
              "conv_out32.conv.bn.running_mean"):
        assert k in names, k
    assert not any(k.startswith("sp.") for k in names)
    assert BiSeNet(19).state_dict()["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)


def test_full_size_specs_match_reference_shapes():
    """DESIGN's hyperparameters, checked through transformers' own config classes (no weights built)."""
    from transformers import CLIPVisionConfig, InternVLVisionConfig

    from runtime.models.mllm import llm_config

    fi = get_spec("faceinsight-7b")
    v = CLIPVisionConfig(**fi["vision"])
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size // v.patch_size) ** 2 == 576
    llama = llm_config(fi["llm"])
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers, llama.num_attention_heads) == (4096, 11008, 32, 32)
    for name, dims in (("facellm-1b", (896, 4864, 24, 14, 2)), ("facellm-8b", (3584, 18944, 28, 28, 4))):
        s = get_spec(name)
        iv = InternVLVisionConfig(**s["vision"])
        assert (iv.hidden_size, iv.num_hidden_layers, iv.image_size[0] // iv.patch_size[0]) == (1024, 24, 32)
        q = llm_config(s["llm"])
        assert (q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads,
                q.num_key_value_heads) == dims
    assert set(SPEC_NAMES) >= {"tiny", "demo", "faceinsight-7b", "facellm-1b", "facellm-8b"}


def test_unknown_spec_is_refused():
    with pytest.raises(ValueError, match="unknown model spec 'huge'"):
        get_spec("huge")


def test_loading_only_some_parts_leaves_the_rest_without_weights(tiny_checkpoint, face_png):
    from runtime.generate import SamplingParams
    from runtime.pipeline import FacePipeline

    full, _, _ = load_checkpoint(tiny_checkpoint)
    vision, _, _ = load_checkpoint(tiny_checkpoint, parts=("vision",))
    assert vision.llm.model.embed_tokens.weight.is_meta and vision.parser.cp.resnet.conv1.weight.is_meta
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(vision.encode_image(x)[0], full.encode_image(x)[0])
    llm_only = FacePipeline.from_checkpoint(tiny_checkpoint, parts=("llm",))
    assert not llm_only.c.model.llm.lm_head.weight.is_meta and llm_only.c.model.seg.pos_embed.is_meta
    with pytest.raises(ValueError, match="unknown model parts"):
        load_checkpoint(tiny_checkpoint, parts=("eyes",))


def test_an_untied_llm_loads_as_its_table_and_its_body(tiny_checkpoint):
    """A build reads an untied LLM's token-embedding table and the rest one at a time: each load
    holds its own part's weights, equal to the full load's, and leaves the other on meta (the
    rotary frequencies, a buffer no file holds, stay real)."""
    full, _, _ = load_checkpoint(tiny_checkpoint)
    assert not full.llm.config.tie_word_embeddings
    table, _, _ = load_checkpoint(tiny_checkpoint, parts=("llm_embed_tokens",))
    body, _, _ = load_checkpoint(tiny_checkpoint, parts=("llm_body",))
    torch.testing.assert_close(table.llm.model.embed_tokens.weight, full.llm.model.embed_tokens.weight)
    assert table.llm.lm_head.weight.is_meta and table.llm.model.layers[0].mlp.down_proj.weight.is_meta
    assert body.llm.model.embed_tokens.weight.is_meta and body.vision_tower is not None
    for name, weight in full.llm.named_parameters():
        if not name.startswith("model.embed_tokens."):
            torch.testing.assert_close(body.llm.get_parameter(name), weight)
    for name, buffer in full.llm.named_buffers():
        torch.testing.assert_close(body.llm.get_buffer(name), buffer)
    assert next(body.vision_tower.parameters()).is_meta


@pytest.mark.parametrize("kind", ["llava-hf", "internvl-hf"])
def test_hf_directories_load_by_parts_too(kind, tmp_path):
    """What `facert build` does to hold one part at a time: the structure alone, then each part."""
    from hf_checkpoints import make_internvl_hf, make_llava_hf

    path = (make_llava_hf if kind == "llava-hf" else make_internvl_hf)(tmp_path / kind)
    full, _, _ = load_checkpoint(path)
    skeleton, tok, spec = load_checkpoint(path, parts=())
    assert all(p.is_meta for p in skeleton.parameters()) and spec["spec"] == kind and tok is not None
    llm, _, _ = load_checkpoint(path, parts=("llm",))
    # transformers 4.57 wraps CLIP's tower one level deeper (vision_model.embeddings): find it by name
    patch = [p for n, p in llm.vision_tower.named_parameters() if "patch_embedding" in n]
    assert patch and all(p.is_meta for p in patch)
    for name, p in llm.llm.named_parameters():
        torch.testing.assert_close(p, dict(full.llm.named_parameters())[name])

"""The request path's guards: image decoding limits, prompt building, the prompt table, constraints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.models.attributes import (
    ATTRIBUTE_INDEX,
    CELEBA_ATTRIBUTES,
    CONSTRAINT_TABLE,
    apply_constraints,
    constraint_violations,
)
from runtime.preprocess import ImageError, decode_image, preprocess
from runtime.prompt import PromptError, build_prompt_ids, splice_prompt_table
from runtime.specs import get_spec
from runtime.tokenizer import byte_level_tokenizer


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------- preprocessing

def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.size == (20, 40)
    top = np.asarray(out)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the left strip is now on top


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"definitely not an image", "cannot decode"),
    (_png(Image.new("RGB", (8, 8)))[:40], "cannot decode"),  # truncated PNG
])
def test_bad_bytes_are_refused(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png(Image.new("1", (12000, 12000)), optimize=True)  # 144 MP in a few KiB
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match=r"12000x12000 = 144000000 pixels, over the 40000000-pixel bound"):
        decode_image(bomb)


def test_pixel_bound_is_configurable():
    data = _png(Image.new("RGB", (30, 30)))
    assert decode_image(data, max_pixels=900).size == (30, 30)
    with pytest.raises(ImageError, match="over the 899-pixel bound"):
        decode_image(data, max_pixels=899)


def test_non_bytes_are_refused():
    with pytest.raises(ImageError, match="encoded bytes"):
        decode_image("a path.png")  # type: ignore[arg-type]


def test_preprocess_shapes_and_normalisation(face_png):
    spec = get_spec("faceinsight-7b")
    x = preprocess(face_png, spec)
    assert x.pixel_values.shape == (3, 336, 336) and x.pixel_values.dtype == np.float32
    assert x.parser_pixels.shape == (3, 512, 512)
    # A mid-grey image maps to (0.5 - mean) / std per channel.
    grey = preprocess(_png(Image.new("RGB", (64, 64), (128, 128, 128))), spec)
    expect = (128 / 255 - np.array(spec["image_mean"])) / np.array(spec["image_std"])
    np.testing.assert_allclose(grey.pixel_values.mean(axis=(1, 2)), expect, atol=1e-3)
    # Padding to square used the mean colour, so the padded band normalises to ~0.
    bars = preprocess(_png(Image.new("RGB", (64, 32), (0, 0, 0))), spec).pixel_values
    assert abs(bars[:, :20].mean()) < 0.02 and bars[:, 168].mean() < -1.0
    fl = preprocess(face_png, get_spec("facellm-1b"))
    assert fl.pixel_values.shape == (3, 448, 448) and fl.parser_pixels is None


# ------------------------------------------------------------------------------- prompts

def test_prompt_places_image_then_seg_placeholders():
    tok = byte_level_tokenizer()
    ids = build_prompt_ids(tok, "Smiling?", vocab_size=320, num_image_tokens=4, num_seg_tokens=3)
    virtual = [i for i in ids if i >= 320]
    assert virtual == list(range(320, 327))
    first = ids.index(320)
    assert ids[first:first + 4] == [320, 321, 322, 323]
    text_ids = [i for i in ids if i < 320]
    text = tok.decode(text_ids)
    assert text.startswith("<|im_start|>user\n") and "Smiling?" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("question,message", [("", "empty"), ("   \n", "empty"), ("x" * 20000, "character bound"),
                                              ("look at <image>", "reserved markers"), (None, "must be text")])
def test_bad_questions_are_refused(question, message):
    with pytest.raises(PromptError, match=message):
        build_prompt_ids(byte_level_tokenizer(), question, 320, 4)


def test_prompt_over_the_context_is_refused():
    with pytest.raises(PromptError, match=r"over the model's 50-token bound"):
        build_prompt_ids(byte_level_tokenizer(), "a long question " * 5, 320, 4, max_prompt_tokens=50)


def test_splice_puts_each_requests_rows_at_its_placeholders():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 6)
    table = torch.randn(2, 3, 6)
    ids = torch.tensor([[1, 10, 11, 12, 2], [3, 12, 10, 4, 5]])
    out = splice_prompt_table(emb, ids, table, vocab_size=10)
    torch.testing.assert_close(out[0, 1:4], table[0])
    torch.testing.assert_close(out[1, 1], table[1, 2])
    torch.testing.assert_close(out[1, 2], table[1, 0])
    torch.testing.assert_close(out[0, 0], emb.weight[1])
    torch.testing.assert_close(out[1, 4], emb.weight[5])


# ------------------------------------------------------------------------------- constraints

def _probs(**present):
    p = torch.full((len(CELEBA_ATTRIBUTES),), 0.1)
    for name, v in present.items():
        p[ATTRIBUTE_INDEX[name]] = v
    return p


def test_hair_colours_are_mutually_exclusive():
    res = apply_constraints(_probs(Black_Hair=0.9, Blond_Hair=0.7, Brown_Hair=0.6))
    assert res.fired == [["one_hair_colour"]]
    assert res.probs[ATTRIBUTE_INDEX["Black_Hair"]] == pytest.approx(0.9)
    assert res.probs[ATTRIBUTE_INDEX["Blond_Hair"]] == pytest.approx(0.1)
    assert res.probs[ATTRIBUTE_INDEX["Brown_Hair"]] == pytest.approx(0.1)


def test_bald_beats_bangs_only_when_more_likely():
    res = apply_constraints(_probs(Bald=0.8, Bangs=0.6))
    assert "bald_no_bangs" in res.fired[0] and res.probs[ATTRIBUTE_INDEX["Bangs"]] < 0.5
    res = apply_constraints(_probs(Bald=0.55, Bangs=0.95))
    assert res.probs[ATTRIBUTE_INDEX["Bald"]] == pytest.approx(0.05)
    assert res.probs[ATTRIBUTE_INDEX["Bangs"]] == pytest.approx(0.95)


def test_consistent_input_is_untouched():
    p = _probs(Black_Hair=0.9, Smiling=0.8, No_Beard=0.9, Young=0.7)
    res = apply_constraints(p)
    assert res.fired == [[]]
    torch.testing.assert_close(res.probs, p)


def test_constraints_on_random_batches_satisfy_every_rule_and_only_lower():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(256, len(CELEBA_ATTRIBUTES), generator=g)
    before = constraint_violations(p)
    res = apply_constraints(p)
    assert all(v == [] for v in constraint_violations(res.probs))
    assert torch.all(res.probs <= p + 1e-7)
    assert sum(map(len, before)) > 0
    # A rule fires only if it was violated on input (an earlier rule may already have resolved it).
    assert all(set(res.fired[b]) <= set(before[b]) for b in range(256))
    assert sum(map(len, res.fired)) > 0
    names = [r[0] for r in CONSTRAINT_TABLE]
    assert len(names) == len(set(names))

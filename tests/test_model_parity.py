"""Parity: facert's model paths against transformers' own LLaVA and InternVL classes, and the
generation loop against itself (batched vs one-by-one, KV cache vs recompute).

Tolerance: fp32 everywhere, logits within atol 1e-4 / rtol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.checkpoint import facert_key_to_hf, load_checkpoint
from runtime.generate import SamplingParams, TorchLLM, generate
from runtime.backends.torch_backend import TorchComponents
from runtime.pipeline import FacePipeline
from runtime.preprocess import preprocess
from runtime.prompt import build_prompt_ids, image_layout, question_messages, splice_prompt_table

ATOL = RTOL = 1e-4


def _prompt_ids(model, tok, question, with_seg=False):
    layout = image_layout(model.family, tok, model.num_image_tokens, model.num_seg_tokens if with_seg else 0)
    return build_prompt_ids(tok, question_messages(question, 1), layout, [1], model.vocab_size)


def _our_logits(model, tok, pixel_values, question, with_seg=False, parser_pixels=None):
    ids = _prompt_ids(model, tok, question, with_seg)
    with torch.no_grad():
        image_tokens, _ = model.encode_image(pixel_values)
        table = image_tokens
        if with_seg:
            table = torch.cat([table, model.seg(model.parse_face(parser_pixels))], dim=1)
        ids_t = torch.tensor([ids])
        embeds = splice_prompt_table(model.llm.get_input_embeddings(), ids_t, table, model.vocab_size)
        return ids_t, model.llm(inputs_embeds=embeds).logits


def _llava_from(model):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from runtime.models.mllm import llm_config

    spec = model.spec
    image_token = model.vocab_size - 1  # an id the byte tokenizer never produces
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]).to_dict(),
                      text_config=llm_config(spec["llm"]).to_dict(), image_token_index=image_token,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=model.num_image_tokens)
    llava = LlavaForConditionalGeneration(cfg).eval()
    state = {facert_key_to_hf(k): v for k, v in model.state_dict().items() if facert_key_to_hf(k)}
    missing, unexpected = llava.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing) is (not missing or True)
    assert not [m for m in missing if not m.startswith("lm_head")], missing
    return llava, image_token


def test_faceinsight_matches_transformers_llava(tiny_checkpoint, face_png):
    torch.manual_seed(1)
    model, tok, _ = load_checkpoint(tiny_checkpoint)
    llava, image_token = _llava_from(model)
    pixels = torch.randn(1, 3, 32, 32)  # fresh random input
    ids, ours = _our_logits(model, tok, pixels, "Is this person smiling?")
    hf_ids = torch.where(ids >= model.vocab_size, torch.full_like(ids, image_token), ids)
    with torch.no_grad():
        theirs = llava(input_ids=hf_ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def test_llava_hf_directory_loads_and_matches(tiny_checkpoint, tmp_path):
    """A llava-hf directory written by transformers loads through facert's loader with equal logits."""
    model, tok, _ = load_checkpoint(tiny_checkpoint)
    llava, image_token = _llava_from(model)
    llava.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    loaded, tok2, spec = load_checkpoint(tmp_path / "llava")
    # a llava-hf directory is plain LLaVA: no parser, seg branch or attribute head, nothing random
    assert spec["family"] == "faceinsight" and spec["random_parts"] == [] and loaded.num_seg_tokens == 0
    assert loaded.parser is None and loaded.seg is None and loaded.attributes is None
    pixels = torch.randn(1, 3, 32, 32)
    _, a = _our_logits(model, tok, pixels, "Describe the face.")
    _, b = _our_logits(loaded, tok2, pixels, "Describe the face.")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def _internvl_from(model):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from runtime.models.mllm import llm_config

    spec = model.spec
    image_token = model.vocab_size - 1
    cfg = InternVLConfig(vision_config=dict(spec["vision"]), text_config=llm_config(spec["llm"]).to_dict(),
                         image_token_id=image_token, image_seq_length=model.num_image_tokens,
                         downsample_ratio=spec["downsample_ratio"], vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=spec["llm"]["tie_word_embeddings"])
    hf = InternVLForConditionalGeneration(cfg).eval()
    state = {facert_key_to_hf(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if not m.startswith("lm_head")], missing
    hf.tie_weights()
    return hf, image_token


def test_facellm_matches_transformers_internvl(tiny_facellm_checkpoint, tmp_path):
    model, tok, _ = load_checkpoint(tiny_facellm_checkpoint)
    hf, image_token = _internvl_from(model)
    pixels = torch.randn(2, 3, 32, 32)
    ids, ours = _our_logits(model, tok, pixels[:1], "What is the facial expression?")
    hf_ids = torch.where(ids >= model.vocab_size, torch.full_like(ids, image_token), ids)
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=pixels[:1]).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)

    # The same weights saved as an InternVL3-hf directory load through facert's loader.
    hf.save_pretrained(tmp_path / "internvl")
    tok.save_pretrained(tmp_path / "internvl")
    loaded, tok2, spec = load_checkpoint(tmp_path / "internvl")
    assert spec["family"] == "facellm"
    _, again = _our_logits(loaded, tok2, pixels[:1], "What is the facial expression?")
    torch.testing.assert_close(ours, again, atol=ATOL, rtol=RTOL)


QUESTIONS = ["Is this person smiling?", "Describe the hair.",
             "How old does this person look, and are they wearing glasses or a hat?"]


@pytest.mark.parametrize("ckpt", ["tiny_checkpoint", "tiny_facellm_checkpoint"])
def test_batched_generation_equals_one_by_one(ckpt, request, face_images):
    pipe = FacePipeline.from_checkpoint(request.getfixturevalue(ckpt))
    params = SamplingParams(max_new_tokens=10)
    batched = pipe.ask_batch(face_images, QUESTIONS, params)
    for img, q, b in zip(face_images, QUESTIONS, batched):
        alone = pipe.ask(img, q, params)
        assert alone.token_ids == b.token_ids
        torch.testing.assert_close(alone.first_logits, b.first_logits, atol=ATOL, rtol=RTOL)
    assert len({tuple(b.token_ids) for b in batched}) > 1, "different prompts should not all give one answer"


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny_checkpoint, face_images):
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s) for s in (7, 8, 7)]
    batch = pipe.ask_batch([face_images[0]] * 3, [QUESTIONS[0]] * 3, params)
    assert batch[0].token_ids == batch[2].token_ids  # same seed, same request
    alone = pipe.ask(face_images[0], QUESTIONS[0], SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7))
    assert alone.token_ids == batch[0].token_ids
    greedy = pipe.ask(face_images[0], QUESTIONS[0], SamplingParams(max_new_tokens=12))
    assert any(b.token_ids != greedy.token_ids for b in batch)


@pytest.mark.parametrize("ckpt", ["tiny_checkpoint", "tiny_facellm_checkpoint"])
def test_kv_cache_decode_equals_recompute(ckpt, request, face_images):
    model, tok, _ = load_checkpoint(request.getfixturevalue(ckpt))
    comps = TorchComponents(model)
    embeds = []
    for img, q in zip(face_images, QUESTIONS):
        x = preprocess(img, model.spec)
        tokens, _ = comps.encode_image(x.pixel_values)
        tokens = tokens.reshape(1, -1, tokens.shape[-1])  # every tile's rows, in order
        layout = image_layout(model.family, tok, model.num_image_tokens, 0)
        ids = build_prompt_ids(tok, question_messages(q, 1), layout, x.tiles, model.vocab_size)
        embeds.append(splice_prompt_table(comps.llm.embed, torch.tensor([ids]), tokens, model.vocab_size)[0])
    llm = TorchLLM(model.llm)
    params = SamplingParams(max_new_tokens=10)
    cached = generate(llm, embeds, params, use_cache=True)
    recomputed = generate(llm, embeds, params, use_cache=False)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) == 10 for t in cached.tokens)


def test_stop_tokens_end_generation(tiny_checkpoint, face_images):
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    free = pipe.ask(face_images[0], QUESTIONS[0], SamplingParams(max_new_tokens=8))
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = pipe.ask(face_images[0], QUESTIONS[0], SamplingParams(max_new_tokens=8, stop_token_ids=(stop_at,)))
    assert stopped.token_ids == free.token_ids[:first]
    assert stopped.finish_reason == "stop"


def test_streaming_callback_concatenates_to_answer(tiny_checkpoint, face_images):
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    pieces = []
    ans = pipe.ask(face_images[1], "Describe the face.", SamplingParams(max_new_tokens=16), on_text=pieces.append)
    assert "".join(pieces) == ans.text
    assert set(ans.timings) >= {"preprocess_ms", "vision_ms", "parser_ms", "seg_ms", "prefill_ms", "decode_ms", "total_ms"}
    assert np.isclose(sum(ans.attributes_raw.values()) > 0, True)
    assert len(ans.attributes) == 40


def test_reused_bucketed_caches_give_the_same_tokens(tiny_checkpoint, face_images):
    """The GPU fast path's cache reuse (per batch and length bucket, reset between requests), run on CPU."""
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    params = SamplingParams(max_new_tokens=9)
    expected = [a.token_ids for a in pipe.ask_batch(face_images, QUESTIONS, params)]
    pipe.c.llm = TorchLLM(pipe.c.model.llm, reuse_caches=True)
    for _ in range(2):  # the second round runs on the reset caches of the first
        assert [a.token_ids for a in pipe.ask_batch(face_images, QUESTIONS, params)] == expected
    assert all(length % TorchLLM.CACHE_BUCKET == 0 for _, length in pipe.c.llm._caches)
    assert not pipe.c.llm.cuda_graphs  # switched off on CPU


def test_llava_hf_directory_refuses_a_lone_face_parser(tiny_checkpoint, tmp_path):
    """A parser file alone cannot give a plain LLaVA seg tokens (no trained seg branch): said, not ignored."""
    from runtime.checkpoint import CheckpointError

    model, tok, _ = load_checkpoint(tiny_checkpoint)
    llava, _ = _llava_from(model)
    d = tmp_path / "llava"
    llava.save_pretrained(d)
    tok.save_pretrained(d)
    with pytest.raises(CheckpointError, match="runs as plain LLaVA"):
        load_checkpoint(d, parser_pth=tmp_path / "79999_iter.pth")

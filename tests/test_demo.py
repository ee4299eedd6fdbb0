"""The demo model: the real SmolLM2-135M-Instruct behind seeded-random face components."""

from __future__ import annotations

import torch

from runtime.checkpoint import SMOLLM2_GGUF, _smollm2_dir, load_checkpoint
from runtime.generate import SamplingParams
from runtime.backends.torch_backend import TorchComponents
from runtime.pipeline import FacePipeline


def test_demo_llm_is_smollm2_and_answers(demo_checkpoint, face_png):
    from transformers import AutoModelForCausalLM

    model, tok, cfg = load_checkpoint(demo_checkpoint)
    assert "llm" not in cfg["random_parts"] and "SmolLM2" in cfg["real_parts"]["llm"]
    assert set(cfg["random_parts"]) == {"vision_tower", "projector", "parser", "seg", "attributes"}
    reference = AutoModelForCausalLM.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF,
                                                     local_files_only=True, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model.llm(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    del reference

    pipe = FacePipeline(TorchComponents(model), tok)
    ans = pipe.ask(face_png, "What is in this picture? Answer in one sentence.", SamplingParams(max_new_tokens=24))
    assert ans.text.strip() and len(ans.token_ids) > 3
    assert all(t < model.vocab_size for t in ans.token_ids)

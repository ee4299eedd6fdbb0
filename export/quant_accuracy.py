"""How close a quantized LLM stays to the fp32 model it was built from.

For each prompt (its embeddings, so text-only and image+question prompts alike):

* the reference (fp32) generates its greedy continuation (at most `new_tokens`, up to and
  including its end-of-turn token);
* both models are then run teacher-forced on the prompt + that continuation -- prefill, then
  one decode step per continuation token through the KV cache, the way the engines generate --
  and compared at every position of the continuation: top-1 agreement (the quantized model's
  argmax is the reference's greedy token) and KL(p_ref || p_quant) of the next-token distributions;
* the quantized model generates its own greedy answer, which counts as identical when it is
  token for token the reference's.

`compare` returns the three figures over a prompt set; `GOALS` are the agreement a precision must
reach to be called fit (issue 18: int8 >= 98 %, int4 >= 90 %). `facert build --precision
int8|int4` measures its engines against the torch model it exported, on `BUILD_CHECK_QUESTIONS`,
and records the result in the manifest; benchmarks/bench_quant.py measures the demo model on the
full set (`TEXT_QUESTIONS` + `IMAGE_QUESTIONS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from runtime.generate import SamplingParams, generate

GOALS = {"int8": 0.98, "int4": 0.90}  # top-1 next-token agreement with fp32, teacher-forced
DEFAULT_NEW_TOKENS = 16

TEXT_QUESTIONS = (
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Name three primary colours.",
    "What is 12 times 7?",
    "Write a short greeting for a new colleague.",
    "What does a camera lens do?",
    "Give one tip for sleeping better.",
    "Which planet is closest to the sun?",
    "What is the boiling point of water at sea level?",
    "Translate 'good morning' into Spanish.",
    "What is a face recognition system?",
    "List two reasons people wear glasses.",
    "How many legs does a spider have?",
    "Describe a smile in a few words.",
    "What is the opposite of happy?",
    "Why do people frown?",
    "Summarise what a neural network is.",
    "What colour are most human eyes?",
    "Suggest a name for a pet cat.",
    "What is the largest ocean on Earth?",
    "How do you say thank you in French?",
    "What is photosynthesis?",
    "Give an example of a facial expression that shows surprise.",
    "What does a barber do?",
    "Is a tomato a fruit or a vegetable?",
    "What is the square root of 81?",
    "Tell me a fun fact about owls.",
    "What makes a good portrait photograph?",
    "Why is sunscreen important?",
    "Name a famous painting of a face.",
)

IMAGE_QUESTIONS = (
    "Describe this person's face: hair, expression and any accessories.",
    "Is this person smiling?",
    "What colour is this person's hair?",
    "Is the person wearing glasses?",
    "How old does this person look?",
    "What is the person wearing?",
    "Describe the background of this photo.",
    "Does this person have a beard?",
    "What emotion does this face show?",
    "Is this person looking at the camera?",
    "Describe the lighting in this photo.",
    "Is this person wearing a hat?",
    "What shape is this person's face?",
    "Describe the person's eyebrows.",
    "Is the person's mouth open or closed?",
    "What could this person's job be?",
    "Is this a close-up or a full-body photo?",
    "Describe this image in one sentence.",
    "Does the person wear any jewellery?",
    "What is the most noticeable feature of this face?",
)

BUILD_CHECK_QUESTIONS = TEXT_QUESTIONS[:8]


def text_prompt_ids(tokenizer, family: str, vocab_size: int, question: str) -> list[int]:
    """A text-only user turn through the checkpoint's own chat template (no image)."""
    from runtime.prompt import build_prompt_ids, image_layout, question_messages

    return build_prompt_ids(tokenizer, question_messages(question, 0), image_layout(family, tokenizer, 1), [],
                            vocab_size)


def text_prompts(llm, tokenizer, family: str, vocab_size: int, questions) -> list[torch.Tensor]:
    """Prompt embeddings [T, D] (the llm's own table) of text-only questions."""
    return [llm.embed(torch.tensor(text_prompt_ids(tokenizer, family, vocab_size, q))).float().cpu()
            for q in questions]


def eos_ids(tokenizer) -> tuple[int, ...]:
    return tuple(i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                 if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


@torch.inference_mode()
def forced_logits(llm, embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Next-token logits [len(tokens), V] at each position of prompt + tokens, teacher-forced:
    row i predicts tokens[i] (row 0 from the prefill, row i >= 1 from the decode step fed tokens[i-1])."""
    t = embeds.shape[0]
    cache = llm.new_cache(1, t + len(tokens))
    length = llm.cache_length(cache) if hasattr(llm, "cache_length") else t + len(tokens)
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, :t] = 1
    positions = torch.arange(t)[None]
    rows = [llm.forward(embeds[None].to(llm.device), mask.to(llm.device), positions.to(llm.device), cache,
                        torch.arange(t, device=llm.device)).float().cpu()]
    for i, tok in enumerate(tokens[:-1]):
        mask[:, t + i] = 1
        step = llm.embed(torch.tensor([[tok]])).float()
        rows.append(llm.forward(step.to(llm.device), mask.to(llm.device), torch.tensor([[t + i]], device=llm.device),
                                cache, torch.tensor([t + i], device=llm.device)).float().cpu())
    return torch.cat(rows)


def greedy(llm, embeds: torch.Tensor, new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    """Greedy tokens up to and including the first end-of-turn token (generate itself drops it)."""
    kept: list[int] = []
    res = generate(llm, [embeds.to(llm.device)], SamplingParams(max_new_tokens=new_tokens), eos_token_ids=())
    for tok in res.tokens[0]:
        kept.append(tok)
        if tok in eos:
            break
    return kept


def reference_runs(reference, prompts: list[torch.Tensor], new_tokens: int = DEFAULT_NEW_TOKENS,
                   eos: tuple[int, ...] = ()) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt, the reference's greedy continuation and its teacher-forced logits along it: all
    that `score` needs, so the reference can be let go before a candidate is loaded."""
    runs = []
    for embeds in prompts:
        tokens = greedy(reference, embeds, new_tokens, eos)
        runs.append((tokens, forced_logits(reference, embeds, tokens)))
    return runs


def score(candidates: dict, prompts: list[torch.Tensor], references: list[tuple[list[int], torch.Tensor]],
          new_tokens: int = DEFAULT_NEW_TOKENS, eos: tuple[int, ...] = ()) -> dict[str, dict]:
    """Per candidate LLM: top-1 agreement and mean KL at every position of the reference's greedy
    continuation (teacher-forced), and the share of identical greedy answers, over `prompts` ([T, D]
    embeddings) and their `reference_runs`."""
    stats = {name: {"agree": 0, "identical": 0, "kl": 0.0, "per_prompt": []} for name in candidates}
    positions = 0
    for embeds, (ref_tokens, ref_logits) in zip(prompts, references, strict=True):
        ref = torch.log_softmax(ref_logits.double(), dim=-1)
        positions += len(ref_tokens)
        for name, llm in candidates.items():
            cand = torch.log_softmax(forced_logits(llm, embeds, ref_tokens).double(), dim=-1)
            hits = int((cand.argmax(-1) == torch.tensor(ref_tokens)).sum())
            kl = (ref.exp() * (ref - cand)).sum(-1)
            same = greedy(llm, embeds, new_tokens, eos) == ref_tokens
            s = stats[name]
            s["agree"], s["identical"], s["kl"] = s["agree"] + hits, s["identical"] + same, s["kl"] + float(kl.sum())
            s["per_prompt"].append({"positions": len(ref_tokens), "top1": hits, "mean_kl": round(float(kl.mean()), 6),
                                    "identical_answer": same})
    return {name: {"prompts": len(prompts), "positions": positions, "new_tokens": new_tokens,
                   "top1_agreement": round(s["agree"] / positions, 4), "mean_kl": round(s["kl"] / positions, 6),
                   "identical_answers": round(s["identical"] / len(prompts), 4), "per_prompt": s["per_prompt"]}
            for name, s in stats.items()}


def compare(reference, candidates: dict, prompts: list[torch.Tensor], new_tokens: int = DEFAULT_NEW_TOKENS,
            eos: tuple[int, ...] = ()) -> dict[str, dict]:
    """`score` of every candidate against the reference on `prompts` (the reference runs once)."""
    return score(candidates, prompts, reference_runs(reference, prompts, new_tokens, eos), new_tokens, eos)


def open_llm(engines_dir: Path, components: dict, layout: dict, intra_op_threads: int | None = None):
    """The LLM of a folder being built (no manifest yet), as runtime.generate drives it."""
    import numpy as np

    from runtime.backends.onnxruntime_backend import Graph, OrtLLM, choose_providers, session_options

    providers = choose_providers("cpu")
    graphs = {name: Graph(engines_dir / components[name]["file"], providers,
                          session_options(intra_op_threads, hot_loop=name == "llm_decode"))
              for name in ("llm_prefill", "llm_decode")}
    table = np.load(engines_dir / components["embed_tokens"]["file"], mmap_mode="r")
    return OrtLLM(graphs["llm_prefill"], graphs["llm_decode"], table, layout)


def build_check(load: Callable, tokenizer, engines_dir: Path, components: dict, layout: dict, precision: str,
                questions=BUILD_CHECK_QUESTIONS, new_tokens: int = DEFAULT_NEW_TOKENS) -> dict:
    """The quantized graphs in engines_dir against the fp32 torch model they were exported from
    (`load(parts)`, as export_onnx takes it): the torch model answers first and is let go before the
    quantized session opens, so the check's memory is the larger of the two, not their sum. An
    untied LLM's token-embedding table is not loaded again: the reference reads the rows it needs
    from the build's embed_tokens.npy, mapped."""
    import warnings

    import numpy as np

    from export.onnx_export import llm_parts, release_freed_memory
    from runtime.generate import TorchLLM

    parts = llm_parts(load)
    model = load(parts)
    if parts != ("llm",):
        table = np.load(engines_dir / components["embed_tokens"]["file"], mmap_mode="r")
        with warnings.catch_warnings():  # a read-only map: nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            weight = torch.nn.Parameter(torch.from_numpy(table), requires_grad=False)
        model.llm.get_input_embeddings().weight = weight
    family, vocab_size = model.family, model.vocab_size
    reference = TorchLLM(model.llm.float().eval())
    prompts = text_prompts(reference, tokenizer, family, vocab_size, questions)
    eos = eos_ids(tokenizer)
    references = reference_runs(reference, prompts, new_tokens, eos)
    del model, reference
    release_freed_memory()
    candidate = open_llm(engines_dir, components, layout)
    result = score({precision: candidate}, prompts, references, new_tokens, eos)[precision]
    del result["per_prompt"]
    goal = GOALS[precision]
    return {**result, "reference": "the fp32 torch model", "prompt_set": "text questions "
            "(export.quant_accuracy.BUILD_CHECK_QUESTIONS)", "goal_top1": goal,
            "passes": result["top1_agreement"] >= goal}

"""Generation: prefill + decode with a static KV cache, as a short loop.

The loop only needs an LLM object with `embed(ids)`, `new_cache(batch, max_len)` and
`forward(embeds, attention_mask, position_ids, cache, cache_position) -> last-position logits`.
With a cache, `attention_mask` is always [B, max_len] (the whole cache: 1 for slots holding a real
token, including the ones being written now, 0 for left padding and not-yet-written slots) and
`cache_position` gives the slots the new tokens go to; without one (use_cache=False) it is
[B, T] for the T tokens passed.
`TorchLLM` is the torch backend's, other backends bring their own. Requests of different prompt
lengths share one batch by left padding; each request samples with its own seeded generator, so
its tokens do not depend on what it was batched with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from runtime.errors import RequestError

MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEED = 2**32 - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> "SamplingParams":
        if not (1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS_LIMIT):
            raise RequestError(f"max_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if not (0.0 <= float(self.temperature) <= 10.0):
            raise RequestError(f"temperature must be in [0, 10], got {self.temperature}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        # torch's CPU generator (mt19937) keeps only the low 32 bits of its seed: seeds that differ
        # above them would sample the same tokens, so they are refused rather than folded.
        if self.seed is not None and not (0 <= int(self.seed) <= MAX_SEED):
            raise RequestError(f"seed must be in [0, {MAX_SEED}] (the sampler's generator takes a 32-bit seed), "
                               f"got {self.seed}")
        return self


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    first_logits: torch.Tensor  # [B, V] logits of the first generated position (fp32)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    finish_reasons: list[str] = field(default_factory=list)


class TorchLLM:
    """transformers' *ForCausalLM driven with a preallocated StaticCache.

    `cuda_graphs=True` is the GPU fast path: the one-token decode step is compiled with
    torch.compile(mode="reduce-overhead"), which captures it in CUDA graphs, and caches are reused
    per (batch, length bucket) so a captured graph always sees the same KV buffers. It switches
    itself off on CPU. The first decode at each shape pays the compile; `compile_seconds` says how much.
    """

    CACHE_BUCKET = 256

    def __init__(self, model, cuda_graphs: bool = False, reuse_caches: bool | None = None):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.reuse_caches = self.cuda_graphs if reuse_caches is None else reuse_caches
        self.compile_seconds = 0.0
        self._caches: dict[tuple[int, int], object] = {}
        self._compiled_shapes: set[tuple[int, int]] = set()
        self._decode = torch.compile(self._step, mode="reduce-overhead", dynamic=False) if self.cuda_graphs else None

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def new_cache(self, batch: int, max_len: int):
        from transformers import StaticCache

        if not self.reuse_caches:
            return StaticCache(config=self.model.config, max_cache_len=max_len)
        length = -(-max_len // self.CACHE_BUCKET) * self.CACHE_BUCKET
        cache = self._caches.get((batch, length))
        if cache is None:
            cache = self._caches[(batch, length)] = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        return cache

    def cache_length(self, cache) -> int:
        from runtime.compat import cache_max_length

        return cache_max_length(cache)

    def _step(self, embeds, attention_mask, position_ids, cache, cache_position):
        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, cache_position=cache_position, use_cache=cache is not None,
                         logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def forward(self, embeds, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
        if self._decode is None or cache is None or embeds.shape[1] != 1:
            return self._step(embeds, attention_mask, position_ids, cache, cache_position)
        shape = (embeds.shape[0], attention_mask.shape[1])
        t0 = time.perf_counter()
        logits = self._decode(embeds, attention_mask, position_ids, cache, cache_position).clone()
        if shape not in self._compiled_shapes:
            self._compiled_shapes.add(shape)
            torch.cuda.synchronize()
            self.compile_seconds += time.perf_counter() - t0
        return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one request's logits [V]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _left_pad(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(e.shape[0] for e in embeds)
    d = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), longest, d)
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, longest - e.shape[0]:] = e
        mask[i, longest - e.shape[0]:] = 1
    return out, mask


@torch.inference_mode()
def generate(llm, prompt_embeds: list[torch.Tensor], params: SamplingParams | list[SamplingParams],
             eos_token_ids: tuple[int, ...] = (), on_token: Callable[[int, int], None] | None = None,
             use_cache: bool = True, should_stop: Callable[[int], bool] | None = None) -> GenerationResult:
    """Generate for a batch of prompts given as embeddings [T_i, D].

    on_token(i, token) is called for every token kept for request i (stop tokens are not kept).
    should_stop(i) lets a caller cancel request i between steps. use_cache=False recomputes the
    whole sequence every step (the reference the KV cache is checked against).
    """
    batch = len(prompt_embeds)
    plist = params if isinstance(params, list) else [params] * batch
    for p in plist:
        p.validate()
    gens = []
    for p in plist:
        g = None
        if p.temperature > 0:
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        gens.append(g)
    stops = [set(eos_token_ids) | set(p.stop_token_ids) for p in plist]
    max_new = max(p.max_new_tokens for p in plist)

    embeds, mask = _left_pad(prompt_embeds)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    t_prompt = embeds.shape[1]
    cache = None
    if use_cache:
        cache = llm.new_cache(batch, t_prompt + max_new)
        # The mask spans the whole cache from the start, so every decode step has the same shapes
        # (what CUDA-graph capture needs); slots not yet written are masked out. A backend may
        # round the cache up (length buckets), so its own length is the one that counts.
        cache_len = llm.cache_length(cache) if hasattr(llm, "cache_length") else t_prompt + max_new
        mask = torch.cat([mask, mask.new_zeros(batch, cache_len - t_prompt)], dim=1)

    t0 = time.perf_counter()
    logits = llm.forward(embeds, mask, positions, cache, torch.arange(t_prompt, device=embeds.device))
    prefill_s = time.perf_counter() - t0
    first_logits = logits.detach().float().cpu()

    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    reasons = ["length"] * batch
    next_pos = positions[:, -1:] + 1
    steps = 0
    t1 = time.perf_counter()
    while True:
        chosen = []
        for i in range(batch):
            if done[i]:
                chosen.append(next(iter(stops[i]), 0))
                continue
            tok = sample_next(logits[i], plist[i], gens[i])
            chosen.append(tok)
            if tok in stops[i]:
                done[i], reasons[i] = True, "stop"
            else:
                tokens[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
                if len(tokens[i]) >= plist[i].max_new_tokens:
                    done[i] = True
                elif should_stop is not None and should_stop(i):
                    done[i], reasons[i] = True, "cancelled"
        if all(done):
            break
        step_ids = torch.tensor(chosen, dtype=torch.long).view(batch, 1)
        step_embeds = llm.embed(step_ids).to(embeds.dtype)
        if use_cache:
            mask[:, t_prompt + steps] = 1
            logits = llm.forward(step_embeds, mask, next_pos, cache,
                                 torch.tensor([t_prompt + steps], device=embeds.device))
        else:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            embeds = torch.cat([embeds, step_embeds], dim=1)
            positions = torch.cat([positions, next_pos], dim=1)
            logits = llm.forward(embeds, mask, positions, None, None)
        next_pos = next_pos + 1
        steps += 1
    decode_s = time.perf_counter() - t1
    return GenerationResult(tokens, first_logits, prefill_s, decode_s, steps, reasons)

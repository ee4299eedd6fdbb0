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

KV-cache slots (what the served in-flight scheduler, runtime/serving/scheduler.py, runs on): an LLM
that also has `new_slots(num_slots, slot_len)`, `slot_rows(rows, num_slots)` and
`forward_slots(slots, embeds, first_row, starts) -> logits` keeps S preallocated slots, per layer
K and V buffers [S, Hkv, L, hd] (`slots.keys`, `slots.values`). A call runs the contiguous rows
first_row .. first_row + B - 1 on embeds [B, s, D]: row b writes its s tokens at positions
starts[b] .. starts[b] + s - 1 of its own slot (its position ids too: a slot holds one sequence
from position 0, no padding) and attends to its own positions below starts[b] + its causal part,
so every row has its own length, position and mask in one call. The positions a row attends to
are set by its own start only, never by the other rows. `slot_rows(rows, num_slots)` is how many
rows a decode step over the first `rows` slots runs: the extra rows write only at their own
`starts`, which the caller points at positions nothing reads yet. Batch invariance (a request's
greedy tokens must not depend on what it runs with) needs a row's arithmetic to be the same
whatever the number of rows: onnxruntime's CPU kernels compute a row the same at every batch size
(bitwise, tests/test_inflight.py), torch's CPU matmuls do not (three kernel classes by row count,
about 1e-7 apart), so the torch backend always decodes all slots: one shape, which is also the one
CUDA graph it captures on a GPU, where a decode step of S rows costs about what one row does.
"""

from __future__ import annotations

import functools
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
        self._slot_decode = None  # compiled on the first slot decode step (CUDA graphs only)

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

    # ------------------------------------------------------------------ KV-cache slots (in-flight)

    def new_slots(self, num_slots: int, slot_len: int) -> TorchSlots:
        limit = int(getattr(self.model.config, "max_position_embeddings", slot_len))
        if slot_len > limit:
            raise ValueError(f"a slot of {slot_len} tokens is over the model's {limit}-token context")
        dtype = self.model.get_input_embeddings().weight.dtype
        return TorchSlots(self.model.config, num_slots, slot_len, self.device, dtype)

    def slot_rows(self, rows: int, num_slots: int) -> int:
        """Every slot, always: one shape for torch's kernels (batch invariance) and for the CUDA graph."""
        return num_slots

    def _slot_step(self, embeds, mask, positions, cache):
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def forward_slots(self, slots: TorchSlots, embeds, first_row: int, starts) -> torch.Tensor:
        """Last-position logits [B, V] of rows first_row.. (see the module docstring)."""
        embeds = torch.as_tensor(embeds).to(self.device, slots.keys[0].dtype)
        b, s = embeds.shape[0], embeds.shape[1]
        starts = torch.as_tensor(starts, dtype=torch.long).to(self.device)
        check_slot_call(slots.num_slots, slots.slot_len, b, s, first_row, starts)
        positions = slot_positions(starts, s)
        allowed = torch.arange(slots.slot_len, device=self.device).view(1, 1, -1) <= positions[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(embeds.dtype).min)  # additive: eager and sdpa both read it
        slots.first_row = first_row
        slots.row_index = torch.arange(b, device=self.device).view(-1, 1).expand(b, s)
        slots.write_index = positions
        if self.cuda_graphs and s == 1:
            if self._slot_decode is None:
                self._slot_decode = torch.compile(self._slot_step, mode="reduce-overhead", dynamic=False)
            return self._slot_decode(embeds, mask[:, None], positions, slots.cache).clone()
        return self._slot_step(embeds, mask[:, None], positions, slots.cache)


def slot_positions(starts: torch.Tensor, s: int) -> torch.Tensor:
    """Positions [B, s] of s new tokens per row, row b's from starts[b] on."""
    return starts.view(-1, 1) + torch.arange(s, device=starts.device)


def check_slot_call(num_slots: int, slot_len: int, b: int, s: int, first_row: int, starts: torch.Tensor) -> None:
    if not (0 <= first_row and first_row + b <= num_slots):
        raise ValueError(f"rows {first_row}..{first_row + b - 1} are outside the {num_slots} slots")
    if starts.shape != (b,):
        raise ValueError(f"starts must hold one position per row ({b}), got shape {tuple(starts.shape)}")
    if b and (int(starts.min()) < 0 or int(starts.max()) + s > slot_len):
        raise ValueError(f"writing {s} tokens from positions {starts.tolist()} runs past a slot's {slot_len} positions")


@functools.cache
def _slot_layer_class():
    """transformers' cache-layer interface for TorchSlots (built on first use: importing
    transformers.cache_utils costs seconds, which the client and CLI do not pay)."""
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One layer of TorchSlots: writes the new K/V rows at each row's own positions and returns the
        rows' whole slot buffers (the 4-D mask says which positions count)."""

        is_compileable = True
        is_sliding = False

        def __init__(self, owner: "TorchSlots", keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.owner, self.keys, self.values = owner, keys, values
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # preallocated by TorchSlots
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            o = self.owner
            rows = slice(o.first_row, o.first_row + key_states.shape[0])
            keys, values = self.keys[rows], self.values[rows]
            keys[o.row_index, :, o.write_index] = key_states.transpose(1, 2).to(keys.dtype)
            values[o.row_index, :, o.write_index] = value_states.transpose(1, 2).to(values.dtype)
            return keys, values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self) -> int:
            return 0

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    return SlotLayer


class TorchSlots:
    """KV-cache slots for TorchLLM: per layer K and V [S, Hkv, L, hd], preallocated once."""

    def __init__(self, config, num_slots: int, slot_len: int, device, dtype):
        from transformers.cache_utils import Cache

        text = config.get_text_config(decoder=True)
        heads = text.num_key_value_heads or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (num_slots, heads, slot_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(text.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(text.num_hidden_layers)]
        self.num_slots, self.slot_len = num_slots, slot_len
        # set by TorchLLM.forward_slots before each call: where the new rows go
        self.first_row = 0
        self.row_index = self.write_index = None
        layer = _slot_layer_class()
        self.cache = Cache(layers=[layer(self, k, v) for k, v in zip(self.keys, self.values)])


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

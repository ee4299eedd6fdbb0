"""The one backend interface, written as code: what every backend gives the pipeline.

`FacePipeline` (runtime/pipeline.py) drives any object that satisfies `Components`; its `llm`
satisfies `LLM` and runs inside facert's generation loop (runtime/generate.py). A backend whose
LLM runs its own generation loop (TensorRT-LLM) gives a `Generator` instead. An LLM with KV-cache
slots (`SlotLLM`) can also be served by the in-flight scheduler. Shapes: R tiles of
N images, S x S pixels, T image tokens per tile, D the LLM's width, D_vis the vision width,
P x P parser pixels, L x L labels, K seg tokens per image.

| backend | module | components |
|---|---|---|
| torch (reference; GPU fast path) | runtime/backends/torch_backend.py | TorchComponents |
| onnxruntime (CPU default) | runtime/backends/onnxruntime_backend.py | OrtComponents |
| tensorrt | runtime/backends/tensorrt_backend.py | TensorRTComponents |
| tensorrt-llm (LLM only) | runtime/backends/trtllm_backend.py | TrtLlmGenerator |
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LLM(Protocol):
    """The LLM of a backend, stepped by runtime.generate: prefill, then one token at a time."""

    @property
    def device(self) -> torch.device: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (ids < vocab_size) -> embeddings [B, T, D]."""

    def new_cache(self, batch: int, max_len: int):
        """A preallocated KV cache for `batch` sequences of up to `max_len` tokens."""

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache, cache_position: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, T, D] at positions (the cache holds what came before) -> logits [B, T, V]."""


@runtime_checkable
class SlotLLM(LLM, Protocol):
    """An LLM with KV-cache slots: what the served in-flight scheduler runs on
    (runtime/serving/scheduler.py; the slots' layout and the batch-invariance rule are in
    runtime/generate.py). The torch and onnxruntime LLMs have them; an LLM without them is served by
    the static scheduler."""

    def new_slots(self, num_slots: int, slot_len: int):
        """S slots of L positions, preallocated: per layer K and V [S, Hkv, L, hd] as `.keys` / `.values`."""

    def slot_rows(self, rows: int, num_slots: int) -> int:
        """How many rows (from slot 0) a decode step over the first `rows` slots runs."""

    def forward_slots(self, slots, embeds: torch.Tensor, first_row: int, starts: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, s, D] of slots first_row.., row b's written from position starts[b] -> last-position
        logits [B, V]."""


@runtime_checkable
class Components(Protocol):
    """Everything before the LLM, and the LLM: one object per model and backend."""

    backend: str  # "torch", "onnxruntime", "tensorrt"
    spec: dict  # the checkpoint's spec (family, shapes, image processor)
    family: str  # "faceinsight" or "facellm"
    vocab_size: int  # placeholder ids start here (runtime.prompt)
    num_image_tokens: int  # T: rows per tile
    num_seg_tokens: int  # K: seg rows per image, 0 where the model has no trained seg branch
    llm: LLM

    def encode_image(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles [R, 3, S, S] float32 -> image tokens [R, T, D] and pooled vision features [R, D_vis]."""

    def parse_face(self, parser_pixels) -> torch.Tensor:
        """Parser pixels [N, 3, P, P] float32 -> label maps [N, L, L] uint8 (FaceInsight with seg only)."""

    def seg_tokens(self, labels) -> torch.Tensor:
        """Label maps [N, L, L] uint8 -> seg tokens [N, K, D]."""

    def attributes(self, pooled) -> torch.Tensor:
        """Pooled features [N, D_vis] -> CelebA attribute probabilities [N, 40]."""


@runtime_checkable
class Generator(Protocol):
    """An LLM that runs its own generation loop over prompt ids with placeholders and a prompt table."""

    def generate(self, prompt_ids: list[list[int]], prompt_tables: torch.Tensor, params, eos_token_ids=(),
                 on_token=None):
        """Each request's tokens (runtime.generate.GenerationResult), streamed through on_token(i, token)."""


def missing_members(cls, protocol) -> list[str]:
    """The methods and properties of `protocol` that `cls` does not implement itself (a backend that
    subclasses the protocol inherits only its signatures), and the data members it does not declare:
    how a test checks a backend class against the interface without building it (TensorRT needs a GPU)."""
    own = [k for k in cls.__mro__ if k is not protocol and k not in protocol.__mro__]
    implemented = {n for k in own for n in vars(k)}
    wanted = {n for n, v in vars(protocol).items()
              if (callable(v) or isinstance(v, property)) and not n.startswith("_")}
    declared = {n for k in cls.__mro__ for n in getattr(k, "__annotations__", {})} | set(dir(cls))
    data = set(getattr(protocol, "__annotations__", {}))
    return sorted((wanted - implemented) | (data - declared))

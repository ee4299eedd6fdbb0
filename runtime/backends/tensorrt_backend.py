"""The `tensorrt` backend: TensorRT plans (export/tensorrt_build.py) run on torch CUDA tensors.

Every component is one plan with one execution context. A call sets each input's shape
(`set_input_shape`), points TensorRT at the torch tensors' memory (`set_tensor_address` with
`data_ptr()`), allocates the outputs as torch tensors of the shapes TensorRT infers, and enqueues
with `execute_async_v3` on the current torch CUDA stream — so the results are ordinary torch tensors,
ordered with the torch work around them, and nothing is copied through the host.

The LLM runs as the plans of the same prefill and decode graphs the onnxruntime backend uses
(not TensorRT-LLM: that is the separate `tensorrt-llm` path, runtime/backends/trtllm_backend.py,
which owns its own generation loop). This keeps runtime.generate's loop, sampling and prompt-table
splice shared with every other backend. The KV cache is one preallocated torch buffer per layer
[B, Hkv, max_len, hd]: prefill writes the prompt's rows; each decode step hands TensorRT the whole
buffer as `past_*` (rows not yet written are masked out by attention_mask) and copies only the new
token's `present_*` rows into it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from runtime.backends.base import Components

INSTALL_HINT = ("install TensorRT 10 on a Linux machine with an NVIDIA GPU "
                "(pip install 'tensorrt>=10.8,<11'), "
                "or run inside NVIDIA's TensorRT container (nvcr.io/nvidia/tensorrt)")


class TensorRTError(RuntimeError):
    """TensorRT is missing, a graph does not parse, or a plan does not build / load / fit."""


def require_tensorrt():
    """The tensorrt module, or a TensorRTError that says what to install."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its CUDA libraries are not
        raise TensorRTError(f"TensorRT is not available ({e}); {INSTALL_HINT}") from e


def device_target() -> str:
    """'sm_XY' of the current CUDA device: a plan runs only on the GPU architecture it was built for."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT plans are built on, and for, an NVIDIA GPU; no CUDA device is visible")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _torch_dtypes(trt) -> dict:
    pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in pairs.items() if hasattr(trt.DataType, k)}


# TensorRT requires every I/O tensor address to be 256-byte aligned (IExecutionContext.set_tensor_address).
ADDRESS_ALIGNMENT = 256


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, contiguous, at an address TensorRT accepts. A view that starts inside its storage (a slice,
    a row of a batch) is copied to the first 256-byte boundary of a slightly larger fresh buffer (the
    CUDA caching allocator aligns its blocks to 512 bytes, but that is its choice, not a promise)."""
    t = t.contiguous()
    if not t.numel() or t.data_ptr() % ADDRESS_ALIGNMENT == 0:
        return t
    nbytes = t.numel() * t.element_size()
    buf = torch.empty(nbytes + ADDRESS_ALIGNMENT, dtype=torch.uint8, device=t.device)
    start = (-buf.data_ptr()) % ADDRESS_ALIGNMENT
    out = buf[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


class TrtEngine:
    """One deserialized plan and its execution context, called with torch CUDA tensors."""

    def __init__(self, trt, runtime, plan_path: Path, device: torch.device, profiles: dict | None = None):
        self.name = Path(plan_path).name
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise TensorRTError(f"TensorRT could not load {plan_path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.profiles = profiles or {}
        dtypes = _torch_dtypes(trt)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self._empty = torch.empty(1, dtype=torch.uint8, device=device)  # an address for zero-size tensors

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        p = self.profiles.get(name)
        if p and not all(lo <= s <= hi for s, lo, hi in zip(shape, p["min"], p["max"])):
            raise TensorRTError(f"{self.name}: input {name} has shape {list(shape)}, outside the plan's "
                                f"profile {p['min']}..{p['max']} (rebuild with a larger --max-batch or context)")

    def __call__(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise TensorRTError(f"{self.name}: missing inputs {sorted(missing)}")
        keep = []  # the converted inputs must outlive the enqueue
        for name in self.inputs:
            t = aligned(torch.as_tensor(feeds[name]).to(self.device, self.dtypes[name]))
            self._check_shape(name, tuple(t.shape))
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise TensorRTError(f"{self.name}: TensorRT refused shape {list(t.shape)} for input {name}")
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TensorRTError(f"{self.name}: output {name} has an undetermined shape {shape}")
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
            out[name] = t
        stream = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device):  # TensorRT enqueues on the current CUDA device
            ok = self.context.execute_async_v3(stream.cuda_stream)
        if not ok:
            raise TensorRTError(f"{self.name}: TensorRT execution failed")
        return out


class KVCache:
    """Per-layer K and V buffers [B, Hkv, max_len, hd] on the GPU."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len


class TrtLLM:
    """runtime.generate's LLM interface over the llm_prefill / llm_decode plans."""

    def __init__(self, prefill: TrtEngine, decode: TrtEngine, embed_table: torch.Tensor):
        self.prefill, self.decode = prefill, decode
        self.table = embed_table
        self.vocab_size = embed_table.shape[0]
        self.num_layers = sum(1 for n in prefill.outputs if n.startswith("present_key_"))
        self.kv_dtype = prefill.dtypes["present_key_0"]
        self.embed_dtype = prefill.dtypes["inputs_embeds"]

    @property
    def device(self) -> torch.device:
        return self.table.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids.to(self.device)]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        past = self.decode.profiles.get("past_key_0")
        if past and max_len > past["max"][2]:
            raise TensorRTError(f"prompt + max_tokens = {max_len} tokens, over the plans' {past['max'][2]}-token "
                                "context (rebuild the engines for a longer one)")
        # the head layout comes from the decode plan's declared past_key input [B, Hkv, P, hd]
        _, kv_heads, _, head_dim = tuple(self.decode.engine.get_tensor_shape("past_key_0"))
        return KVCache(self.num_layers, batch, kv_heads, max_len, head_dim, self.kv_dtype, self.device)

    @torch.inference_mode()
    def forward(self, embeds, attention_mask, position_ids, cache: KVCache | None, cache_position) -> torch.Tensor:
        """attention_mask covers at least the tokens so far (runtime.generate passes one spanning the
        whole cache, unwritten slots 0); only its first start + S columns are read."""
        embeds = embeds.to(self.device, self.embed_dtype)
        attention_mask, position_ids = attention_mask.to(self.device), position_ids.to(self.device)
        b, s = embeds.shape[0], embeds.shape[1]
        start = 0 if cache_position is None else int(cache_position[0])
        if cache is None or start == 0:
            out = self.prefill(inputs_embeds=embeds, attention_mask=attention_mask[:, :s], position_ids=position_ids)
        else:
            # The decode graph reads the whole buffer as `past`, then the S new tokens: its mask is
            # [B, max_len + S], with the buffer rows not written yet (at and after `start`) masked.
            mask = torch.zeros(b, cache.max_len + s, dtype=attention_mask.dtype, device=self.device)
            mask[:, :start] = attention_mask[:, :start]
            mask[:, cache.max_len:] = attention_mask[:, start:start + s]
            past = {}
            for i in range(self.num_layers):
                past[f"past_key_{i}"], past[f"past_value_{i}"] = cache.keys[i], cache.values[i]
            out = self.decode(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **past)
        if cache is not None:
            for i in range(self.num_layers):
                cache.keys[i][:, :, start:start + s].copy_(out[f"present_key_{i}"])
                cache.values[i][:, :, start:start + s].copy_(out[f"present_value_{i}"])
        return out["logits"].float()


class TensorRTComponents(Components):
    """runtime.backends.base.Components over TensorRT plans.

    `manifest` is the engines folder's manifest.json: "spec" (the model spec) and "components",
    each plan entry with file, sha256, target and profiles (export/tensorrt_build.build_plans).
    """

    backend = "tensorrt"

    def __init__(self, engines_dir, manifest: dict, device: str = "cuda"):
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTError("the tensorrt backend needs an NVIDIA GPU; no CUDA device is visible")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TensorRTError(f"TensorRT plans run on a CUDA device, not {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        engines_dir = Path(engines_dir)
        comps = manifest["components"]
        with torch.cuda.device(self.device):
            target = device_target()
        for name, entry in comps.items():
            if entry.get("kind") == "plan" and entry.get("target") != target:
                raise TensorRTError(f"{entry['file']} was built for {entry.get('target')}, this GPU is {target}: "
                                    "rebuild the engines here")
        logger = trt.Logger(trt.Logger.WARNING)
        # The plans are deserialized, and their contexts made, on this backend's own device: TensorRT
        # allocates an engine's memory on the device current at deserialization.
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(logger)
            self.engines = {name: TrtEngine(trt, self._runtime, engines_dir / e["file"], self.device, e.get("profiles"))
                            for name, e in comps.items() if e.get("kind") == "plan"}
        self.spec = manifest["spec"]
        self.family = self.spec["family"]
        table = torch.from_numpy(np.load(engines_dir / comps["embed_tokens"]["file"])).to(self.device)
        self.llm = TrtLLM(self.engines["llm_prefill"], self.engines["llm_decode"], table)
        self.vocab_size = self.llm.vocab_size
        self.num_image_tokens = self._static_dim("vision", "image_tokens", 1)
        self.num_seg_tokens = self._static_dim("seg", "seg_tokens", 1) if "seg" in self.engines else 0

    def _static_dim(self, component: str, output: str, axis: int) -> int:
        return int(self.engines[component].engine.get_tensor_shape(output)[axis])

    def _t(self, x, dtype=None) -> torch.Tensor:
        return torch.as_tensor(x).to(self.device, dtype)

    @torch.inference_mode()
    def encode_image(self, pixel_values):
        out = self.engines["vision"](pixel_values=self._t(pixel_values))
        return out["image_tokens"], out["pooled"]

    @torch.inference_mode()
    def parse_face(self, parser_pixels):
        return self.engines["parser"](parser_pixels=self._t(parser_pixels))["labels"]

    @torch.inference_mode()
    def seg_tokens(self, labels):
        return self.engines["seg"](labels=self._t(labels))["seg_tokens"]

    @torch.inference_mode()
    def attributes(self, pooled):
        return self.engines["attributes"](pooled=self._t(pooled))["probs"]

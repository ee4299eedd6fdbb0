"""The onnxruntime backend: the ONNX graphs of an engines folder behind the components interface.

`OrtComponents` is runtime.backends.base.Components (encode_image, parse_face, seg_tokens,
attributes, llm), like the torch backend's TorchComponents, so `FacePipeline(components, tokenizer)` runs it unchanged;
`OrtLLM` is runtime.generate's LLM interface over the llm_prefill / llm_decode graphs
(export/onnx_export.py documents their inputs and outputs).

Providers: TensorRT -> CUDA -> CPU, the ones this onnxruntime has (onnxruntime-gpu brings the
first two); device "cpu" uses the CPU provider only. The TensorRT provider keeps its engines and
timing cache in `trt_cache_dir` (default: `ort_trt_cache/` in the engines folder), so only the
first session build pays for TensorRT's tactic search.

Threads: `intra_op_threads` (default: the env var FACERT_ORT_THREADS, else onnxruntime's default,
one per physical core); one inter-op thread, since the graphs run their nodes in sequence.
Spinning: in-process (`facert ask --engines`, the library), the LLM's one-token decode graph lets its
intra-op workers spin-wait between its ops while a step runs (`session.force_spinning_stop`: they stop
when the step returns, so an idle process burns no CPU); every other graph's workers sleep. A decode
step is ~500 small ops, and waking a sleeping worker for each costs more than the op: the demo's int4
step measured 6.95 ms spinning against 8.87 sleeping on a quiet 2-core machine. Spinning loses where
other processes want the cores: two decoders on those 2 cores took 20.5 ms a step spinning against
12.6 sleeping. The served repository is such a case (its image steps and the gateway run in other
processes beside the llm step), so its steps open the components with `spin_decode=False`
(runtime/serving/python_backend.py; measured there, benchmarks/results/2026-11-30-quant-spin/NOTES.md).
FACERT_ORT_SPIN=0 makes every graph's workers sleep, FACERT_ORT_SPIN=1 lets every graph's spin,
whatever the caller chose.

The KV cache: `new_cache` preallocates, per layer, K and V buffers [B, Hkv, max_len, hd] as torch
tensors (views of one [layers, 2, B, Hkv, max_len, hd] tensor; on the CUDA device when a GPU provider
runs the graphs) plus the decode step's inputs and outputs, bound once through one IOBinding per row
range (by address; the addresses never change). The decode graph takes the whole buffer as `past_*`
and never copies it. Where its attention is GroupQueryAttention (the in-place decode graph that
`facert build --backend onnxruntime` exports where the head size allows), `present_*` are bound to
the same buffers and the op writes the new K/V rows itself: a step is copy the new token's embedding,
position and filled length into the bound inputs, run. Otherwise (the plain graph) `present_*` are
just the new rows [B, Hkv, 1, hd], copied into the buffer after the run (one copy for every layer's).
onnxruntime's CUDA GroupQueryAttention takes fp16/bf16 only, so with GPU providers the LLM graphs of
a folder with the in-place decode graph run on the CPU provider (`providers_for_llm`, with a
warning), the vision graphs on the GPU; not run on a GPU here (none was lent).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from runtime.generate import check_slot_call, slot_positions
from runtime.manifest import IN_PLACE_DECODE_INPUTS, EngineError
from runtime.backends.base import Components

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = PROVIDER_ORDER[:2]
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
               torch.uint8: np.uint8}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise EngineError("the onnxruntime backend needs onnxruntime: pip install 'facert[onnx]' "
                          "(onnxruntime-gpu for the CUDA and TensorRT providers)") from e
    return onnxruntime


def choose_providers(device: str = "cpu", trt_cache_dir: str | Path | None = None,
                     precision: str = "fp32") -> list:
    """Execution providers in the order TensorRT -> CUDA -> CPU, as installed; device 'cpu' takes CPU only."""
    ort = _ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    device_id = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    available = set(ort.get_available_providers())
    chosen: list = []
    if "TensorrtExecutionProvider" in available:
        trt = {"device_id": device_id, "trt_fp16_enable": precision == "fp16"}
        if trt_cache_dir is not None:
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache_dir))
        chosen.append(("TensorrtExecutionProvider", trt))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    if not chosen and device != "auto":
        raise EngineError(f"device {device!r} asked for, but this onnxruntime has only "
                          f"{', '.join(sorted(available))}: install onnxruntime-gpu, or use --device cpu")
    return chosen + ["CPUExecutionProvider"]


def spinning(hot_loop: bool) -> bool:
    """Whether a session's intra-op workers spin between ops: FACERT_ORT_SPIN=0/1 for every session,
    else only the sessions run in a hot loop of small steps (the LLM's one-token decode graph)."""
    chosen = os.environ.get("FACERT_ORT_SPIN", "").strip()
    if chosen not in ("", "0", "1"):
        raise EngineError(f"FACERT_ORT_SPIN={chosen!r}: use 0 (workers sleep between ops) or 1 (they spin)")
    return hot_loop if chosen == "" else chosen == "1"


def session_options(intra_op_threads: int | None = None, hot_loop: bool = False):
    """SessionOptions for one graph; `hot_loop`: it runs as many small back-to-back steps (see spinning)."""
    ort = _ort()
    so = ort.SessionOptions()
    threads = intra_op_threads if intra_op_threads is not None else int(os.environ.get("FACERT_ORT_THREADS", "0"))
    so.intra_op_num_threads = threads  # 0: onnxruntime's default, one thread per physical core
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: the CPU provider warns about every node it does not fuse
    spin = spinning(hot_loop)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:  # only while a run is in flight: workers go to sleep when it returns
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


class Graph:
    """One InferenceSession, run with torch tensors bound by address (no copies in or out)."""

    def __init__(self, path: Path, providers: list, options):
        ort = _ort()
        self.name = path.stem
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineError(f"onnxruntime cannot load {path}: {e}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        on_gpu = self.providers[0] in GPU_PROVIDERS
        self.device = torch.device("cuda") if on_gpu else torch.device("cpu")
        self.device_type = "cuda" if on_gpu else "cpu"

    def bind(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]):
        binding = self.session.io_binding()
        for name, t in list(feeds.items()) + list(outputs.items()):
            if not t.is_contiguous():
                raise ValueError(f"{self.name}: {name} must be contiguous to be bound")
        for name, t in feeds.items():
            binding.bind_input(name, self.device_type, t.device.index or 0, NUMPY_TYPES[t.dtype],
                               list(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, self.device_type, t.device.index or 0, NUMPY_TYPES[t.dtype],
                                list(t.shape), t.data_ptr())
        return binding

    def run_bound(self, binding) -> None:
        self.session.run_with_iobinding(binding)

    def run(self, **feeds) -> list[np.ndarray]:
        """Plain run with numpy inputs (the small graphs: one call per request batch)."""
        return self.session.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})


class OrtKVCache:
    """Preallocated K/V buffers for every layer, plus the one-token decode step's bound inputs and outputs."""

    def __init__(self, layout: dict, batch: int, max_len: int, device: torch.device, vocab_size: int,
                 in_place: bool):
        layers, heads, hd = layout["num_layers"], layout["num_kv_heads"], layout["head_dim"]
        # [layer, K/V, B, Hkv, rows, hd]: every layer's buffers one tensor (so the plain decode graph's new
        # rows, new_kv, laid out alike, go in with one copy); keys[i] / values[i] are contiguous views of it
        self.kv = torch.zeros(layers, 2, batch, heads, max_len, hd, device=device)
        self.keys, self.values = list(self.kv[:, 0].unbind(0)), list(self.kv[:, 1].unbind(0))
        self.batch, self.max_len = batch, max_len
        self.step_embeds = torch.zeros(batch, 1, layout["hidden_size"], device=device)
        self.step_position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.logits = torch.empty(batch, vocab_size, device=device)
        if in_place:  # GroupQueryAttention: it writes the new rows into the bound buffers itself
            self.seqlens_k = torch.zeros(batch, dtype=torch.int32, device=device)
            self.capacity = torch.tensor(max_len, dtype=torch.int32, device=device)
            self.attention_bias = torch.zeros(batch, 1, 1, max_len, device=device)
            self.query_seqlens = torch.ones(batch, dtype=torch.int32, device=device)
        else:  # the plain graph's mask covers the buffer then the new token; it returns the new rows
            self.step_mask = torch.zeros(batch, max_len + 1, dtype=torch.long, device=device)
            self.new_kv = torch.empty(layers, 2, batch, heads, 1, hd, device=device)
        self.row_bindings: dict[tuple[int, int], object] = {}  # (first row, rows) -> decode-step binding

    # the KV-cache slot interface (runtime.generate): a cache of `batch` rows is `batch` slots
    @property
    def num_slots(self) -> int:
        return self.batch

    @property
    def slot_len(self) -> int:
        return self.max_len


class OrtLLM:
    """runtime.generate's LLM interface (vocab_size, device, embed, new_cache, forward) over ONNX graphs.

    Two decode graphs (export/onnx_export.py): onnxruntime's GroupQueryAttention per layer, reading and
    writing the cache buffers in place (`in_place`; what `facert build --backend onnxruntime` exports
    where the head size allows), or plain attention over the buffer returning the new K/V rows, which
    are copied in here (TensorRT's graphs; heads onnxruntime's kernel refuses).
    """

    def __init__(self, prefill: Graph, decode: Graph, embed_table: np.ndarray, layout: dict):
        self.prefill, self.decode = prefill, decode
        self.table = embed_table
        self.layout = layout
        self.vocab_size = int(embed_table.shape[0])
        self.num_layers = int(layout["num_layers"])
        self.in_place = all(name in decode.inputs for name in IN_PLACE_DECODE_INPUTS)

    @property
    def device(self) -> torch.device:
        return self.decode.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids).cpu().numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return torch.from_numpy(self.table[ids]).to(self.device)  # numpy gather from the mapped table

    def new_cache(self, batch: int, max_len: int) -> OrtKVCache:
        limit = int(self.layout.get("max_position_embeddings", max_len))
        if max_len > limit:
            raise ValueError(f"prompt + max_tokens = {max_len} tokens, over the model's {limit}-token context")
        return OrtKVCache(self.layout, batch, max_len, self.device, self.vocab_size, self.in_place)

    def _kv_outputs(self, b: int, s: int) -> dict[str, torch.Tensor]:
        shape = (b, self.layout["num_kv_heads"], s, self.layout["head_dim"])
        out = {}
        for i in range(self.num_layers):
            out[f"present_key_{i}"] = torch.empty(shape, device=self.device)
            out[f"present_value_{i}"] = torch.empty(shape, device=self.device)
        return out

    def _prefill(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prefill graph over whole prompts from position 0: its logits and every layer's K/V."""
        b, s = embeds.shape[0], embeds.shape[1]
        outputs = {"logits": torch.empty(b, self.vocab_size, device=self.device), **self._kv_outputs(b, s)}
        feeds = {"inputs_embeds": embeds, "attention_mask": mask[:, :s].contiguous(), "position_ids": positions}
        self.prefill.run_bound(self.prefill.bind(feeds, outputs))
        return outputs

    def _cache_feeds(self, cache: OrtKVCache, rows: slice, prefix: str) -> dict[str, torch.Tensor]:
        feeds = {}
        for i in range(self.num_layers):
            feeds[f"{prefix}_key_{i}"], feeds[f"{prefix}_value_{i}"] = cache.keys[i][rows], cache.values[i][rows]
        return feeds

    def _step_binding(self, cache: OrtKVCache, rows: slice):
        """The one-token decode step over some contiguous rows: views of the bound buffers, by address."""
        feeds = {"inputs_embeds": cache.step_embeds[rows], "position_ids": cache.step_position[rows],
                 **self._cache_feeds(cache, rows, "past")}
        outputs = {"logits": cache.logits[rows]}
        if self.in_place:
            feeds.update(seqlens_k=cache.seqlens_k[rows], total_sequence_length=cache.capacity,
                         attention_bias=cache.attention_bias[rows], query_seqlens=cache.query_seqlens[rows])
            outputs.update(self._cache_feeds(cache, rows, "present"))
        else:
            feeds["attention_mask"] = cache.step_mask[rows]
            for i in range(self.num_layers):
                outputs[f"present_key_{i}"] = cache.new_kv[i, 0, rows]
                outputs[f"present_value_{i}"] = cache.new_kv[i, 1, rows]
        return self.decode.bind(feeds, outputs)

    def _run(self, cache: OrtKVCache, rows: slice, embeds: torch.Tensor, positions: torch.Tensor,
             starts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits [b, V] of s new tokens per row of cache rows `rows`, row r's written at
        starts[r]...; mask [b, max_len]: the cache positions each row attends to (its new ones included)."""
        dev, max_len = self.device, cache.max_len
        b, s = embeds.shape[0], embeds.shape[1]
        if b and int(starts.max()) == 0:  # prompts from position 0: the prefill graph, its K/V copied in
            outputs = self._prefill(embeds, mask, positions)
            for i in range(self.num_layers):
                cache.keys[i][rows, :, :s].copy_(outputs[f"present_key_{i}"])
                cache.values[i][rows, :, :s].copy_(outputs[f"present_value_{i}"])
            return outputs["logits"]

        if self.in_place:  # the op attends causally to each row's positions up to its own; the bias masks padding
            bias = torch.where(mask.bool(), 0.0, torch.finfo(torch.float32).min)
            seqlens_k = (starts + s - 1).to(torch.int32)
        else:
            written = torch.arange(max_len, device=dev).view(1, -1) < starts.view(-1, 1)  # [b, max_len]
            new_mask = mask.gather(1, slot_positions(starts, s))  # [b, s]
            past_mask = (mask.bool() & written).long()
        if s == 1:  # the bound step
            binding = cache.row_bindings.get((rows.start, b))
            if binding is None:
                binding = cache.row_bindings[rows.start, b] = self._step_binding(cache, rows)
            cache.step_embeds[rows].copy_(embeds)
            cache.step_position[rows].copy_(positions)
            if self.in_place:
                cache.seqlens_k[rows].copy_(seqlens_k)
                cache.attention_bias[rows, 0, 0].copy_(bias)
            else:
                cache.step_mask[rows, :max_len].copy_(past_mask)
                cache.step_mask[rows, max_len:].copy_(new_mask)
            self.decode.run_bound(binding)
            logits, new_kv = _copied(cache.logits[rows]), (None if self.in_place else cache.new_kv[:, :, rows])
        else:  # several tokens a row onto a filled cache: bound for this call only
            feeds = {"inputs_embeds": embeds, "position_ids": positions.contiguous(),
                     **self._cache_feeds(cache, rows, "past")}
            outputs = {"logits": torch.empty(b, self.vocab_size, device=dev)}
            if self.in_place:
                feeds.update(seqlens_k=seqlens_k, total_sequence_length=cache.capacity,
                             attention_bias=bias.view(b, 1, 1, max_len).expand(b, 1, s, max_len).contiguous(),
                             query_seqlens=torch.full((b,), s, dtype=torch.int32, device=dev))
                outputs.update(self._cache_feeds(cache, rows, "present"))
            else:
                feeds["attention_mask"] = torch.cat([past_mask, new_mask], dim=1)
                outputs.update(self._kv_outputs(b, s))
            self.decode.run_bound(self.decode.bind(feeds, outputs))
            logits = outputs["logits"]
            new_kv = None if self.in_place else torch.stack([torch.stack(
                [outputs[f"present_key_{i}"], outputs[f"present_value_{i}"]]) for i in range(self.num_layers)])
        if new_kv is not None:  # the plain graph's new rows [layers, 2, b, Hkv, s, hd] into each row's place
            first = int(starts[0])
            if bool((starts == first).all()):
                cache.kv[:, :, rows, :, first:first + s].copy_(new_kv)
            else:
                for r in range(b):
                    at = int(starts[r])
                    cache.kv[:, :, rows.start + r, :, at:at + s].copy_(new_kv[:, :, r])
        return logits

    @torch.inference_mode()
    def forward(self, embeds, attention_mask, position_ids, cache: OrtKVCache | None, cache_position) -> torch.Tensor:
        """Last-position logits [B, V] float32.

        With a cache, attention_mask spans the whole cache ([B, max_len], runtime.generate) and the
        new tokens go to the slots cache_position[0] ...; without one it covers the tokens passed.
        """
        dev = self.device
        embeds = torch.as_tensor(embeds).to(dev, torch.float32).contiguous()
        attention_mask = torch.as_tensor(attention_mask).to(dev, torch.long)
        position_ids = torch.as_tensor(position_ids).to(dev, torch.long).contiguous()
        b, s = embeds.shape[0], embeds.shape[1]
        if cache is None:  # a full recompute: the prefill graph alone
            return self._prefill(embeds, attention_mask, position_ids)["logits"]
        start = 0 if cache_position is None else int(cache_position[0])
        if b != cache.batch:
            raise ValueError(f"batch {b} does not match the cache's {cache.batch}")
        if start + s > cache.max_len:
            raise ValueError(f"writing tokens {start}..{start + s} past the cache's {cache.max_len} slots")
        mask = torch.zeros(b, cache.max_len, dtype=torch.long, device=dev)
        mask[:, :attention_mask.shape[1]] = attention_mask[:, :cache.max_len]
        return self._run(cache, slice(0, b), embeds, position_ids, torch.full((b,), start, device=dev), mask)

    # ------------------------------------------------------------------ KV-cache slots (in-flight)

    def new_slots(self, num_slots: int, slot_len: int) -> OrtKVCache:
        return self.new_cache(num_slots, slot_len)

    def slot_rows(self, rows: int, num_slots: int) -> int:
        """The rows asked for on CPU (its kernels compute a row the same at every batch size, checked
        in tests/test_inflight.py); every slot on a GPU provider, whose kernels are not known to."""
        return rows if self.device.type == "cpu" else num_slots

    @torch.inference_mode()
    def forward_slots(self, cache: OrtKVCache, embeds, first_row: int, starts) -> torch.Tensor:
        """Last-position logits [B, V] of the rows first_row.. (runtime.generate's slot interface): s new
        tokens a row, row b's at positions starts[b]..., attending to its slot's positions before them."""
        dev = self.device
        embeds = torch.as_tensor(embeds).to(dev, torch.float32).contiguous()
        b, s = embeds.shape[0], embeds.shape[1]
        starts = torch.as_tensor(starts, dtype=torch.long).to(dev)
        check_slot_call(cache.batch, cache.max_len, b, s, first_row, starts)
        mask = (torch.arange(cache.max_len, device=dev).view(1, -1) < (starts + s).view(-1, 1)).long()
        return self._run(cache, slice(first_row, first_row + b), embeds, slot_positions(starts, s), starts, mask)


def _copied(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor made by numpy, one thread: torch's copy of the logits (over its parallel
    grain) wakes torch's OpenMP workers, whose spin-wait after it fights the decode graph's spinning
    workers for the cores (demo int4 step, 2 cores: 10.5-11.6 ms against 6.7)."""
    if t.device.type != "cpu":
        return t.clone()
    return torch.from_numpy(t.numpy().copy())


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def providers_for_llm(decode_entry: dict, providers: list) -> list:
    """The LLM graphs' providers: `providers`, but the CPU's alone for an in-place decode graph (its
    attention is onnxruntime's GroupQueryAttention in fp32, which the CUDA provider does not run, so
    onnxruntime would put that node on the CPU behind copies that break the cache's sharing of past
    and present); the vision graphs keep the GPU."""
    names = {t["name"] for t in decode_entry.get("inputs", [])}
    if providers[:1] == ["CPUExecutionProvider"] or not all(n in names for n in IN_PLACE_DECODE_INPUTS):
        return providers
    warnings.warn("this engines folder's decode graph attends with onnxruntime's fp32 CPU GroupQueryAttention: "
                  "its LLM runs on the CPU, the vision graphs on the GPU (for the LLM on a GPU, build "
                  "--backend tensorrt or tensorrt-llm)", stacklevel=3)
    return ["CPUExecutionProvider"]


class OrtComponents(Components):
    """runtime.backends.base.Components over an engines folder's ONNX graphs."""

    backend = "onnxruntime"

    def __init__(self, engines_dir: str | Path, manifest: dict, device: str = "cpu",
                 intra_op_threads: int | None = None, trt_cache_dir: str | Path | None = None,
                 spin_decode: bool = True):
        root = Path(engines_dir)
        comps = manifest["components"]
        providers = choose_providers(device, trt_cache_dir or root / "ort_trt_cache", manifest.get("precision", "fp32"))
        llm_providers = providers_for_llm(comps["llm_decode"], providers)
        self.graphs = {name: Graph(root / e["file"], llm_providers if name.startswith("llm_") else providers,
                                   session_options(intra_op_threads, hot_loop=spin_decode and name == "llm_decode"))
                       for name, e in comps.items() if e.get("kind") == "onnx"}
        self.spec = manifest["spec"]
        self.family = self.spec["family"]
        model = manifest["model"]
        self.vocab_size = int(model["vocab_size"])
        self.num_image_tokens = int(model["num_image_tokens"])
        self.num_seg_tokens = int(model["num_seg_tokens"])
        self.num_classes = model.get("num_classes")
        table = np.load(root / comps["embed_tokens"]["file"], mmap_mode="r")
        self.llm = OrtLLM(self.graphs["llm_prefill"], self.graphs["llm_decode"], table, model["llm"])
        self.device = self.llm.device
        self.providers = self.graphs["llm_decode"].providers

    @property
    def decode_spins(self) -> bool:
        """Whether the decode graph's workers spin between ops: what its session got, FACERT_ORT_SPIN included."""
        options = self.graphs["llm_decode"].session.get_session_options()
        return options.get_session_config_entry("session.intra_op.allow_spinning") == "1"

    def _require(self, name: str) -> Graph:
        if name not in self.graphs:
            raise EngineError(f"this engines folder ({self.family}) has no {name} graph")
        return self.graphs[name]

    def encode_image(self, pixel_values):
        tokens, pooled = self._require("vision").run(pixel_values=_as_numpy(pixel_values, np.float32))
        return torch.from_numpy(tokens), torch.from_numpy(pooled)

    def parse_face(self, parser_pixels):
        (labels,) = self._require("parser").run(parser_pixels=_as_numpy(parser_pixels, np.float32))
        return torch.from_numpy(labels)

    def seg_tokens(self, labels):
        from kernels.seg_projection import check_labels

        labels = torch.as_tensor(labels).cpu()
        check_labels(labels, int(self.num_classes))  # the graph itself would one-hot any value silently
        (tokens,) = self._require("seg").run(labels=labels.to(torch.uint8).numpy())
        return torch.from_numpy(tokens)

    def attributes(self, pooled):
        (probs,) = self._require("attributes").run(pooled=_as_numpy(pooled, np.float32))
        return torch.from_numpy(probs)


def open_components(engines_dir: str | Path, manifest: dict, device: str = "cpu", **options) -> OrtComponents:
    return OrtComponents(engines_dir, manifest, device, **options)

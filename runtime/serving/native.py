"""The native target: engine files served by Triton's own backends (NVIDIA's Triton containers, GPU).

From an engines folder (`facert build`):
- the vision encoder, face parser, seg projection and attribute head stay python models (on the
  GPU) that run the folder's own TensorRT plans or ONNX graphs in-process through facert's backend:
  a request carries all its images' tiles as one [1, R, 3, S, S] tensor, which Triton's
  tensorrt_plan / onnxruntime_onnx models (batch axis = images) cannot take from an ensemble, so
  the python step flattens every request's rows into one engine batch (the plans' profiles are
  sized for max_batch x max_images x max_tiles by `facert build`);
- if the folder holds a TensorRT-LLM engine (`--backend tensorrt-llm`), a `tensorrt_llm` model on
  the `tensorrtllm` backend serves it with in-flight batching, and the `llm` step becomes a python
  model that streams from it through BLS (parameter llm_backend=tensorrtllm); otherwise the `llm`
  step runs the folder's own LLM graphs as in the portable target.
Preprocessing and postprocessing stay python models, so the ensemble's inputs and outputs are the
same as portable's. None of this runs on the CPU-only tritonserver here (it has only the python
backend); the configs are checked against the ModelConfig schema like every other.

An engine split over several GPUs (`facert build --tp N --pp M`, world size N x M) runs in the
tensorrtllm backend's orchestrator mode: one tritonserver process, whose tensorrt_llm model spawns
one trtllmExecutorWorker per rank through MPI_Comm_spawn (TRTLLM_ORCHESTRATOR=1, set by `facert
serve`; `gpu_device_ids` in its config names the GPUs). Unlike leader mode (one tritonserver per
rank under mpirun, as the backend's launch_triton_server.py does by default), it keeps a single
server process, which `facert serve` supervises and restarts like any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPT_TABLE_TYPES = {"fp16": "TYPE_FP16", "bf16": "TYPE_BF16", "fp32": "TYPE_FP32"}
# the tensorrtllm backend's orchestrator mode, spawning its worker processes itself (model_instance_state.cc)
ORCHESTRATOR_ENV = {"TRTLLM_ORCHESTRATOR": "1", "TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES": "1"}
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"  # NVIDIA's container
# Share of free GPU memory the tensorrt_llm model's KV cache may take at most. The cache is also capped
# at the tokens the engine can ever hold (max_batch x (max_input_len + max_output_len), the smaller of
# the two wins in TensorRT-LLM's KvCacheConfig), so the vision plans on the same GPU keep their memory
# whichever model Triton loads first.
KV_CACHE_FREE_GPU_MEM_FRACTION = 0.5


def prompt_table_type(llm_entry: dict) -> str:
    """The Triton type of the engine's prompt_embedding_table: the engine's activation dtype (a quantized
    engine's is its `dtype`, fp16 or bf16, recorded by `facert build`)."""
    dtype = llm_entry.get("dtype") or llm_entry.get("precision", "fp16")
    return PROMPT_TABLE_TYPES.get(dtype, "TYPE_FP16")


def kv_cache_tokens(llm_entry: dict) -> int:
    """KV-cache tokens a full batch of the longest requests needs."""
    return int(llm_entry["max_batch"]) * (int(llm_entry["max_input_len"]) + int(llm_entry["max_output_len"]))


def stop_words_list(stop_ids) -> np.ndarray:
    """stop_words_list in the tensorrtllm backend's format [1, 2, N]: row 0 the words' token ids
    back to back, row 1 each word's end offset (padded with -1); every facert stop is one token."""
    ids = [int(t) for t in stop_ids]
    if not ids:
        return np.zeros((1, 2, 0), np.int32)
    return np.array([[ids, list(range(1, len(ids) + 1))]], np.int32)


def tensorrt_llm_inputs(input_ids: np.ndarray, params, eos_ids, table_rows: int) -> dict[str, np.ndarray]:
    """The tensorrt_llm model's inputs for one request (all but prompt_embedding_table, sent as a
    torch tensor through DLPack), each with its batch axis of 1.

    - Greedy (temperature 0) is runtime_top_k 1: argmax, as NVIDIA's own preprocessing sends it;
      temperature 0 with no top-k would sample.
    - end_id is the first end-of-sequence token; every other one, and the request's stop tokens,
      go as stop_words_list, so the engine stops at any of them.
    - The seed goes as both `random_seed` (tensorrtllm backend up to v0.19) and `seed` (v0.20 on);
      each backend reads its own name and ignores the other, so one repository serves both.
    """
    ids = np.asarray(input_ids, np.int32).reshape(1, -1)
    out = {"input_ids": ids, "input_lengths": np.array([[ids.shape[1]]], np.int32),
           "request_output_len": np.array([[params.max_new_tokens]], np.int32),
           "streaming": np.array([[True]]),
           "prompt_vocab_size": np.array([[table_rows]], np.int32)}
    if params.temperature == 0:
        out["runtime_top_k"] = np.array([[1]], np.int32)
    else:
        out["runtime_top_k"] = np.array([[0]], np.int32)
        out["runtime_top_p"] = np.array([[params.top_p]], np.float32)
        out["temperature"] = np.array([[params.temperature]], np.float32)
        if params.seed is not None:
            out["random_seed"] = np.array([[params.seed]], np.uint64)
            out["seed"] = np.array([[params.seed]], np.uint64)
    eos = [int(t) for t in eos_ids]
    if eos:
        out["end_id"] = np.array([[eos[0]]], np.int32)
        out["pad_id"] = np.array([[eos[0]]], np.int32)
    extra = sorted(set(eos[1:]) | {int(t) for t in params.stop_token_ids} - set(eos[:1]))
    if extra:
        out["stop_words_list"] = stop_words_list(extra)
    return out


def render_native(out: Path, env, ctx: dict, engines: Path, manifest: dict) -> None:
    """Write the tensorrt_llm model where the folder has a TensorRT-LLM engine; updates ctx's
    `llm_parameters` so that the llm step streams from it."""
    components = manifest["components"]
    llm = components.get("llm")
    if llm is not None and llm.get("kind") == "tensorrt-llm-engine":
        engine_dir = (engines / llm["file"]).parent
        table_type = prompt_table_type(llm)
        max_batch = min(ctx["max_batch_size"], int(llm.get("max_batch") or ctx["max_batch_size"]))
        world = int(llm.get("mapping", {}).get("world_size", 1))
        (out / "tensorrt_llm" / "1").mkdir(parents=True)  # the engine stays in the engines folder
        (out / "tensorrt_llm" / "config.pbtxt").write_text(env.get_template("native/tensorrt_llm.pbtxt.j2").render(
            ctx, llm_engines_dir=str(engine_dir), prompt_table_type=table_type, max_batch_size=max_batch,
            kv_cache_tokens=kv_cache_tokens(dict(llm, max_batch=max_batch)) if "max_input_len" in llm else None,
            kv_cache_fraction=KV_CACHE_FREE_GPU_MEM_FRACTION,
            gpu_device_ids=",".join(str(g) for g in range(world)) if world > 1 else "",
            executor_worker_path=EXECUTOR_WORKER))
        ctx["llm_parameters"] = {**ctx["llm_parameters"], "llm_backend": "tensorrtllm",
                                 "tensorrt_llm_model": "tensorrt_llm", "prompt_table_type": table_type}

"""The LLM through TensorRT-LLM: an engine built by export.trtllm_convert, run with ModelRunnerCpp.

TensorRT-LLM runs its own prefill + decode loop, so this backend does not plug into
runtime.generate's step-by-step LLM interface; it takes what that loop's callers already have —
prompt token ids (placeholders >= vocab_size for image/seg tokens, runtime.prompt.build_prompt_ids)
and each request's prompt table [P, D] — and returns the same GenerationResult.

The prompt table goes in as TensorRT-LLM's p-tuning input: `prompt_table` [B, P, D] with
`prompt_tasks` "0,1,...,B-1", so request b's id vocab_size + i reads row i of its own table, the
convention runtime.prompt documents for every backend. The engine must have been built with
max_prompt_embedding_table_size >= B * P (export.trtllm_convert.prompt_table_size).

Timings: TensorRT-LLM reports no prefill/decode split through this API; the whole call is counted
as decode_s and prefill_s is 0.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import torch

from runtime.generate import GenerationResult, SamplingParams

INSTALL_HINT = ("install TensorRT-LLM on a Linux machine with an NVIDIA GPU "
                "(pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com, matching your CUDA), "
                "or run inside NVIDIA's TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release)")


class TrtLlmError(RuntimeError):
    """TensorRT-LLM is missing, or a checkpoint / engine build is not what it should be."""


def require_tensorrt_llm():
    """The tensorrt_llm module, or a TrtLlmError that says what to install."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as e:  # also a broken install (missing CUDA libraries raise ImportError/OSError)
        raise TrtLlmError(f"TensorRT-LLM is not installed ({e}); {INSTALL_HINT}") from e
    except OSError as e:
        raise TrtLlmError(f"TensorRT-LLM failed to load ({e}); {INSTALL_HINT}") from e


# Share of free GPU memory the KV cache may take at most; the cache is also capped at what the engine's
# own limits need (kv_cache_tokens), so the vision engines beside it on the same GPU keep theirs.
KV_CACHE_FREE_GPU_MEM_FRACTION = 0.5


def kv_cache_tokens(build_config: dict) -> int:
    """KV-cache tokens a full batch of the longest requests needs: max_batch_size x max_seq_len
    (trtllm-build's build_config in the engine's config.json)."""
    return int(build_config["max_batch_size"]) * int(build_config["max_seq_len"])


def runner_options(from_dir, device_index: int, build_config: dict) -> dict:
    """Keyword arguments for ModelRunnerCpp.from_dir, those the installed TensorRT-LLM accepts.

    gather_generation_logits: the executor refuses to return generation logits without it
    ("To return generation logits, gather_generation_logits must be enabled in ExecutorConfig").
    device_ids: the engine runs on this backend's CUDA device, not on device 0.
    The KV cache is bounded by tokens and by a share of free memory (the smaller one wins).
    """
    import inspect

    wanted = {"gather_generation_logits": True, "device_ids": [device_index],
              "max_tokens_in_paged_kv_cache": kv_cache_tokens(build_config),
              "kv_cache_free_gpu_memory_fraction": KV_CACHE_FREE_GPU_MEM_FRACTION}
    params = inspect.signature(from_dir).parameters
    return {k: v for k, v in wanted.items() if k in params}


def sampling_options(p: SamplingParams) -> dict:
    """ModelRunnerCpp.generate's sampling keywords: greedy is top-k 1 (argmax), not temperature 0."""
    if p.temperature == 0:
        return {"top_k": 1, "top_p": 0.0, "temperature": 1.0}
    kw = {"top_k": 0, "top_p": p.top_p, "temperature": p.temperature}
    if p.seed is not None:
        kw["random_seed"] = p.seed  # ModelRunnerCpp renames it to the executor's `seed`
    return kw


class TrtLlmGenerator:
    def __init__(self, engine_dir, device: str | torch.device = "cuda"):
        require_tensorrt_llm()
        from tensorrt_llm.runtime import ModelRunnerCpp

        self.engine_dir = Path(engine_dir)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TrtLlmError(f"TensorRT-LLM engines run on a CUDA device, not {device!r}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        # trtllm-build writes {"version", "pretrained_config", "build_config"} next to rank0.engine
        config = json.loads((self.engine_dir / "config.json").read_text())
        pretrained = config["pretrained_config"]
        self.vocab_size = int(pretrained["vocab_size"])
        self.table_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                            "float32": torch.float32}[pretrained["dtype"]]
        with torch.cuda.device(self.device):
            self.runner = ModelRunnerCpp.from_dir(engine_dir=str(self.engine_dir), rank=0,
                                                  **runner_options(ModelRunnerCpp.from_dir, index,
                                                                   config["build_config"]))

    def _sampling(self, p: SamplingParams) -> dict:
        return sampling_options(p)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], prompt_tables: torch.Tensor,
                 params: SamplingParams | list[SamplingParams], eos_token_ids: tuple[int, ...] = (),
                 on_token=None) -> GenerationResult:
        """prompt_ids: one id list per request; prompt_tables [B, P, D] (P may be 0)."""
        batch = len(prompt_ids)
        plist = params if isinstance(params, list) else [params] * batch
        for p in plist:
            p.validate()
        if len({(p.temperature, p.top_p, p.seed) for p in plist}) > 1:
            # one sampling config per runner call: requests that differ run separately
            parts = [self.generate([prompt_ids[i]], prompt_tables[i:i + 1], plist[i], eos_token_ids,
                                   None if on_token is None else (lambda _j, t, i=i: on_token(i, t)))
                     for i in range(batch)]
            return GenerationResult([r.tokens[0] for r in parts], torch.cat([r.first_logits for r in parts]),
                                    0.0, sum(r.decode_s for r in parts), max(r.decode_steps for r in parts),
                                    [r.finish_reasons[0] for r in parts])
        stops = [set(eos_token_ids) | set(p.stop_token_ids) for p in plist]
        end_id = eos_token_ids[0] if eos_token_ids else -1
        max_new = max(p.max_new_tokens for p in plist)
        kw = {}
        if prompt_tables is not None and prompt_tables.shape[1] > 0:
            kw = {"prompt_table": prompt_tables.to(self.device, self.table_dtype).contiguous(),
                  "prompt_tasks": ",".join(str(i) for i in range(batch))}
        extra_stops = [[[t] for t in sorted(s - {end_id})] for s in stops]
        t0 = time.perf_counter()
        out = self.runner.generate(
            [torch.tensor(ids, dtype=torch.int32) for ids in prompt_ids], max_new_tokens=max_new,
            end_id=end_id, pad_id=end_id if end_id >= 0 else 0,
            stop_words_list=extra_stops if any(extra_stops) else None,
            return_dict=True, output_sequence_lengths=True, output_generation_logits=True,
            streaming=False, **self._sampling(plist[0]), **kw)
        torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        tokens, reasons = [], []
        for i, ids in enumerate(prompt_ids):
            seq = out["output_ids"][i, 0, len(ids):int(out["sequence_lengths"][i, 0])].tolist()
            kept = []
            for tok in seq[:plist[i].max_new_tokens]:
                if tok in stops[i]:
                    break
                kept.append(tok)
            tokens.append(kept)
            reasons.append("length" if len(kept) >= plist[i].max_new_tokens else "stop")
            if on_token is not None:
                for tok in kept:
                    on_token(i, tok)
        first_logits = out["generation_logits"][:, 0, 0, :self.vocab_size].float().cpu()
        return GenerationResult(tokens, first_logits, 0.0, elapsed, max(map(len, tokens), default=0), reasons)


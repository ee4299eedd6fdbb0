"""GPU suite: facert's torch fast path next to transformers eager and next to the hardware floor.

One run, one device call (at most 10 minutes on an H100 for the three architectures):

    python benchmarks/bench_gpu.py                       # faceinsight-7b, facellm-1b, facellm-8b
    python benchmarks/bench_gpu.py --models facellm-1b --new-tokens 32
    python benchmarks/bench_gpu.py --device cpu --models tiny,tiny-facellm --quick   # smoke test

For each architecture, at full size with seeded random bf16 weights built on the device:
  vision encoder images/s at batch 1/8/64, time to first token (vision + seg + prefill) for a face
  image + 64-token question, decode tokens/s at batch 1/8/32 — facert (static KV cache, decode in
  compiled CUDA graphs) and transformers (`generate`, eager, its default cache) on the same weights,
  with greedy-token agreement between the two; and the floors measured on the same machine:
  weight bytes / copy bandwidth for decode, FLOPs / bf16 matmul rate for vision and prefill.
Results: JSON + markdown under benchmarks/results/<date>-<device>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeat` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_floors(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense bf16 matmul rate."""
    n = (1 << 24) if quick else (1 << 30)  # elements of bf16: 32 MiB or 2 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeat=5)
    bandwidth = 2 * src.numel() * src.element_size() / t
    m = 512 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    t = timed(lambda: a @ b, device, repeat=5)
    del src, dst, a, b
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "matmul_TFLOPs": 2 * m ** 3 / t / 1e12,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def build(spec_name: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    from runtime.models.mllm import build_model
    from runtime.specs import get_spec

    spec = get_spec(spec_name, layers)
    if not isinstance(spec["llm"], dict):
        raise SystemExit(f"{spec_name} needs a real LLM checkpoint; the GPU suite builds random weights only")
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(spec, dtype)
    return model.eval()


def vision_flops(model, batch: int) -> float:
    """Matmul FLOPs of the vision tower + projector for `batch` images (attention included)."""
    vision_params = sum(p.numel() for n, p in model.vision_tower.named_parameters() if p.dim() == 2)
    proj_params = sum(p.numel() for p in model.projector.parameters() if p.dim() == 2)
    cfg = model.vision_tower.config
    tokens = model.grid * model.grid + 1
    attn = 4 * cfg.num_hidden_layers * tokens * tokens * cfg.hidden_size
    proj_tokens = model.num_image_tokens
    return batch * (2 * vision_params * tokens + attn + 2 * proj_params * proj_tokens)


def llm_flops(model, tokens: int) -> float:
    params = sum(p.numel() for n, p in model.llm.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    cfg = model.llm.config
    return 2 * params * tokens + 4 * cfg.num_hidden_layers * tokens * tokens * cfg.hidden_size


def bench_model(name: str, args, device: torch.device, floors: dict) -> dict:
    from runtime.generate import SamplingParams, TorchLLM, generate

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build(name, args.layers, device, dtype)
    out: dict = {"model": name, "build_s": time.perf_counter() - t0, "dtype": str(dtype).replace("torch.", ""),
                 "llm_params": sum(p.numel() for p in model.llm.parameters()),
                 "vision_params": sum(p.numel() for p in model.vision_tower.parameters())}
    size = model.spec["image_size"]
    rate = floors["matmul_TFLOPs"] * 1e12
    bw = floors["copy_bandwidth_GBps"] * 1e9

    # --- vision encoder: images/s
    out["vision"] = []
    for b in args.vision_batches:
        x = torch.randn(b, 3, size, size, device=device, dtype=dtype)
        with torch.inference_mode():
            t = timed(lambda: model.encode_image(x), device, repeat=args.repeat)
        floor = vision_flops(model, b) / rate
        out["vision"].append({"batch": b, "ms": t * 1e3, "images_per_s": b / t, "floor_ms": floor * 1e3,
                              "fraction_of_floor": floor / t})

    # --- time to first token: vision (+ parser + seg) + prefill of image tokens + a 64-token question
    question_tokens = 64
    ids = torch.randint(0, min(model.vocab_size, 30000), (1, question_tokens), device=device)
    llm = TorchLLM(model.llm, cuda_graphs=not args.no_cuda_graphs)

    def first_token(hf: bool):
        with torch.inference_mode():
            x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
            table, _ = model.encode_image(x)
            if getattr(model, "seg", None) is not None:
                p = model.spec["parser"]["input_size"]
                labels = model.parse_face(torch.randn(1, 3, p, p, device=device, dtype=dtype))
                table = torch.cat([table, model.seg(labels)], dim=1)
            embeds = torch.cat([table, model.llm.get_input_embeddings()(ids)], dim=1)
            if hf:
                return model.llm(inputs_embeds=embeds).logits[:, -1]
            mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=device)
            cache = llm.new_cache(1, embeds.shape[1] + 1)
            full = torch.cat([mask, mask.new_zeros(1, llm.cache_length(cache) - embeds.shape[1])], dim=1)
            pos = torch.arange(embeds.shape[1], device=device)[None]
            return llm.forward(embeds, full, pos, cache, pos[0])

    prompt_len = model.num_image_tokens + model.num_seg_tokens + question_tokens
    t_ours = timed(lambda: first_token(False), device, repeat=args.repeat)
    t_hf = timed(lambda: first_token(True), device, repeat=args.repeat)
    floor = (vision_flops(model, 1) + llm_flops(model, prompt_len)) / rate
    out["ttft"] = {"prompt_tokens": prompt_len, "facert_ms": t_ours * 1e3, "transformers_ms": t_hf * 1e3,
                   "speedup": t_hf / t_ours, "floor_ms": floor * 1e3, "fraction_of_floor": floor / t_ours}

    # --- decode tokens/s, facert vs transformers generate, same weights and prompts
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    out["decode"] = []
    for b in args.decode_batches:
        prompts = torch.randn(b, prompt_len, model.llm.config.hidden_size, device=device, dtype=dtype) * 0.02
        params = SamplingParams(max_new_tokens=args.new_tokens)
        warm = generate(llm, list(prompts), params)  # compiles / captures at this shape
        t0 = time.perf_counter()
        res = generate(llm, list(prompts), params)
        sync(device)
        ours_s = res.decode_s
        ours_tps = b * res.decode_steps / ours_s if ours_s > 0 else float("nan")
        with torch.inference_mode():
            mask = torch.ones(b, prompt_len, dtype=torch.long, device=device)
            model.llm.generate(inputs_embeds=prompts, attention_mask=mask, max_new_tokens=2, do_sample=False)
            sync(device)
            t0 = time.perf_counter()
            hf_out = model.llm.generate(inputs_embeds=prompts, attention_mask=mask, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, do_sample=False)
            sync(device)
            hf_s = time.perf_counter() - t0
        hf_steps = hf_out.shape[1]
        hf_tps = b * hf_steps / max(hf_s - res.prefill_s, 1e-9)  # decode share: its prefill ~ ours
        agree = [int(hf_out[i, :len(res.tokens[i])].tolist() == res.tokens[i][:hf_steps]) for i in range(b)]
        floor_tps = b * bw / weight_bytes
        out["decode"].append({"batch": b, "new_tokens": args.new_tokens, "facert_tokens_per_s": ours_tps,
                              "transformers_tokens_per_s": hf_tps, "speedup": ours_tps / hf_tps,
                              "floor_tokens_per_s": floor_tps, "fraction_of_floor": ours_tps / floor_tps,
                              "greedy_tokens_equal": sum(agree), "of": b,
                              "warmup_s": warm.prefill_s + warm.decode_s})
    out["compile_s"] = llm.compile_seconds
    out["weight_bytes"] = weight_bytes
    del model, llm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(report: dict) -> str:
    f = report["floors"]
    lines = [f"# GPU suite — {report['device_name']} — {report['date']}", "",
             f"Command: `{report['command']}`", "",
             f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
             f"Python {report['versions']['python']}. Floors measured here: copy {f['copy_bandwidth_GBps']:.0f} GB/s, "
             f"{f['matmul_dtype']} matmul {f['matmul_TFLOPs']:.1f} TFLOP/s.", ""]
    for m in report["models"]:
        lines += [f"## {m['model']} ({m['llm_params'] / 1e9:.2f} B LLM params, {m['dtype']}, compile {m['compile_s']:.1f} s)", "",
                  "| decode batch | facert tok/s | transformers tok/s | speedup | floor tok/s | % of floor | greedy equal |",
                  "|---|---|---|---|---|---|---|"]
        for d in m["decode"]:
            lines.append(f"| {d['batch']} | {d['facert_tokens_per_s']:.1f} | {d['transformers_tokens_per_s']:.1f} | "
                         f"{d['speedup']:.2f}x | {d['floor_tokens_per_s']:.1f} | {100 * d['fraction_of_floor']:.0f}% | "
                         f"{d['greedy_tokens_equal']}/{d['of']} |")
        t = m["ttft"]
        lines += ["", f"Time to first token ({t['prompt_tokens']} prompt tokens): facert {t['facert_ms']:.1f} ms, "
                      f"transformers {t['transformers_ms']:.1f} ms ({t['speedup']:.2f}x), floor {t['floor_ms']:.1f} ms.", "",
                  "| vision batch | ms | images/s | floor ms | % of floor |", "|---|---|---|---|---|"]
        for v in m["vision"]:
            lines.append(f"| {v['batch']} | {v['ms']:.2f} | {v['images_per_s']:.1f} | {v['floor_ms']:.2f} | "
                         f"{100 * v['fraction_of_floor']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default="faceinsight-7b,facellm-1b,facellm-8b", help="comma-separated spec names")
    ap.add_argument("--layers", type=int, help="cap depth (for a quick look; full size by default)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--vision-batches", default="1,8,64")
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per measurement (default 64)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions, median reported (default 5)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (to see what graphs buy)")
    ap.add_argument("--quick", action="store_true", help="small floors measurement (smoke runs)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-<device>)")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.vision_batches = [int(x) for x in args.vision_batches.split(",")]
    args.decode_batches = [int(x) for x in args.decode_batches.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a GPU host (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    report = {"date": dt.date.today().isoformat(), "device_name": name,
              "command": " ".join(["python", "benchmarks/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "floors": measure_floors(device, args.quick), "models": []}
    for m in args.models:
        print(f"[bench_gpu] {m} ...", file=sys.stderr, flush=True)
        report["models"].append(bench_model(m, args, device, report["floors"]))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"{report['date']}-{slug}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_suite.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    print(f"[bench_gpu] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

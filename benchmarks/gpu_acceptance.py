"""GPU acceptance: every engine type built, checked against torch, served natively, and benchmarked.

One command on a GPU host with TensorRT and TensorRT-LLM (NVIDIA's Triton + TensorRT-LLM container,
nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3, with `pip install -e '.[serve]'`), sized to fit
one 10-minute call:

    python benchmarks/gpu_acceptance.py                      # facellm-1b at full width, 2 layers
    python benchmarks/gpu_acceptance.py --model faceinsight-7b --layers 1
    python benchmarks/gpu_acceptance.py --dry-run            # the plan, nothing run (works anywhere)

Steps (each timed; a failed step is recorded and the ones that do not depend on it still run):
  checkpoint   facert init: the model's real shapes (widths, heads, vocab), --layers deep, seeded weights
  onnxruntime  facert build --backend onnxruntime; greedy tokens and first logits against torch (fp32)
  tensorrt     facert build --backend tensorrt (bf16); the same comparison against torch on the GPU
  tensorrt-llm facert build --backend tensorrt-llm (bf16); the engine's first logits and greedy tokens
               against torch on a prompt whose ids >= vocab_size index a per-request prompt table
  serve        facert repo --target native on the tensorrt-llm engines; NVIDIA's tritonserver
               (--tritonserver, default /opt/tritonserver/bin/tritonserver); one streamed question
  bench        benchmarks/bench_gpu.py for the same model and depth (a short run)
Results: benchmarks/results/<date>-gpu-acceptance/acceptance.json (+ the benchmark's own files).
Tolerances: onnxruntime fp32 first logits |diff| <= 1e-3 x max|logits| and every greedy token equal; bf16 engines |diff| <= 5e-2 x max|logits| and the
first greedy token equal (bf16 rounding may flip later near-ties).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ("checkpoint", "onnxruntime", "tensorrt", "tensorrt-llm", "serve", "bench")
NEEDS = {"onnxruntime": ("checkpoint",), "tensorrt": ("checkpoint",), "tensorrt-llm": ("checkpoint",),
         "serve": ("tensorrt-llm",), "bench": ()}
QUESTION = "Is this person smiling?"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="facellm-1b", help="spec name (runtime/specs.py; default facellm-1b)")
    ap.add_argument("--layers", type=int, default=2, help="vision and LLM depth at full width (default 2)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--work", default="/tmp/facert-gpu-acceptance", help="scratch folder (checkpoint, engines, repo)")
    ap.add_argument("--tritonserver", default="/opt/tritonserver/bin/tritonserver", help="NVIDIA's tritonserver binary")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens compared per check (default 8)")
    ap.add_argument("--max-batch", type=int, default=2, help="engines' max batch (default 2: builds stay short)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-gpu-acceptance)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.layers < 1 or args.new_tokens < 1 or args.max_batch < 1:
        ap.error("--layers, --new-tokens and --max-batch must be >= 1")
    args.steps = [s for s in STEPS if s in steps]
    return args


def plan(args) -> list[str]:
    """One line per step: what it runs."""
    work = Path(args.work)
    ckpt, eng = work / "checkpoint", work / "engines"
    lines = {
        "checkpoint": f"facert init --model {args.model} --layers {args.layers} --out {ckpt}",
        "onnxruntime": f"facert build --checkpoint {ckpt} --backend onnxruntime --out {eng}/onnxruntime; "
                       f"compare {args.new_tokens} greedy tokens with torch",
        "tensorrt": f"facert build --checkpoint {ckpt} --backend tensorrt --precision bf16 --max-batch {args.max_batch} "
                    f"--out {eng}/tensorrt; compare with torch (cuda)",
        "tensorrt-llm": f"facert build --checkpoint {ckpt} --backend tensorrt-llm --precision bf16 --max-batch "
                        f"{args.max_batch} --out {eng}/tensorrt-llm; engine vs torch with a prompt table",
        "serve": f"facert repo --engines {eng}/tensorrt-llm --backend tensorrt-llm --target native --out {work}/repo; "
                 f"{args.tritonserver}; ask {QUESTION!r} over gRPC (streamed)",
        "bench": f"python benchmarks/bench_gpu.py --models {args.model} --layers {args.layers} --new-tokens 16 --repeat 3",
    }
    return [f"{s:13s} {lines[s]}" for s in args.steps]


# ------------------------------------------------------------------------------------------- steps

def _face_images(n: int) -> list[bytes]:
    import io

    from PIL import Image

    from runtime.cli import DEMO_IMAGE

    img = Image.open(DEMO_IMAGE).convert("RGB")
    out = []
    for box in ((0, 0, 512, 512), (100, 0, 400, 300))[:n]:
        buf = io.BytesIO()
        img.crop(box).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _compare(got, want, rel: float, all_tokens: bool) -> dict:
    """first-logit difference and token agreement of two lists of pipeline Answers."""
    import torch

    diffs, scales, same = [], [], []
    for g, w in zip(got, want):
        gl, wl = g.first_logits.float().cpu(), w.first_logits.float().cpu()
        diffs.append(float((gl - wl).abs().max()))
        scales.append(float(wl.abs().max()))
        same.append(g.token_ids == w.token_ids if all_tokens else g.token_ids[:1] == w.token_ids[:1])
    ok = all(d <= rel * s for d, s in zip(diffs, scales)) and all(same)
    return {"ok": ok, "max_abs_diff": max(diffs), "max_abs_logit": max(scales), "tolerance": rel,
            "tokens_equal": same, "torch_version": torch.__version__}


def step_checkpoint(args, ctx) -> dict:
    from runtime.checkpoint import init_checkpoint

    path = Path(args.work) / "checkpoint"
    if path.exists():
        shutil.rmtree(path)
    init_checkpoint(args.model, path, layers=args.layers, seed=0, progress=lambda *_: None)
    ctx["checkpoint"] = path
    return {"ok": True, "path": str(path)}


def _build(args, ctx, backend: str, precision: str) -> Path:
    from export.build import Progress, build_engines

    out = Path(args.work) / "engines" / backend
    build_engines(ctx["checkpoint"], backend, out, precision=precision, max_batch=args.max_batch, force=True,
                  progress=Progress(8, quiet=False))
    return out


def _reference(ctx, device: str):
    from runtime.generate import SamplingParams
    from runtime.pipeline import FacePipeline

    pipe = FacePipeline.from_checkpoint(ctx["checkpoint"], device=device)
    return pipe, SamplingParams(max_new_tokens=ctx["new_tokens"])


def step_onnxruntime(args, ctx) -> dict:
    from runtime.engines import open_pipeline

    out = _build(args, ctx, "onnxruntime", "fp32")
    images = _face_images(2)
    ref, params = _reference(ctx, "cpu")
    want = ref.ask_batch(images, [QUESTION] * 2, params)
    got = open_pipeline(out, "onnxruntime").ask_batch(images, [QUESTION] * 2, params)
    return _compare(got, want, rel=1e-3, all_tokens=True)


def step_tensorrt(args, ctx) -> dict:
    from runtime.engines import open_pipeline

    out = _build(args, ctx, "tensorrt", "bf16")
    images = _face_images(2)
    ref, params = _reference(ctx, "cuda")
    want = ref.ask_batch(images, [QUESTION] * 2, params)
    got = open_pipeline(out, "tensorrt", device="cuda").ask_batch(images, [QUESTION] * 2, params)
    return _compare(got, want, rel=5e-2, all_tokens=False)


def step_tensorrt_llm(args, ctx) -> dict:
    import torch

    from runtime.backends.trtllm_backend import TrtLlmError
    from runtime.backends.trtllm_backend import TrtLlmGenerator
    from runtime.checkpoint import load_checkpoint
    from runtime.generate import SamplingParams, TorchLLM, generate
    from runtime.prompt import splice_prompt_table

    out = _build(args, ctx, "tensorrt-llm", "bf16")
    ctx["trtllm_engines"] = out
    model, _, _ = load_checkpoint(ctx["checkpoint"])
    manifest = json.loads((out / "manifest.json").read_text())
    engine_dir = (out / manifest["components"]["llm"]["file"]).parent
    rows = model.num_image_tokens + model.num_seg_tokens
    torch.manual_seed(5)
    tables = 0.02 * torch.randn(2, rows, model.llm.config.hidden_size)
    v = model.vocab_size
    prompts = [[5, 6] + list(range(v, v + rows)) + [7, 8, 9], [11] + list(range(v, v + rows)) + [12]]
    params = SamplingParams(max_new_tokens=ctx["new_tokens"])
    llm = TorchLLM(model.llm.to("cuda"))
    embeds = [splice_prompt_table(llm.embed, torch.tensor([p]), tables[i:i + 1].to("cuda"), v)[0]
              for i, p in enumerate(prompts)]
    want = generate(llm, embeds, params)
    try:
        got = TrtLlmGenerator(engine_dir).generate(prompts, tables, params)
    except TrtLlmError as e:
        return {"ok": False, "error": str(e)}
    diff = float((got.first_logits - want.first_logits).abs().max())
    scale = float(want.first_logits.abs().max())
    first_equal = [g[:1] == w[:1] for g, w in zip(got.tokens, want.tokens)]
    return {"ok": diff <= 5e-2 * scale and all(first_equal), "max_abs_diff": diff, "max_abs_logit": scale,
            "first_token_equal": first_equal, "tokens_equal": [g == w for g, w in zip(got.tokens, want.tokens)]}


def step_serve(args, ctx) -> dict:
    from runtime.client import ask_remote
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports

    repo = Path(args.work) / "repo"
    fill_repository(repo, engines=ctx["trtllm_engines"], backend="tensorrt-llm", target="native",
                    max_batch_size=args.max_batch, overwrite=True)
    http, grpc, metrics = free_ports(3)
    pieces = []
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, tritonserver=args.tritonserver):
        t0 = time.perf_counter()
        answer = ask_remote(f"127.0.0.1:{grpc}", _face_images(1)[0], QUESTION, stream=True, on_text=pieces.append)
        seconds = time.perf_counter() - t0
    return {"ok": bool(answer.get("token_ids")) and "".join(pieces) == answer.get("text", "".join(pieces)),
            "text": answer.get("text"), "tokens": len(answer.get("token_ids", [])),
            "finish_reason": answer.get("finish_reason"), "seconds": round(seconds, 3)}


def step_bench(args, ctx) -> dict:
    out = Path(ctx["out"]) / "bench_gpu"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--models", args.model, "--layers",
           str(args.layers), "--new-tokens", "16", "--repeat", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return {"ok": proc.returncode == 0, "command": " ".join(cmd), "results": str(out),
            "tail": (proc.stdout + proc.stderr)[-1500:]}


RUNNERS = {"checkpoint": step_checkpoint, "onnxruntime": step_onnxruntime, "tensorrt": step_tensorrt,
           "tensorrt-llm": step_tensorrt_llm, "serve": step_serve, "bench": step_bench}


def main(argv=None) -> int:
    args = parse_args(argv)
    print("\n".join(plan(args)))
    if args.dry_run:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device is visible; this script runs on a GPU host", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / f"{dt.date.today().isoformat()}-gpu-acceptance"
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    ctx = {"out": out, "new_tokens": args.new_tokens}
    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(0), "model": args.model, "layers": args.layers, "steps": {}}
    for step in args.steps:
        missing = [n for n in NEEDS[step] if not results["steps"].get(n, {}).get("ok")]
        if missing:  # a step whose input failed (or was not asked for) is recorded as skipped
            results["steps"][step] = {"ok": False, "skipped": f"needs the {', '.join(missing)} step"}
            continue
        print(f"[gpu_acceptance] {step} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = RUNNERS[step](args, ctx)
        except Exception as e:  # noqa: BLE001 (recorded; the independent steps still run)
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results["steps"][step] = res
        print(f"[gpu_acceptance] {step}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']} s)", flush=True)
        (out / "acceptance.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    ok = all(r.get("ok") for r in results["steps"].values())
    print(json.dumps({s: r.get("ok") for s, r in results["steps"].items()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

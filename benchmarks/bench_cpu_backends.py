"""CPU benchmark: onnxruntime engines vs facert's torch path vs Hugging Face `generate`, same weights.

    .venv/bin/python benchmarks/bench_cpu_backends.py [--work DIR] [--max-new-tokens 32] [--repeats 3]

On the demo model (real SmolLM2-135M-Instruct LLM, seeded random vision tower, parser, seg branch
and attribute head), one image and question, in one process, one backend after the other:

  vision ms      encode_image (vision tower + projector) on the preprocessed image
  prefill ms     the LLM over the spliced prompt (image + seg + text tokens)
  decode tok/s   greedy decode: (tokens - 1) / (decode time), the first token comes from prefill
  end-to-end ms  image bytes + question -> answer (preprocess, parser, seg, vision, attributes,
                 prefill, decode)

  onnxruntime    runtime.engines.open_pipeline over `facert build --backend onnxruntime` engines
  torch          runtime.pipeline.FacePipeline.from_checkpoint (transformers modules, StaticCache)
  transformers   the same facert model's vision/parser/seg/attribute modules, then the LLM's own
                 `model.llm.generate(inputs_embeds=...)` (DynamicCache, greedy) on the same prompt

Medians over --repeats after one warm-up; the backends take turns run by run, so load from other
processes on a shared machine falls on all of them alike. Every backend generates exactly --max-new-tokens tokens
(EOS ignored) so decode rates are over the same lengths; the benchmark also says whether the three
produced the same tokens. Writes results-<threads>-threads.json and README.md (every run in the folder) into
benchmarks/results/<date>-cpu-<machine id>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.cli import DEMO_IMAGE  # noqa: E402
from runtime.generate import SamplingParams, generate  # noqa: E402
from runtime.models.attributes import apply_constraints  # noqa: E402
from runtime.pipeline import FacePipeline  # noqa: E402
from runtime.prompt import splice_prompt_table  # noqa: E402

QUESTION = "Describe this person's face: hair, expression and any accessories."


def machine_id() -> str:
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(p).read_text().strip()[:8]
        except OSError:
            continue
    return platform.node()[:8] or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def median(xs):
    return round(statistics.median(xs), 2)


def run_facert(pipe: FacePipeline, image: bytes, n: int) -> dict:
    """One request through a FacePipeline's stages, timed; EOS ignored so exactly n tokens come out."""
    c = pipe.c
    t_start = time.perf_counter()
    x, ids = pipe.requests.build(image, QUESTION, None, n)
    t0 = time.perf_counter()
    image_tokens, pooled = c.encode_image(x.pixel_values)
    vision = time.perf_counter() - t0
    labels = c.parse_face(x.parser_pixels)
    seg = c.seg_tokens(labels)
    apply_constraints(c.attributes(pooled).float().cpu())
    table = torch.cat([torch.as_tensor(image_tokens), torch.as_tensor(seg)], dim=1)
    embeds = splice_prompt_table(c.llm.embed, torch.tensor([ids]), table.to(c.llm.device), c.vocab_size)[0]
    res = generate(c.llm, [embeds], SamplingParams(max_new_tokens=n), eos_token_ids=())
    total = time.perf_counter() - t_start
    tokens = res.tokens[0]
    return {"vision_ms": ms(vision), "prefill_ms": ms(res.prefill_s),
            "decode_tokens_per_s": (len(tokens) - 1) / res.decode_s, "end_to_end_ms": ms(total),
            "tokens": tokens, "prompt_tokens": len(ids)}


def run_transformers(pipe: FacePipeline, image: bytes, n: int) -> dict:
    """The same stages with the LLM run by transformers' own `generate` (its default DynamicCache)."""
    c = pipe.c
    model = c.model
    t_start = time.perf_counter()
    x, ids = pipe.requests.build(image, QUESTION, None, n)
    with torch.inference_mode():
        t0 = time.perf_counter()
        image_tokens, pooled = model.encode_image(torch.from_numpy(x.pixel_values))
        vision = time.perf_counter() - t0
        seg = model.seg(model.parse_face(torch.from_numpy(x.parser_pixels)))
        apply_constraints(model.attributes(pooled).float())
        table = torch.cat([image_tokens, seg], dim=1)
        embeds = splice_prompt_table(model.llm.get_input_embeddings(), torch.tensor([ids]), table, c.vocab_size)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        kw = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=False, eos_token_id=None,
                  pad_token_id=0, temperature=None, top_p=None, top_k=None)
        t0 = time.perf_counter()
        model.llm.generate(**kw, max_new_tokens=1, min_new_tokens=1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.llm.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        full = time.perf_counter() - t0
    total = time.perf_counter() - t_start - prefill  # the extra 1-token call is not part of a request
    tokens = out[0].tolist()[-n:]
    return {"vision_ms": ms(vision), "prefill_ms": ms(prefill),
            "decode_tokens_per_s": (n - 1) / (full - prefill), "end_to_end_ms": ms(total),
            "tokens": tokens, "prompt_tokens": len(ids)}


def measure(runners: dict, repeats: int) -> dict:
    """Median stage timings per backend. The backends take turns, run by run, so that load from
    elsewhere on a shared machine falls on all of them alike instead of on whichever ran then."""
    for fn in runners.values():
        fn()  # warm-up: lazy inits, first-touch allocations, onnxruntime's first-run planning
    runs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            runs[name].append(fn())
    out = {}
    for name, rs in runs.items():
        r = {k: median([x[k] for x in rs]) for k in ("vision_ms", "prefill_ms", "decode_tokens_per_s", "end_to_end_ms")}
        r["runs"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in x.items() if k != "tokens"}
                     for x in rs]
        r["tokens"], r["prompt_tokens"] = rs[-1]["tokens"], rs[-1]["prompt_tokens"]
        out[name] = r
    return out


def ensure_demo(work: Path, engines_name: str, simplify: bool = True) -> tuple[Path, Path]:
    from export.build import build_engines
    from runtime.checkpoint import init_checkpoint

    ckpt = work / "checkpoints" / "demo"
    if not (ckpt / "config.json").exists():
        init_checkpoint("demo", ckpt)
    engines = work / "engines" / engines_name
    if not (engines / "manifest.json").exists():
        build_engines(ckpt, "onnxruntime", engines, simplify=simplify, force=True)
    return ckpt, engines


def gemv_bandwidth(rows: int, cols: int, threads: int, repeats: int = 20) -> dict:
    """GB/s that torch and onnxruntime reach on one fp32 matrix-vector product of [rows, cols]
    (the lm_head's shape): the ceiling of a batch-1 decode step, which reads every weight once."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = torch.randn(rows, cols)
    x = torch.randn(1, cols)
    nbytes = w.numel() * 4

    def best(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(nbytes / min(times) / 1e9, 1)

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(w.T.contiguous().numpy(), "w")])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    with torch.inference_mode():
        return {"shape": [rows, cols], "torch_GB_per_s": best(lambda: torch.nn.functional.linear(x, w)),
                "onnxruntime_GB_per_s": best(lambda: sess.run(None, {"x": xn}))}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "demo_out"), help="where the demo checkpoint and engines live "
                    "(built there if missing; default demo_out/)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime intra-op threads")
    ap.add_argument("--compare-unsimplified", action="store_true",
                    help="also time onnxruntime on engines built without onnxslim")
    ap.add_argument("--shared", default="", help="a note on other load on the machine, recorded as is")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-cpu-<machine id>)")
    args = ap.parse_args(argv)

    from runtime.engines import open_pipeline

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ckpt, engines = ensure_demo(work, "demo-onnxruntime")
    image = DEMO_IMAGE.read_bytes()
    n = args.max_new_tokens
    load_before = load_average()

    t0 = time.perf_counter()
    ort_pipe = open_pipeline(engines, intra_op_threads=args.threads)
    load_s = {"onnxruntime": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    torch_pipe = FacePipeline.from_checkpoint(ckpt)
    load_s["torch"] = load_s["transformers"] = round(time.perf_counter() - t0, 2)
    runners = {"onnxruntime": lambda: run_facert(ort_pipe, image, n),
               "torch": lambda: run_facert(torch_pipe, image, n),
               "transformers": lambda: run_transformers(torch_pipe, image, n)}
    if args.compare_unsimplified:
        _, plain = ensure_demo(work, "demo-onnxruntime-unsimplified", simplify=False)
        plain_pipe = open_pipeline(plain, intra_op_threads=args.threads)
        runners["onnxruntime (no onnxslim)"] = lambda: run_facert(plain_pipe, image, n)
    print(f"[bench] measuring {', '.join(runners)} ({args.repeats} turns each)", file=sys.stderr, flush=True)
    results = measure(runners, args.repeats)
    for name, r in results.items():
        r["load_s"] = load_s.get(name)
    load_after = load_average()
    llm_layout = json.loads((engines / "manifest.json").read_text())["model"]["llm"]
    weight_bytes = 4 * sum(p.numel() for p in torch_pipe.c.model.llm.parameters())
    for r in results.values():  # every decode step streams all LLM weights once
        r["weights_GB_per_s"] = round(weight_bytes * r["decode_tokens_per_s"] / 1e9, 1)
    probe = gemv_bandwidth(llm_layout["vocab_size"], llm_layout["hidden_size"], args.threads)

    ref = results["torch"]["tokens"]
    for r in results.values():
        r["same_tokens_as_torch"] = r["tokens"] == ref
    ort_vs_hf = results["onnxruntime"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]
    manifest = json.loads((engines / "manifest.json").read_text())
    simplify = {k: v.get("simplify") for k, v in manifest["components"].items() if v.get("simplify")}
    import onnxruntime
    import transformers

    record = {
        "benchmark": "bench_cpu_backends",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"id": machine_id(), "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "shared": args.shared or None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__},
        "model": {"spec": "demo", "llm": "SmolLM2-135M-Instruct (fp32)", "source_sha256": manifest["source"]["sha256"]},
        "settings": {"max_new_tokens": n, "repeats": args.repeats, "threads": args.threads, "question": QUESTION,
                     "image": DEMO_IMAGE.name},
        "results": results,
        "onnxruntime_decode_vs_transformers": round(ort_vs_hf, 2),
        "llm_weight_bytes_per_token": weight_bytes,
        "gemv_probe": probe,
        "onnxslim": simplify,
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
    }
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results"
                                           / f"{datetime.now().strftime('%Y-%m-%d')}-cpu-{machine_id()}")
    out.mkdir(parents=True, exist_ok=True)
    # one JSON per thread count; README.md shows every run recorded in the folder
    (out / f"results-{args.threads}-threads.json").write_text(json.dumps(record, indent=2) + "\n")
    records = [json.loads(p.read_text()) for p in sorted(out.glob("results-*-threads.json"))]
    (out / "README.md").write_text("\n".join(markdown(r) for r in records))
    print(markdown(record))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# CPU backends on the demo model — {r['date'][:10]}, {r['settings']['threads']} threads",
        "",
        f"- command: `{r['command']}` (git {r['git']})",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']} (id {m['id']}); load average "
        f"{m['load_average_before']} before, {m['load_average_after']} after",
    ]
    if m.get("shared"):
        lines.append(f"- **shared machine**: {m['shared']}")
    v = r["versions"]
    lines += [
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"onnxruntime {v['onnxruntime']}, numpy {v['numpy']}",
        f"- model: demo ({r['model']['llm']}); {r['settings']['max_new_tokens']} new tokens (EOS ignored), greedy, "
        f"median of {r['settings']['repeats']} interleaved runs after a warm-up, {r['settings']['threads']} threads",
        "",
        "| backend | vision ms | prefill ms | decode tokens/s | weights GB/s in decode | end-to-end ms "
        "| prompt tokens | same tokens as torch |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, x in r["results"].items():
        lines.append(f"| {name} | {x['vision_ms']} | {x['prefill_ms']} | {x['decode_tokens_per_s']:.1f} | "
                     f"{x.get('weights_GB_per_s', '')} | {x['end_to_end_ms']} | {x['prompt_tokens']} | "
                     f"{'yes' if x['same_tokens_as_torch'] else 'NO'} |")
    lines += ["", f"onnxruntime decode / transformers decode: **{r['onnxruntime_decode_vs_transformers']}x** "
              "(goal: >= 2x)", ""]
    if "gemv_probe" in r:
        p = r["gemv_probe"]
        lines += [f"What bounds decode: each step streams all {r['llm_weight_bytes_per_token'] / 1e6:.0f} MB of fp32 "
                  f"LLM weights once. One fp32 matrix-vector product of the lm_head's shape {p['shape']} runs at "
                  f"{p['onnxruntime_GB_per_s']} GB/s in onnxruntime and {p['torch_GB_per_s']} GB/s in torch on "
                  "this machine, so the decode rate of each is capped near bandwidth / weight bytes, and the "
                  "onnxruntime / transformers ratio near the ratio of those two GEMV rates plus what "
                  "transformers' Python loop adds per step. Going further needs fewer weight bytes "
                  "(fp16, int8/int4 weight-only), which would no longer reproduce torch's fp32 tokens.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

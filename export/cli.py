"""`facert build`, `facert demo` and `facert serve-demo`: the subcommands that build engines.

They join the facert command through the `facert.commands` entry point (pyproject.toml; see
runtime/cli/__init__.py), because export builds on runtime and never the reverse.

  facert build --checkpoint DIR --backend onnxruntime|tensorrt|tensorrt-llm --out DIR   (or --recipe)
  facert demo [--in-process]    the main job: demo checkpoint -> onnxruntime engines -> repository
                                -> tritonserver -> one streamed question over gRPC -> stop
  facert serve-demo             the same, with --no-engines to serve the torch checkpoint
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from runtime.cli.ask import ask_local, cmd_init, print_answer
from runtime.cli.common import DEMO_IMAGE, DEMO_QUESTION, add_sampling, err, progress, sampling

# The demo serves the fastest CPU engines whose accuracy on the demo model meets its goal
# (export.quant_accuracy.GOALS: top-1 agreement with fp32), as benchmarks/bench_quant.py measured it
# (benchmarks/results/2026-11-30-quant-planes, 50 prompts): int4 (the fastest) 96 % against its 90 %
# goal; int8 (99 %, its goal 98 %) decodes at fp32's speed. A quantized build whose own accuracy check
# misses its goal is replaced by fp32 engines at run time.
DEMO_PRECISION = "int4"


def build_arguments(args) -> dict:
    """build_engines keyword arguments: the recipe's values (--recipe), then every option given on the
    command line over them; what neither gives keeps build_engines' defaults."""
    from runtime.manifest import EngineError

    kw = {}
    if args.recipe:
        from export.recipe import load_recipe, recipe_build_args

        recipe = load_recipe(args.recipe)
        kw = recipe_build_args(recipe)
        kw["expect_spec"] = recipe["model"]["spec"]
    for key in ("checkpoint", "backend", "out", "precision", "max_batch", "max_images", "max_tiles", "max_new_tokens",
                "block_size", "accuracy_level"):
        value = getattr(args, key)
        if value is not None:
            kw[key] = value
    for key, name in (("tp", "tp_size"), ("pp", "pp_size")):  # a deployment's choice, not the recipe's
        if getattr(args, key) is not None:
            kw[name] = getattr(args, key)
    for key in ("checkpoint", "backend", "out"):
        if key not in kw:
            raise EngineError(f"--{key} is required (or give a --recipe that names it)")
    return kw


def cmd_build(args) -> int:
    from export.build import build_engines
    from runtime.manifest import EngineError
    from runtime.backends.tensorrt_backend import TensorRTError
    from runtime.backends.trtllm_backend import TrtLlmError

    command = shlex.join(["facert", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("facert") else None
    try:
        kw = build_arguments(args)
        out = build_engines(simplify=not args.no_simplify, force=args.force, command=command,
                            check_accuracy=not args.no_accuracy_check, **kw)
    except EngineError as e:  # a bad recipe or option: the message says which
        return err(str(e))
    except (TensorRTError, TrtLlmError) as e:  # TensorRT missing, no GPU, or a failed build: no traceback
        return err(str(e))
    print(out)
    return 0


def cmd_demo(args) -> int:
    if not args.in_process:
        return served_demo(args.out, args.image, args.question, sampling(args))
    ckpt = Path(args.out) / "checkpoints" / "demo"
    if not (ckpt / "config.json").exists():
        cmd_init(argparse.Namespace(model="demo", out=str(ckpt), layers=None, seed=0, dtype=None))
    else:
        progress(f"reusing {ckpt} (delete it to rebuild)")
    print(f"Q: {args.question}\n(image: {args.image})\nA: ", end="", flush=True)
    args.stream, args.json, args.checkpoint, args.engines = True, False, str(ckpt), None
    return ask_local([Path(args.image)], args.question, args)


def demo_engines(out: Path, ckpt: Path, precision: str = DEMO_PRECISION) -> tuple[Path, str]:
    """The demo's onnxruntime engines in `precision` (built once), falling back to fp32 where the
    quantized build's accuracy check misses its goal; returns the folder and a line saying what it is."""
    from export.build import build_engines
    from runtime.manifest import read_manifest

    engines = out / "engines" / ("demo-onnxruntime" if precision == "fp32" else f"demo-onnxruntime-{precision}")
    if not (engines / "manifest.json").exists():
        progress(f"building onnxruntime {precision} engines into {engines}")
        build_engines(str(ckpt), "onnxruntime", str(engines), precision=precision, force=True)
    else:
        progress(f"reusing {engines} (delete it to rebuild)")
    quantization = read_manifest(engines).get("quantization")
    if quantization is None:
        return engines, "onnxruntime engines, fp32"
    check = quantization.get("accuracy_check") or {}
    if not check.get("passes"):
        measured = (f"top-1 agreement {check['top1_agreement']:.1%}, goal {check['goal_top1']:.0%}" if check
                    else "not measured")
        progress(f"{precision} engines miss their accuracy goal ({measured}): using fp32 engines")
        return demo_engines(out, ckpt, "fp32")
    lm_head = quantization.get("output_bits", quantization["bits"])
    return engines, (f"onnxruntime engines, {precision} (LLM matmuls {quantization['bits']}-bit MatMulNBits, "
                     f"lm_head {lm_head}-bit, block {quantization['block_size']}; top-1 agreement with fp32 "
                     f"{check['top1_agreement']:.1%} at build)")


def served_demo(out: str | Path, image: str | Path, question: str, params, use_engines: bool = True,
                host: str = "127.0.0.1", echo=print, precision: str = DEMO_PRECISION) -> int:
    """init the demo checkpoint, build onnxruntime engines, fill the repository, serve, ask over gRPC, stop."""
    from runtime.checkpoint import init_checkpoint
    from runtime.client import ask_remote, model_card
    from runtime.pipeline import Answer
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports, port_is_free

    out = Path(out)
    ckpt = out / "checkpoints" / "demo"
    if not (ckpt / "config.json").exists():
        init_checkpoint("demo", ckpt, progress=progress)
    else:
        progress(f"reusing {ckpt} (delete it to rebuild)")
    source = {"checkpoint": ckpt}
    engines_note = "torch checkpoint"
    if use_engines:
        engines, engines_note = demo_engines(out, ckpt, precision)
        source = {"engines": engines, "backend": "onnxruntime"}
    repo = out / "model_repository"
    fill_repository(repo, overwrite=True, **source)
    progress(f"model repository {repo} ({engines_note})")

    ports = [8000, 8001, 8002]
    if not all(port_is_free(host, p) for p in ports):
        ports = free_ports(3, host)
    log_path = out / "tritonserver.log"
    with open(log_path, "w") as log_file:
        server = TritonServer(repo, host=host, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                              log=lambda line: print(line, file=log_file, flush=True), provision_log=progress)
        progress(f"starting tritonserver (log: {log_path})")
        with server:
            progress(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}")
            echo(f"Q: {question}\n(image: {image}, asked over gRPC at {server.grpc_url}, streamed; served by "
                 f"{engines_note})\nA: ", end="")
            result = ask_remote(server.grpc_url, Path(image).read_bytes(), question, params, stream=True,
                                on_text=lambda piece: echo(piece, end="", flush=True))
            card = model_card(server.grpc_url, result["model"])
            answer = Answer(result["text"], result["token_ids"], result["finish_reason"] or "", result["timings"],
                            result["attributes"], result["attributes_raw"], result["constraints_fired"])
            print_answer(answer, card, streamed=True, out=sys.stdout)
            progress("stopping tritonserver")
    return 0


def cmd_serve_demo(args) -> int:
    from runtime.client import RemoteError
    from runtime.generate import SamplingParams
    from runtime.serving.repo import RepositoryError
    from runtime.serving.server import ServerError

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    try:
        return served_demo(args.out, args.image, args.question, params.validate(), use_engines=not args.no_engines)
    except (ServerError, RepositoryError, RemoteError, ValueError) as e:
        print(file=sys.stderr)
        return err(str(e))


def register(sub) -> None:
    from export.build import BACKENDS, DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS, PRECISIONS
    from runtime.file_hashes import add_verify_argument

    p = sub.add_parser(
        "build", help="turn a checkpoint into engines (ONNX Runtime, TensorRT, TensorRT-LLM)",
        description="Export a checkpoint's components (vision tower + projector, face parser, seg-token "
                    "branch, attribute head, LLM prefill/decode with explicit KV cache) and build them for "
                    "one backend into a self-contained engines folder with a verified manifest.json. "
                    "Run it with `facert ask IMAGE QUESTION --engines DIR`. A recipe (engines/NAME.toml) "
                    "gives every option for one served model and backend; options given here override it.")
    p.add_argument("--recipe", help="build recipe, e.g. engines/facellm-1b-tensorrt-llm.toml")
    p.add_argument("--checkpoint", help="checkpoint directory (facert, llava-hf or InternVL3-hf)")
    p.add_argument("--backend", choices=BACKENDS, help="what the engines are for")
    p.add_argument("--out", help="engines folder to write, e.g. engines/demo")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="onnxruntime: fp32 (default), int8/int4 (the LLM's matmuls weight-only quantized, "
                        "MatMulNBits; measured against fp32 at build time). tensorrt: fp32/fp16/bf16/fp8 (Q/DQ graphs). tensorrt-llm: "
                        "fp32/fp16/bf16, int8/int4 weight-only (W8A16/W4A16), fp8 (ModelOpt-calibrated). The GPU "
                        "backends default to bf16 (fp16 before sm_80)")
    p.add_argument("--block-size", type=int,
                   help="onnxruntime int8/int4: weights per quantization block, a power of two >= 16 (default 32)")
    p.add_argument("--accuracy-level", type=int, choices=(1, 4),
                   help="onnxruntime int8/int4: MatMulNBits' compute type, 1 (fp32 activations: closer to fp32, "
                        "slower) or 4 (activations rounded to int8 per block: faster). Default: what measured best "
                        "on the demo model, 4 for int4 (96%% top-1 agreement with fp32; 98%% at level 1, at 0.6x "
                        "the decode speed) and 1 for int8")
    p.add_argument("--no-accuracy-check", action="store_true",
                   help="onnxruntime int8/int4: skip measuring the quantized LLM against the fp32 model "
                        "(recorded in manifest.json otherwise)")
    p.add_argument("--max-batch", type=int,
                   help=f"largest batch the engines serve (TensorRT profiles, prompt table; default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-images", type=int, help="most images in one request (default 1)")
    p.add_argument("--max-tiles", type=int, help="most InternVL tiles per image (default 1)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"longest answer a TensorRT-LLM engine is built for (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--tp", type=int,
                   help="tensor parallelism (tensorrt-llm): split the LLM's engine over this many GPUs (default 1)")
    p.add_argument("--pp", type=int,
                   help="pipeline parallelism (tensorrt-llm): split the LLM's layers into this many stages; "
                        "the engine runs on tp x pp GPUs (default 1)")
    p.add_argument("--no-simplify", action="store_true", help="keep the exported graphs as they are (no onnxslim)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_verify_argument(p)  # for the checkpoint's checksums
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("demo", help="the main job: demo model -> engines -> Triton server -> streamed answer",
                       description="The main job, on any laptop: builds the demo checkpoint (real SmolLM2-135M "
                                   "LLM, seeded random vision/parser/seg/attribute parts) and its onnxruntime "
                                   "engines once, fills a Triton model repository, starts the server on "
                                   "127.0.0.1, asks about a public-domain face photo over gRPC with streaming, "
                                   "prints the answer, attributes and timings, and stops the server.")
    p.add_argument("--in-process", action="store_true",
                   help="skip engines and server: answer with the torch checkpoint in this process")
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out/)")
    p.add_argument("--image", default=str(DEMO_IMAGE), help="image (default: the NASA astronaut photo)")
    p.add_argument("--question", default=DEMO_QUESTION, help="question to ask")
    add_sampling(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve-demo", help="the main job, served: demo model -> engines -> Triton -> streamed answer over gRPC",
        description="Build the demo checkpoint (once) and its onnxruntime engines (once), fill the model "
                    "repository, start tritonserver on 127.0.0.1, ask one question over gRPC with streaming, "
                    "print the answer, attributes and per-stage timings, and stop the server.")
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out/)")
    p.add_argument("--image", default=str(DEMO_IMAGE), help="image (default: the NASA astronaut photo)")
    p.add_argument("--question", default=DEMO_QUESTION, help="question to ask")
    p.add_argument("--no-engines", action="store_true", help="serve the torch checkpoint instead of onnxruntime engines")
    add_sampling(p)
    p.set_defaults(func=cmd_serve_demo)

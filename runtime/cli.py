"""`facert`: one command, with subcommands.

  facert init  --model SPEC --out DIR          write a checkpoint with seeded random weights
  facert ask   IMAGE [IMAGE ...] QUESTION --checkpoint DIR   answer a question about face images, in-process
  facert demo                                   the main job: demo model, engines, server, streamed answer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEMO_IMAGE = ASSETS / "astronaut.png"
# build (export), serve/repo (serving), eval, bench: registered if present.
EXTRA_COMMAND_MODULES = ("export.cli", "runtime.serve_cli", "runtime.eval_cli", "runtime.bench_cli")
DEMO_QUESTION = "Describe this person's face: hair, expression and any accessories."


def _err(msg: str) -> int:
    print(f"facert: error: {msg}", file=sys.stderr)
    return 2


def _progress(msg: str) -> None:
    print(f"[facert] {msg}", file=sys.stderr, flush=True)


def cmd_init(args) -> int:
    from runtime.checkpoint import init_checkpoint

    init_checkpoint(args.model, args.out, layers=args.layers, seed=args.seed, dtype=args.dtype, progress=_progress)
    return 0


def _sampling(args):
    from runtime.generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed).validate()


def print_answer(answer, spec: dict, streamed: bool, out=sys.stdout) -> None:
    if not streamed:
        print(answer.text, file=out)
    else:
        print(file=out)
    random_parts = spec.get("random_parts", [])
    if random_parts:
        print(f"\nnote: these parts have seeded RANDOM weights, so their outputs carry no meaning: "
              f"{', '.join(random_parts)}", file=out)
    real = spec.get("real_parts", {})
    if real:
        print("real weights: " + "; ".join(f"{k}: {v}" for k, v in real.items()), file=out)
    per_image = answer.image_attributes or ([{"attributes": answer.attributes,
                                              "constraints_fired": answer.constraints_fired}]
                                            if answer.attributes else [])
    for i, image in enumerate(per_image):
        present = sorted(((p, n) for n, p in image["attributes"].items() if p >= 0.5), reverse=True)
        label = "attributes (random head)" if "attributes" in random_parts else "attributes"
        which = f" of image {i + 1}" if len(per_image) > 1 else ""
        print(f"\n{label}{which}, p >= 0.5 after constraints: "
              + (", ".join(f"{n} {p:.2f}" for p, n in present) or "none"), file=out)
        print("constraint rules fired: " + (", ".join(image["constraints_fired"]) or "none"), file=out)
    t = answer.timings
    stages = " | ".join(f"{k[:-3]} {v:.1f} ms" for k, v in t.items() if k.endswith("_ms") and k != "total_ms")
    print(f"\ntimings: {stages}\n         decode {t['decode_tokens_per_s']:.1f} tokens/s | total {t['total_ms']:.1f} ms "
          f"| {len(answer.token_ids)} tokens, finished by {answer.finish_reason}", file=out)


def _open_pipeline(args):
    """The in-process pipeline for --checkpoint (torch) or --engines (built engines)."""
    from runtime.pipeline import FacePipeline

    if getattr(args, "engines", None):
        from runtime.engines import open_pipeline  # issue 3: engines folders and their backends

        _progress(f"loading engines {args.engines} ({args.backend})")
        return open_pipeline(args.engines, backend=args.backend, device=args.device)
    _progress(f"loading {args.checkpoint}")
    return FacePipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                        cuda_graphs=not args.no_cuda_graphs)


def _ask_local(images: list[Path], question: str, args) -> int:
    data = [p.read_bytes() for p in images]
    params = _sampling(args)
    pipe = _open_pipeline(args)
    on_text = None
    if args.stream and not args.json:
        def on_text(piece: str) -> None:
            print(piece, end="", flush=True)
    answer = pipe.ask(data, question, params, on_text=on_text, max_tiles=getattr(args, "max_tiles", None))
    if args.json:
        print(json.dumps({**answer.to_dict(), "random_parts": pipe.random_parts}, indent=2))
    else:
        print_answer(answer, pipe.spec, streamed=args.stream)
    return 0


def cmd_ask(args) -> int:
    # positional: IMAGE [IMAGE ...] QUESTION; --image adds more images after them, in order
    *positional, question = args.images_and_question
    images = [Path(p) for p in positional + (args.image or [])]
    if not images:
        return _err("give at least one image: facert ask IMAGE [IMAGE ...] QUESTION (or --image FILE)")
    for image in images:
        if not image.is_file():
            return _err(f"image {image} does not exist")
    if args.url:
        from runtime.client import cli_ask  # issue 5: the gRPC/HTTP client

        return cli_ask(images, question, args)
    if not (args.checkpoint or args.engines):
        return _err("say where the model is: --checkpoint DIR, --engines DIR or --url HOST:PORT")
    return _ask_local(images, question, args)


def cmd_demo(args) -> int:
    if not args.in_process:
        from runtime.serve_cli import served_demo  # the main job: engines, repository, server, gRPC

        return served_demo(args.out, args.image, args.question, _sampling(args))
    ckpt = Path(args.out) / "checkpoints" / "demo"
    if not (ckpt / "config.json").exists():
        cmd_init(argparse.Namespace(model="demo", out=str(ckpt), layers=None, seed=0, dtype=None))
    else:
        _progress(f"reusing {ckpt} (delete it to rebuild)")
    print(f"Q: {args.question}\n(image: {args.image})\nA: ", end="", flush=True)
    args.stream, args.json, args.checkpoint, args.engines = True, False, str(ckpt), None
    return _ask_local([Path(args.image)], args.question, args)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, for reproducible answers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for the in-process runtime (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="run the checkpoint in this dtype (default: as stored; bf16 is the GPU fast path's)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, decode eagerly instead of through compiled CUDA graphs")


def build_parser() -> argparse.ArgumentParser:
    from runtime.specs import SPEC_NAMES

    ap = argparse.ArgumentParser(
        prog="facert",
        description="Run face-perception multimodal LLMs (FaceInsight, FaceLLM) in production.",
        epilog="Start with `facert demo`. Every subcommand has its own --help.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a checkpoint with seeded random weights",
                       description="Write a facert checkpoint (config.json + model.safetensors + tokenizer) "
                                   "with seeded random weights; the demo spec's LLM is the real SmolLM2-135M. "
                                   "The same spec, --layers and --seed give a byte-identical directory.")
    p.add_argument("--model", required=True, choices=SPEC_NAMES, help="model spec")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, help="cap the vision and LLM depth (widths stay full size)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="weight dtype (default fp32; bf16 for full-size 7B/8B)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("ask", help="answer a question about one or more face images",
                       description="Answer a question about one or more face images (in prompt order, as "
                                   "separate images: `facert ask a.jpg b.jpg \"Same person?\"`) with a "
                                   "checkpoint or engines in-process, or a running server; prints the answer, "
                                   "the facial attributes (FaceInsight) and per-stage timings.",
                       epilog="The prompt is built by the checkpoint's own chat template and processor: "
                              "each image becomes its tiles (InternVL: up to --max-tiles + a thumbnail).")
    p.add_argument("images_and_question", nargs="+", metavar="IMAGE [IMAGE ...] QUESTION",
                   help="image files (JPEG, PNG, WebP, ...), then the question in plain text")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="one more image, after the positional ones (repeatable)")
    p.add_argument("--max-tiles", type=int, help="InternVL: at most this many tiles per image (default: the "
                                                 "checkpoint processor's max_patches, 12)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--checkpoint", help="checkpoint directory (facert, llava-hf or InternVL3-hf): torch, in-process")
    where.add_argument("--engines", help="engines folder built by `facert build`, in-process")
    where.add_argument("--url", help="HOST:PORT of a running `facert serve`")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="backend for --engines (default onnxruntime)")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http"), help="protocol for --url (default grpc)")
    p.add_argument("--stream", action="store_true", help="print the answer token by token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_sampling(p)
    p.set_defaults(func=cmd_ask)

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
    _add_sampling(p)
    p.set_defaults(func=cmd_demo)

    # Subcommands that live beside the parts they drive (each module has `register(subparsers)`).
    import importlib

    for name in EXTRA_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.checkpoint import CheckpointError
    from runtime.preprocess import ImageError
    from runtime.prompt import PromptError

    try:
        return args.func(args)
    except (CheckpointError, ImageError, PromptError, ValueError) as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

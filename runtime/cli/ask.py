"""`facert init` and `facert ask`: write a checkpoint; answer a question about face images.

  facert init  --model SPEC --out DIR                      a checkpoint with seeded random weights
  facert ask   IMAGE [IMAGE ...] QUESTION (--checkpoint DIR | --engines DIR | --url HOST:PORT)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.cli.common import add_sampling, err, progress, sampling
from runtime.file_hashes import add_verify_argument

# build (export), serve/repo (serving), eval, bench: registered if present.


def cmd_init(args) -> int:
    from runtime.checkpoint import init_checkpoint

    init_checkpoint(args.model, args.out, layers=args.layers, seed=args.seed, dtype=args.dtype, progress=progress)
    return 0


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

        progress(f"loading engines {args.engines} ({args.backend})")
        return open_pipeline(args.engines, backend=args.backend, device=args.device)
    progress(f"loading {args.checkpoint}")
    return FacePipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                        cuda_graphs=not args.no_cuda_graphs)


def ask_local(images: list[Path], question: str, args) -> int:
    data = [p.read_bytes() for p in images]
    params = sampling(args)
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


def _ask_remote(image_paths, question: str, args) -> int:
    """`facert ask IMAGE [IMAGE ...] QUESTION --url HOST:PORT [--protocol grpc|http] [--stream] [--json]`."""
    from runtime.client import RemoteError, ask_remote, model_card
    from runtime.pipeline import Answer

    params = sampling(args)
    on_text = None
    if args.stream and not args.json:
        def on_text(piece: str) -> None:
            print(piece, end="", flush=True)
    try:
        out = ask_remote(args.url, [open(p, "rb").read() for p in image_paths], question, params,
                         protocol=args.protocol, stream=args.stream, on_text=on_text,
                         max_tiles=getattr(args, "max_tiles", None))
    except RemoteError as e:
        if on_text is not None:
            print(file=sys.stderr)
        return err(str(e))
    card = model_card(args.url, out["model"], args.protocol)
    if args.json:
        print(json.dumps({**out, **card}, indent=2))
        return 0
    answer = Answer(out["text"], out["token_ids"], out["finish_reason"] or "", out["timings"],
                    out["attributes"], out["attributes_raw"], out["constraints_fired"],
                    prompt_tokens=out["prompt_tokens"] or 0, image_attributes=out["image_attributes"])
    print_answer(answer, card, streamed=args.stream, out=sys.stdout)
    return 0


def cmd_ask(args) -> int:
    # positional: IMAGE [IMAGE ...] QUESTION; --image adds more images after them, in order
    *positional, question = args.images_and_question
    images = [Path(p) for p in positional + (args.image or [])]
    if not images:
        return err("give at least one image: facert ask IMAGE [IMAGE ...] QUESTION (or --image FILE)")
    for image in images:
        if not image.is_file():
            return err(f"image {image} does not exist")
    if args.url:
        return _ask_remote(images, question, args)
    if not (args.checkpoint or args.engines):
        return err("say where the model is: --checkpoint DIR, --engines DIR or --url HOST:PORT")
    return ask_local(images, question, args)


def register(sub) -> None:
    from runtime.specs import SPEC_NAMES

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
    add_verify_argument(p)
    add_sampling(p)
    p.set_defaults(func=cmd_ask)

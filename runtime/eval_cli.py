"""`facert eval verify|mcq|attributes DATA (--checkpoint DIR | --engines DIR | --url HOST:PORT)`.

  verify      face verification on insightface .bin pair sets (LFW, CALFW, CPLFW, CFP-FP,
              AgeDB-30, RFW) or an LFW-style pairs.txt; by the MLLM, or by a face-embedding ONNX
              model (--embedding-model) as the specialist baseline
  mcq         FaceXBench multiple choice (one JSON file or its benchmark/ folder)
  attributes  CelebA list_attr_celeba.txt with its image folder (FaceInsight only)

Each run writes OUT/results.jsonl as it goes (rerun the same command to resume), OUT/summary.json
and, for verify, OUT/roc.png; see runtime/eval/runner.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _progress(msg: str) -> None:
    print(f"[facert] {msg}", file=sys.stderr, flush=True)


def _model_identity(args) -> dict:
    """What run.json records about the model, so a resumed run cannot mix two models."""
    if getattr(args, "embedding_model", None):
        return {"embedding_model": str(Path(args.embedding_model).resolve()), "mean": args.embedding_mean,
                "std": args.embedding_std, "flip": args.flip}
    if args.url:
        return {"url": args.url, "protocol": args.protocol}
    if args.engines:
        return {"engines": str(Path(args.engines).resolve()), "backend": args.backend}
    return {"checkpoint": str(Path(args.checkpoint).resolve()), "dtype": args.dtype}


def _open_backend(args):
    from runtime.eval.runner import EvalError, PipelineBackend, RemoteBackend

    if args.url:
        return RemoteBackend(args.url, args.protocol, args.concurrency)
    if not (args.checkpoint or args.engines):
        raise EvalError("say where the model is: --checkpoint DIR, --engines DIR or --url HOST:PORT")
    if args.engines:
        from runtime.engines import open_pipeline  # the engines folders and their backends

        _progress(f"loading engines {args.engines} ({args.backend})")
        pipeline = open_pipeline(args.engines, backend=args.backend, device=args.device)
    else:
        from runtime.pipeline import FacePipeline

        _progress(f"loading {args.checkpoint}")
        pipeline = FacePipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    return PipelineBackend(pipeline, args.concurrency)


def _log(args, command: str, settings: dict):
    from runtime.eval.runner import ResultsLog

    data = Path(args.data)
    out = Path(args.out) if args.out else Path("eval_results") / f"{command}-{data.stem or data.name}"
    config = {"command": command, "data": str(data.resolve()), "model": _model_identity(args), **settings}
    return ResultsLog(out, config)


def _finish(log, summary: dict, table: str) -> int:
    path = log.write_summary(summary)
    print(table)
    print(f"\nresults: {log.path}\nsummary: {path}")
    return 0


def _limited(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return items[:limit] if limit else items


def cmd_verify(args) -> int:
    from runtime.eval.datasets import load_pairs
    from runtime.eval.tasks import VERIFY_QUESTION, run_verify

    args.question = args.question or VERIFY_QUESTION
    pairs = _limited(load_pairs(args.data, args.images), args.limit)
    title = f"verify {Path(args.data).stem}"
    if args.embedding_model:
        from runtime.eval.scoring import OnnxFaceEmbedder

        embedder = OnnxFaceEmbedder(args.embedding_model, args.embedding_mean, args.embedding_std, args.flip)
        log = _log(args, "verify", {"scorer": "embedding"})
        summary, table = run_verify(pairs, log, embedder=embedder, batch_size=max(1, args.concurrency), title=title)
    else:
        log = _log(args, "verify", {"scorer": "mllm", "question": args.question, "max_tokens": args.max_tokens})
        backend = _open_backend(args)
        summary, table = run_verify(pairs, log, backend=backend, question=args.question,
                                    max_tokens=args.max_tokens, title=title)
    return _finish(log, summary, table)


def cmd_mcq(args) -> int:
    from runtime.eval.datasets import load_facexbench
    from runtime.eval.tasks import run_mcq

    questions = _limited(load_facexbench(args.data, prepend=args.prepend), args.limit)
    log = _log(args, "mcq", {"prepend": args.prepend, "max_tokens": args.max_tokens})
    summary, table = run_mcq(questions, log, _open_backend(args), args.max_tokens, title=f"mcq {Path(args.data).stem}")
    return _finish(log, summary, table)


def cmd_attributes(args) -> int:
    from runtime.eval.datasets import load_celeba_attributes
    from runtime.eval.runner import EvalError
    from runtime.eval.tasks import run_attributes

    images = _limited(load_celeba_attributes(args.data, args.images), args.limit)
    names = list(images[0].labels) if images else []
    if not names:
        raise EvalError(f"{args.data} lists no images")
    log = _log(args, "attributes", {})
    backend = _open_backend(args)
    summary, table = run_attributes(images, names, log, backend, title=f"attributes {Path(args.data).stem}")
    return _finish(log, summary, table)


def _common(p: argparse.ArgumentParser, embedding: bool = False, max_tokens: int | None = None) -> None:
    p.add_argument("data", help="the evaluation data (see above)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="checkpoint directory: torch, in-process")
    where.add_argument("--engines", help="engines folder built by `facert build`, in-process")
    where.add_argument("--url", help="HOST:PORT of a running `facert serve`")
    if embedding:
        where.add_argument("--embedding-model", metavar="FILE.onnx",
                           help="score with a face-embedding ONNX model (cosine similarity) instead of the MLLM")
        p.add_argument("--embedding-mean", type=float, default=127.5, help="input normalisation mean (default 127.5)")
        p.add_argument("--embedding-std", type=float, default=128.0,
                       help="input normalisation std (default 128, insightface; some models use 127.5)")
        p.add_argument("--flip", action="store_true", help="add the flipped image's embedding (insightface's test)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="backend for --engines (default onnxruntime)")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http"), help="protocol for --url (default grpc)")
    p.add_argument("--device", default="cpu", help="device for the in-process runtime (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="run the --checkpoint in this dtype (default: as stored)")
    p.add_argument("--out", help="output folder (default eval_results/COMMAND-DATA); rerun to resume")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight against --url, or per batched call in-process (default 4)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    if max_tokens is not None:
        p.add_argument("--max-tokens", type=int, default=max_tokens,
                       help=f"most tokens generated per answer (default {max_tokens})")


def register(sub) -> None:
    # Nothing heavy is imported here: every `facert` command builds this parser.
    ev = sub.add_parser("eval", help="evaluate a model: face verification, FaceXBench, CelebA attributes",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = ev.add_subparsers(dest="eval_command", required=True, metavar="TASK")

    p = tasks.add_parser("verify", help="face verification on .bin pair sets or pairs.txt",
                         description="Face verification: 10-fold accuracy, EER, TMR at FMR 1e-3 / 1e-4 and a ROC "
                                     "plot. DATA is an insightface .bin (LFW, CALFW, CPLFW, CFP-FP, AgeDB-30, RFW) "
                                     "or an LFW-style pairs.txt (images in --images DIR/name/name_0001.jpg).")
    _common(p, embedding=True, max_tokens=8)
    p.add_argument("--images", help="image folder for a pairs.txt (default: the folder holding it)")
    p.add_argument("--question", help="the question asked about the side-by-side pair (default: \"The image shows "
                                     "two face photos side by side. Are these two face images of the same person? "
                                     "Answer yes or no.\")")
    p.set_defaults(func=cmd_verify)

    p = tasks.add_parser("mcq", help="FaceXBench multiple choice",
                         description="FaceXBench: DATA is one of its JSON files or its benchmark/ folder; accuracy "
                                     "per subtask, per category and overall.")
    _common(p, max_tokens=32)
    p.add_argument("--prepend", action="store_true", help="add each file's task description (FaceXBench's --prepend_text)")
    p.set_defaults(func=cmd_mcq)

    p = tasks.add_parser("attributes", help="CelebA attributes, before and after the constraint step",
                         description="CelebA facial attributes: DATA is list_attr_celeba.txt; mean accuracy over its "
                                     "attributes before and after the logical-constraint step (FaceInsight only).")
    _common(p)
    p.add_argument("--images", help="image folder (default: img_align_celeba/ beside DATA, else DATA's folder)")
    p.set_defaults(func=cmd_attributes)

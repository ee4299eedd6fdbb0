"""`facert eval verify|mcq|attributes DATA (--checkpoint DIR | --engines DIR | --url HOST:PORT)`.

  verify      face verification as FaceRecBench runs it (both faces as two images in one
              prompt, a yes/no question) on the benchmarks' own files: insightface .bin packs,
              LFW pairs.txt, RFW (per race), pairs_CALFW.txt / pairs_CPLFW.txt, CFP's Protocol/;
              or by a face-embedding ONNX model (--embedding-model), the specialist baseline
  mcq         FaceXBench as FaceLLM runs it (one JSON file or its benchmark/ folder; images as
              separate images; answers read with aggregate_results.py's rule)
  attributes  CelebA list_attr_celeba.txt (test split of list_eval_partition.txt when present;
              FaceInsight only)

Each run writes OUT/results.jsonl as it goes (rerun the same command to resume), OUT/summary.json
and, for verify, OUT/roc.png; see runtime/eval/runner.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.cli.common import progress
from runtime.eval.protocols import MCQ_MAX_TOKENS, VERIFY_MAX_TOKENS, VERIFY_QUESTION


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

    max_tiles = getattr(args, "max_tiles", None)
    if args.url:
        return RemoteBackend(args.url, args.protocol, args.concurrency, max_tiles)
    if not (args.checkpoint or args.engines):
        raise EvalError("say where the model is: --checkpoint DIR, --engines DIR or --url HOST:PORT")
    if args.engines:
        from runtime.engines import open_pipeline  # the engines folders and their backends

        progress(f"loading engines {args.engines} ({args.backend})")
        pipeline = open_pipeline(args.engines, backend=args.backend, device=args.device)
    else:
        from runtime.pipeline import FacePipeline

        progress(f"loading {args.checkpoint}")
        pipeline = FacePipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    return PipelineBackend(pipeline, args.concurrency, max_tiles)


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
    from runtime.eval.pairs import load_pairs
    from runtime.eval.tasks import run_verify

    args.question = args.question or VERIFY_QUESTION
    pairs, fmt = load_pairs(args.data, args.format, args.images, args.cfp_protocol)
    pairs = _limited(pairs, args.limit)
    data = Path(args.data)
    title = f"verify {fmt}" + (f"-{args.cfp_protocol}" if fmt == "cfp" else "") + f" {data.stem or data.name}"
    settings = {"format": fmt, **({"cfp_protocol": args.cfp_protocol} if fmt == "cfp" else {})}
    if args.embedding_model:
        from runtime.eval.scoring import OnnxFaceEmbedder

        embedder = OnnxFaceEmbedder(args.embedding_model, args.embedding_mean, args.embedding_std, args.flip)
        log = _log(args, "verify", {"scorer": "embedding", **settings})
        summary, table = run_verify(pairs, log, embedder=embedder, batch_size=max(1, args.concurrency), title=title)
    else:
        log = _log(args, "verify", {"scorer": "mllm", **settings, "question": args.question,
                                    "max_tokens": args.max_tokens, "max_tiles": args.max_tiles})
        backend = _open_backend(args)
        summary, table = run_verify(pairs, log, backend=backend, question=args.question,
                                    max_tokens=args.max_tokens, title=title)
    return _finish(log, summary, table)


def cmd_mcq(args) -> int:
    from runtime.eval.datasets import load_facexbench
    from runtime.eval.tasks import run_mcq

    questions = _limited(load_facexbench(args.data, prepend=args.prepend), args.limit)
    # The answer parser is not part of the run: a finished run can be rescored with the other one.
    log = _log(args, "mcq", {"prepend": args.prepend, "max_tokens": args.max_tokens, "max_tiles": args.max_tiles})
    summary, table = run_mcq(questions, log, _open_backend(args), args.max_tokens, args.answer_parser,
                             title=f"mcq {Path(args.data).stem}")
    return _finish(log, summary, table)


def cmd_attributes(args) -> int:
    from runtime.eval.datasets import load_celeba_attributes
    from runtime.eval.runner import EvalError
    from runtime.eval.tasks import run_attributes

    images, split = load_celeba_attributes(args.data, args.images, args.split, args.partition)
    images = _limited(images, args.limit)
    names = list(images[0].labels) if images else []
    if not names:
        raise EvalError(f"{args.data} lists no images")
    log = _log(args, "attributes", {"split": split})
    backend = _open_backend(args)
    summary, table = run_attributes(images, names, log, backend, title=f"attributes {Path(args.data).stem}",
                                    split=split)
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
                       help=f"most tokens generated per answer; generation stops earlier at the end of the "
                            f"answer (default {max_tokens})")
        p.add_argument("--max-tiles", type=int,
                       help="InternVL: most tiles per image (default: the checkpoint processor's max_patches)")


def register(sub) -> None:
    # Nothing heavy is imported here: every `facert` command builds this parser.
    ev = sub.add_parser("eval", help="evaluate a model: face verification, FaceXBench, CelebA attributes",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = ev.add_subparsers(dest="eval_command", required=True, metavar="TASK")

    p = tasks.add_parser("verify", help="face verification (FaceRecBench's protocol) on the benchmarks' files",
                         description="Face verification as FaceRecBench runs it: both faces as two images in one "
                                     "prompt, asked --question. Reports the decision accuracy of the parsed yes/no "
                                     "answers (the headline, comparable with the papers), then on first-token P(yes) "
                                     "the 10-fold accuracy with a tuned threshold, EER, TMR at FMR 1e-3 / 1e-4 and a "
                                     "ROC plot; RFW per race with the mean and std across races. DATA: an insightface "
                                     ".bin; LFW pairs.txt (header optional; images in lfw/ beside it or --images); "
                                     "RFW's test/ folder or one txts/<Race>/<Race>_pairs.txt; pairs_CALFW.txt / "
                                     "pairs_CPLFW.txt (images in 'aligned images/' beside it or --images); CFP's "
                                     "folder or its Protocol/. The format is detected, or named with --format.")
    _common(p, embedding=True, max_tokens=VERIFY_MAX_TOKENS)
    p.add_argument("--format", choices=("bin", "lfw", "rfw", "calfw", "cplfw", "cfp"),
                   help="the pair-set format (default: detected from DATA)")
    p.add_argument("--images", help="image folder, where it is not where the data set puts it")
    p.add_argument("--cfp-protocol", default="FP", choices=("FP", "FF"),
                   help="CFP: frontal-profile (default, CFP-FP) or frontal-frontal pairs")
    p.add_argument("--question", help=f"the text after the two images (default: {VERIFY_QUESTION!r})")
    p.set_defaults(func=cmd_verify)

    p = tasks.add_parser("mcq", help="FaceXBench multiple choice (FaceLLM's protocol)",
                         description="FaceXBench: DATA is one of its JSON files or its benchmark/ folder. Each "
                                     "question's images go as separate images, then the text its evaluate.py builds; "
                                     "the option is read with aggregate_results.py's rule (or --answer-parser strict); "
                                     "totals by category, sub-category and num_images, and the total accuracy, as "
                                     "aggregate_results.py computes them.")
    _common(p, max_tokens=MCQ_MAX_TOKENS)
    p.add_argument("--prepend", action="store_true", help="add each file's task description (FaceXBench's --prepend_text)")
    p.add_argument("--answer-parser", default="facexbench", choices=("facexbench", "strict"),
                   help="facexbench: aggregate_results.py's rule (default); strict: facert's stricter reading. "
                        "Rerun with the other to rescore a finished run without generating again")
    p.set_defaults(func=cmd_mcq)

    p = tasks.add_parser("attributes", help="CelebA attributes, before and after the constraint step",
                         description="CelebA facial attributes: DATA is list_attr_celeba.txt; mean accuracy over its "
                                     "attributes before and after the logical-constraint step (FaceInsight only), on "
                                     "the test split of list_eval_partition.txt where it is found.")
    _common(p)
    p.add_argument("--images", help="image folder (default: img_align_celeba/ beside DATA or ../Img/img_align_celeba/)")
    p.add_argument("--split", choices=("train", "val", "test", "all"),
                   help="which images to score (default: test where list_eval_partition.txt is found, else all)")
    p.add_argument("--partition", help="list_eval_partition.txt (default: beside DATA, or ../Eval/)")
    p.set_defaults(func=cmd_attributes)

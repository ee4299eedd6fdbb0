"""`facert build`: registered into the facert command by runtime/cli.py (EXTRA_COMMAND_MODULES)."""

from __future__ import annotations

import shlex
import sys


def cmd_build(args) -> int:
    from export.build import build_engines
    from export.tensorrt_build import TensorRTError
    from export.trtllm_convert import TrtLlmError

    command = shlex.join(["facert", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("facert") else None
    try:
        out = build_engines(args.checkpoint, args.backend, args.out, precision=args.precision,
                            max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                            simplify=not args.no_simplify, force=args.force, command=command)
    except (TensorRTError, TrtLlmError) as e:  # TensorRT missing, no GPU, or a failed build: no traceback
        print(f"facert: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def register(sub) -> None:
    from export.build import BACKENDS, DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS, PRECISIONS

    p = sub.add_parser(
        "build", help="turn a checkpoint into engines (ONNX Runtime, TensorRT, TensorRT-LLM)",
        description="Export a checkpoint's components (vision tower + projector, face parser, seg-token "
                    "branch, attribute head, LLM prefill/decode with explicit KV cache) and build them for "
                    "one backend into a self-contained engines folder with a verified manifest.json. "
                    "Run it with `facert ask IMAGE QUESTION --engines DIR`.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (facert, llava-hf or InternVL3-hf)")
    p.add_argument("--backend", required=True, choices=BACKENDS, help="what the engines are for")
    p.add_argument("--out", required=True, help="engines folder to write, e.g. engines/demo")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default; the only one for onnxruntime), fp16/bf16/fp8 for TensorRT")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest batch the engines serve (TensorRT profiles, prompt table; default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer a TensorRT-LLM engine is built for (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--no-simplify", action="store_true", help="keep the exported graphs as they are (no onnxslim)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_build)

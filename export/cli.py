"""`facert build`: registered into the facert command by runtime/cli.py (EXTRA_COMMAND_MODULES)."""

from __future__ import annotations

import shlex
import sys


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
    for key in ("checkpoint", "backend", "out", "precision", "max_batch", "max_images", "max_tiles", "max_new_tokens"):
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
        out = build_engines(simplify=not args.no_simplify, force=args.force, command=command, **kw)
    except EngineError as e:  # a bad recipe or option: the message says which
        print(f"facert: error: {e}", file=sys.stderr)
        return 2
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
                    "Run it with `facert ask IMAGE QUESTION --engines DIR`. A recipe (engines/NAME.toml) "
                    "gives every option for one served model and backend; options given here override it.")
    p.add_argument("--recipe", help="build recipe, e.g. engines/facellm-1b-tensorrt-llm.toml")
    p.add_argument("--checkpoint", help="checkpoint directory (facert, llava-hf or InternVL3-hf)")
    p.add_argument("--backend", choices=BACKENDS, help="what the engines are for")
    p.add_argument("--out", help="engines folder to write, e.g. engines/demo")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="onnxruntime: fp32 (default). tensorrt: fp32/fp16/bf16/fp8 (Q/DQ graphs). tensorrt-llm: "
                        "fp32/fp16/bf16, int8/int4 weight-only (W8A16/W4A16), fp8 (ModelOpt-calibrated). The GPU "
                        "backends default to bf16 (fp16 before sm_80)")
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
    p.set_defaults(func=cmd_build)

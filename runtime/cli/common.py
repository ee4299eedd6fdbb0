"""What every subcommand shares: messages, the demo's inputs and the sampling options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_IMAGE = ASSETS / "astronaut.png"
DEMO_QUESTION = "Describe this person's face: hair, expression and any accessories."


def err(msg: str) -> int:
    """Say what is wrong on stderr; the exit code of a refused command."""
    print(f"facert: error: {msg}", file=sys.stderr)
    return 2


def progress(msg: str) -> None:
    print(f"[facert] {msg}", file=sys.stderr, flush=True)


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, for reproducible answers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for the in-process runtime (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="run the checkpoint in this dtype (default: as stored; bf16 is the GPU fast path's)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, decode eagerly instead of through compiled CUDA graphs")


def sampling(args):
    from runtime.generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed).validate()

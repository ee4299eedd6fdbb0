"""`facert`: one command; this package registers every subcommand.

  facert init | ask                     runtime/cli/ask.py     checkpoints, in-process or remote answers
  facert repo | serve                   runtime/cli/serve.py   the Triton model repository and server
  facert eval verify|mcq|attributes     runtime/cli/eval.py    the seeds' evaluation protocols
  facert bench ...                      runtime/cli/bench.py   the benchmarks (source checkout)
  facert build | demo | serve-demo      export/cli.py          engines, and the main job that builds them

The runtime's own subcommands are imported here. Those that build engines live with export (which
builds on runtime, never the reverse) and join through the `facert.commands` entry points
(pyproject.toml): each entry point is a `register(subparsers)` function.
"""

from __future__ import annotations

import argparse
import os
import sys

from runtime.cli import ask, bench, eval, serve
from runtime.cli.common import DEMO_IMAGE, DEMO_QUESTION, err

__all__ = ["DEMO_IMAGE", "DEMO_QUESTION", "build_parser", "main"]
ENTRY_POINTS = "facert.commands"


def _plugins():
    """`register` functions of the subcommands other packages add (export: build, demo, serve-demo)."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="facert",
        description="Run face-perception multimodal LLMs (FaceInsight, FaceLLM) in production.",
        epilog="Start with `facert demo`. Every subcommand has its own --help.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (ask.register, *_plugins(), serve.register, eval.register, bench.register):
        register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verify", None):
        os.environ["FACERT_VERIFY"] = args.verify  # for this process and what it starts (served steps)
    from runtime.checkpoint import CheckpointError
    from runtime.preprocess import ImageError
    from runtime.prompt import PromptError

    try:
        return args.func(args)
    except (CheckpointError, ImageError, PromptError, ValueError) as e:
        return err(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

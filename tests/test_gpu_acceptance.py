"""benchmarks/gpu_acceptance.py: what runs without a GPU. Its plan and arguments, the refusal on a
machine with no CUDA device, and its first two steps for real on the tiny model (checkpoint, then
the onnxruntime engines checked against torch); the TensorRT, TensorRT-LLM and serving steps need
a GPU host with NVIDIA's container."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_plan_and_arguments(capsys):
    ga = _module()
    assert ga.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(ga.STEPS)
    assert "--backend tensorrt-llm --precision bf16" in lines[3] and "--target native" in lines[4]
    assert "facellm-1b --layers 2" in lines[0]
    args = ga.parse_args(["--steps", "bench,checkpoint", "--model", "faceinsight-7b", "--layers", "1"])
    assert args.steps == ["checkpoint", "bench"]  # run in the pipeline's order
    with pytest.raises(SystemExit):
        ga.parse_args(["--steps", "checkpoint,deploy"])
    with pytest.raises(SystemExit):
        ga.parse_args(["--layers", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the no-GPU refusal cannot be shown")
def test_refuses_without_a_gpu(tmp_path, capsys):
    ga = _module()
    assert ga.main(["--work", str(tmp_path), "--out", str(tmp_path / "res")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_and_onnxruntime_steps_run_here(tmp_path):
    ga = _module()
    args = argparse.Namespace(model="tiny", layers=2, work=str(tmp_path), max_batch=2)
    ctx = {"new_tokens": 4, "out": tmp_path}
    assert ga.step_checkpoint(args, ctx)["ok"]
    res = ga.step_onnxruntime(args, ctx)
    assert res["ok"] and all(res["tokens_equal"]) and res["max_abs_diff"] <= 1e-3 * res["max_abs_logit"]

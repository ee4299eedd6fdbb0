"""The GPU suite's script runs end to end here on CPU with tiny specs (a smoke run, no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_on_cpu_writes_results(tmp_path):
    bench = _load()
    rc = bench.main(["--device", "cpu", "--models", "tiny,tiny-facellm", "--quick", "--vision-batches", "1,2",
                     "--decode-batches", "1,2", "--new-tokens", "6", "--repeat", "1", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [m["model"] for m in report["models"]] == ["tiny", "tiny-facellm"]
    for m in report["models"]:
        assert [d["batch"] for d in m["decode"]] == [1, 2]
        # facert's loop and transformers' generate agree on greedy tokens for the same weights
        assert all(d["greedy_tokens_equal"] == d["of"] for d in m["decode"])
        assert m["ttft"]["facert_ms"] > 0 and m["vision"][1]["images_per_s"] > 0
    assert "| decode batch |" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so():
    assert _load().main(["--models", "tiny"]) == 2

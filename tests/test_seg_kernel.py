"""Tests for kernels/seg_projection.py (fused seg-token projection kernel + its torch reference).

The Triton kernels run on CPU under ``TRITON_INTERPRET=1``.  That variable must be set before
triton is imported, and other test modules may import triton into this pytest process, so every
kernel run happens in a subprocess: this file re-invoked as ``python tests/test_seg_kernel.py
--worker GROUP`` with a clean environment, which runs one group of cases and prints JSON.  One
subprocess per group, cached for the module.

Tolerances (err = max|out - ref| / max|ref|, ref = the fp32 torch reference evaluated on the very
same weights, already rounded to the tested dtype):
    fp32 weights: 1e-4        fp16 weights: 1e-2        bf16 weights: 1e-2
(the kernel rounds the embedding and the hidden activation to the weights' dtype before each GEMM,
as the torch reference does in that dtype; observed ~4e-4 fp16, ~3e-3 bf16, ~4e-7 fp32).
Reference vs an independent naive F.one_hot + nn.Conv2d + MLP computation: 1e-5 (fp32).
ONNX Runtime vs torch reference: 1e-5 (fp32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import seg_projection as sp  # noqa: E402  (does not import triton)

TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
REF_TOL = 1e-5
ONNX_TOL = 1e-5
HAS_TRITON = importlib.util.find_spec("triton") is not None
SKIP_NO_TRITON = "triton is not installed (pip install 'facert[kernels]'); the kernel runs under TRITON_INTERPRET=1"

# --------------------------------------------------------------------------------------------
# Kernel cases (run in subprocesses).  H = W = grid * P; every map holds all C classes.
# --------------------------------------------------------------------------------------------
_C = dict(C=19, labels="uint8")
CASES = [
    # group "fused": impl="auto" on small widths -> the single fused kernel
    dict(id="fp32-b1-p8-g4-pool1", group="fused", B=1, P=8, grid=4, d_seg=32, d_llm=64, dtype="float32", pool=1, impl="auto", **_C),
    dict(id="fp32-b2-p4-g6-pool2", group="fused", B=2, P=4, grid=6, d_seg=40, d_llm=80, dtype="float32", pool=2, impl="auto", **_C),
    dict(id="fp32-b3-p14-g2-pool1", group="fused", B=3, P=14, grid=2, d_seg=24, d_llm=48, dtype="float32", pool=1, impl="auto", **_C),
    dict(id="fp32-b2-c5-int32labels", group="fused", B=2, P=4, grid=4, d_seg=24, d_llm=48, dtype="float32", pool=1, impl="auto", C=5, labels="int32"),
    dict(id="fp16-b2-p8-g4-pool2", group="fused", B=2, P=8, grid=4, d_seg=64, d_llm=96, dtype="float16", pool=2, impl="auto", **_C),
    dict(id="fp16-b1-p14-g2-pool1", group="fused", B=1, P=14, grid=2, d_seg=40, d_llm=80, dtype="float16", pool=1, impl="auto", **_C),
    dict(id="bf16-b3-p4-g6-pool3", group="fused", B=3, P=4, grid=6, d_seg=40, d_llm=80, dtype="bfloat16", pool=3, impl="auto", **_C),
    dict(id="bf16-b1-p14-g2-pool2", group="fused", B=1, P=14, grid=2, d_seg=24, d_llm=48, dtype="bfloat16", pool=2, impl="auto", **_C),
    dict(id="bf16-b2-p8-g4-int64labels", group="fused", B=2, P=8, grid=4, d_seg=64, d_llm=96, dtype="bfloat16", pool=1, impl="auto", C=19, labels="int64"),
    # group "tiled": embed kernel + GEMM/GELU kernel + GEMM kernel
    dict(id="tiled-fp32-b2-p8-g4-pool1", group="tiled", B=2, P=8, grid=4, d_seg=40, d_llm=80, dtype="float32", pool=1, impl="tiled", **_C),
    dict(id="auto-wide-fp32-b3-dllm160-pool2", group="tiled", B=3, P=4, grid=6, d_seg=24, d_llm=160, dtype="float32", pool=2, impl="auto", **_C),
    dict(id="auto-wide-fp16-b1-dseg136", group="tiled", B=1, P=8, grid=2, d_seg=136, d_llm=48, dtype="float16", pool=1, impl="auto", **_C),
    dict(id="tiled-fp16-b3-p4-g6-pool2", group="tiled", B=3, P=4, grid=6, d_seg=64, d_llm=96, dtype="float16", pool=2, impl="tiled", **_C),
    dict(id="tiled-bf16-b1-p14-g2-pool1", group="tiled", B=1, P=14, grid=2, d_seg=24, d_llm=48, dtype="bfloat16", pool=1, impl="tiled", **_C),
    dict(id="tiled-bf16-b2-p8-g4-pool2", group="tiled", B=2, P=8, grid=4, d_seg=40, d_llm=80, dtype="bfloat16", pool=2, impl="tiled", **_C),
]
GROUPS = sorted({c["group"] for c in CASES})


def _make_inputs(c: dict, seed: int = 0):
    """Label map holding every class + weights (fp32 draws rounded to the case dtype)."""
    gen = torch.Generator().manual_seed(seed)
    B, P, g, C = c["B"], c["P"], c["grid"], c["C"]
    H = W = g * P
    labels = torch.randint(0, C, (B, H * W), generator=gen)
    for b in range(B):
        labels[b, torch.randperm(H * W, generator=gen)[:C]] = torch.arange(C)
    labels = labels.view(B, H, W).to(getattr(torch, c.get("labels", "uint8")))
    dtype = getattr(torch, c["dtype"])
    ds, dl = c["d_seg"], c["d_llm"]

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    weights = [
        r(ds, C, P, P, scale=0.3),  # patch_weight
        r(ds, scale=0.1),  # patch_bias
        r(g * g, ds, scale=0.5),  # pos_embed
        r(dl, ds, scale=ds ** -0.5),  # w1
        r(dl, scale=0.1),  # b1
        r(dl, dl, scale=dl ** -0.5),  # w2
        r(dl, scale=0.1),  # b2
    ]
    return labels, weights


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ----------------------------- worker side (runs in the subprocess) --------------------------
def _worker_case(c: dict) -> dict:
    labels, w = _make_inputs(c)
    out = sp.seg_tokens_triton(labels, *w, c["P"], c["pool"], impl=c["impl"])
    ref = sp.seg_tokens_reference(labels, *[t.float() for t in w], c["P"], c["pool"])
    return dict(
        err=_rel_err(out, ref), shape=list(out.shape), ref_shape=list(ref.shape),
        dtype=str(out.dtype).replace("torch.", ""), finite=bool(torch.isfinite(out.float()).all()),
    )


def _worker_misc() -> dict:
    """Weight re-layout cache, empty batch, non-contiguous weights, both plans on one input."""
    res = {}
    c = dict(B=2, P=4, grid=4, C=19, d_seg=24, d_llm=48, dtype="float32", pool=1)
    labels, w = _make_inputs(c, seed=1)
    sp.clear_weight_cache()
    s0 = dict(sp._WG_STATS)
    out1 = sp.seg_tokens_triton(labels, *w, 4)
    out2 = sp.seg_tokens_triton(labels, *w, 4, impl="tiled")
    s1 = dict(sp._WG_STATS)
    res["cache_misses_first_two_calls"] = s1["misses"] - s0["misses"]
    res["cache_hits_first_two_calls"] = s1["hits"] - s0["hits"]
    res["fused_vs_tiled_err"] = _rel_err(out1, out2.float())
    with torch.no_grad():
        w[0].mul_(-2.0).add_(0.05)  # in-place update: must invalidate the cached re-layout
    out3 = sp.seg_tokens_triton(labels, *w, 4)
    res["after_inplace_update_err"] = _rel_err(out3, sp.seg_tokens_reference(labels, *w, 4))
    res["after_inplace_update_misses"] = sp._WG_STATS["misses"] - s1["misses"]
    # non-contiguous (transposed-view) Linear weights and a strided pos table
    w1 = w[3].t().contiguous().t()
    w2 = w[5].t().contiguous().t()
    pos = torch.cat([w[2], w[2]], dim=1)[:, : c["d_seg"]]
    ref = sp.seg_tokens_reference(labels, w[0], w[1], pos, w1, w[4], w2, w[6], 4)
    for impl in ("fused", "tiled"):
        out = sp.seg_tokens_triton(labels, w[0], w[1], pos, w1, w[4], w2, w[6], 4, impl=impl)
        res[f"noncontig_{impl}_err"] = _rel_err(out, ref)
    # empty batch
    empty = sp.seg_tokens_triton(labels[:0], *w, 4, 2)
    res["empty_shape"] = list(empty.shape)
    # check_values=False: out-of-range labels add nothing, exactly like their all-zero one-hot rows
    bad = labels.clone()
    bad[0, :3, :5] = 19
    bad[1, 5:9, 2:7] = 255
    bad64 = labels.long()
    bad64[1, 0, :9] = -1
    bad64[0, 9, 3:] = 40
    for name, lab in (("uint8", bad), ("int64", bad64)):
        ref = sp.seg_tokens_reference(lab, *w, 4)
        for impl in ("fused", "tiled"):
            out = sp.seg_tokens_triton(lab, *w, 4, impl=impl, check_values=False)
            res[f"unchecked_{name}_{impl}_err"] = _rel_err(out, ref)
    return res


def _worker(group: str) -> dict:
    if group == "misc":
        return _worker_misc()
    return {c["id"]: _worker_case(c) for c in CASES if c["group"] == group}


# ----------------------------- pytest side ---------------------------------------------------
def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


_RESULTS: dict = {}


def _group_results(group: str) -> dict:
    if group not in _RESULTS:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", group],
            env=_clean_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600, cwd=str(REPO),
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"kernel worker for group {group!r} failed (rc {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        _RESULTS[group] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RESULTS[group]


def _run_snippet(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(**env), capture_output=True, text=True,
        timeout=300, cwd=str(REPO),
    )


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=SKIP_NO_TRITON)

@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_matches_reference(case):
    r = _group_results(case["group"])[case["id"]]
    gp = case["grid"] // case["pool"]
    assert r["shape"] == [case["B"], gp * gp, case["d_llm"]] == r["ref_shape"]
    assert r["dtype"] == case["dtype"]
    assert r["finite"]
    tol = TOL[case["dtype"]]
    assert r["err"] <= tol, f"{case['id']}: rel err {r['err']:.3g} > {tol:g} ({case['dtype']})"

@needs_triton
def test_kernel_misc_cache_strides_empty():
    r = _group_results("misc")
    # first call re-lays the conv weight out, the second (other plan) reuses it
    assert r["cache_misses_first_two_calls"] == 1 and r["cache_hits_first_two_calls"] == 1, r
    assert r["fused_vs_tiled_err"] <= TOL["float32"], r
    # an in-place weight update bumps the version counter -> re-layout, correct result
    assert r["after_inplace_update_misses"] == 1, r
    assert r["after_inplace_update_err"] <= TOL["float32"], r
    assert r["noncontig_fused_err"] <= TOL["float32"], r
    assert r["noncontig_tiled_err"] <= TOL["float32"], r
    assert r["empty_shape"] == [0, 4, 48], r
    for name in ("uint8", "int64"):
        for impl in ("fused", "tiled"):
            assert r[f"unchecked_{name}_{impl}_err"] <= TOL["float32"], r

@needs_triton
def test_triton_entry_needs_cuda_or_interpreter():
    code = (
        "import sys, torch\n"
        "from kernels import seg_projection as sp\n"
        "assert 'triton' not in sys.modules, 'importing the module must not import triton'\n"
        "lab = torch.zeros(1, 8, 8, dtype=torch.uint8)\n"
        "w = [torch.randn(4, 19, 4, 4), torch.randn(4), torch.randn(4, 4), torch.randn(16, 4), torch.randn(16), torch.randn(16, 16), torch.randn(16)]\n"
        "try:\n"
        "    sp.seg_tokens_triton(lab, *w, 4)\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
        "out = sp.seg_tokens(lab, *w, 4)  # CPU -> reference\n"
        "assert torch.equal(out, sp.seg_tokens_reference(lab, *w, 4))\n"
    )
    proc = _run_snippet(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeError:" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stdout

def test_triton_missing_gives_clear_error():
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None  # make `import triton` fail\n"
        "from kernels import seg_projection as sp\n"
        "lab = torch.zeros(1, 8, 8, dtype=torch.uint8)\n"
        "w = [torch.randn(4, 19, 4, 4), torch.randn(4), torch.randn(4, 4), torch.randn(16, 4), torch.randn(16), torch.randn(16, 16), torch.randn(16)]\n"
        "assert not sp.triton_available()\n"
        "try:\n"
        "    sp.seg_tokens_triton(lab, *w, 4)\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
        "out = sp.seg_tokens(lab, *w, 4)\n"
        "assert torch.equal(out, sp.seg_tokens_reference(lab, *w, 4))\n"
    )
    proc = _run_snippet(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeError:" in proc.stdout and "`triton` package" in proc.stdout, proc.stdout

# ------------------------- reference / validation (in-process, no triton) ----------------
def _naive(labels, pw, pb, pos, w1, b1, w2, b2, P, pool):
    """Independent formulation: F.one_hot + nn.Conv2d + reshape-mean pooling + nn.Sequential."""
    ds, C = pw.shape[0], pw.shape[1]
    conv = torch.nn.Conv2d(C, ds, P, stride=P)
    mlp = torch.nn.Sequential(torch.nn.Linear(ds, w1.shape[0]), torch.nn.GELU(), torch.nn.Linear(w1.shape[0], w1.shape[0]))
    with torch.no_grad():
        conv.weight.copy_(pw)
        conv.bias.copy_(pb)
        mlp[0].weight.copy_(w1)
        mlp[0].bias.copy_(b1)
        mlp[2].weight.copy_(w2)
        mlp[2].bias.copy_(b2)
        oh = F.one_hot(labels.long(), C).permute(0, 3, 1, 2).float()
        x = conv(oh)  # [B, D, gh, gw]
        B, D, gh, gw = x.shape
        x = x.permute(0, 2, 3, 1) + pos.view(gh, gw, D)  # [B, gh, gw, D]
        x = x.reshape(B, gh // pool, pool, gw // pool, pool, D).mean(dim=(2, 4))
        return mlp(x.reshape(B, -1, D))

@pytest.mark.parametrize(
    "B,P,grid,C,pool", [(1, 8, 4, 19, 1), (2, 4, 6, 19, 2), (3, 14, 2, 19, 1), (2, 4, 6, 7, 3), (1, 14, 4, 19, 2)]
)
def test_reference_matches_naive(B, P, grid, C, pool):
    c = dict(B=B, P=P, grid=grid, C=C, d_seg=24, d_llm=40, dtype="float32", pool=pool)
    labels, w = _make_inputs(c, seed=B * 100 + P)
    ref = sp.seg_tokens_reference(labels, *w, P, pool)
    naive = _naive(labels, *w, P, pool)
    assert ref.shape == naive.shape == (B, (grid // pool) ** 2, 40)
    assert _rel_err(ref, naive) <= REF_TOL

def test_seg_tokens_cpu_dispatches_to_reference():
    c = dict(B=2, P=4, grid=4, C=19, d_seg=24, d_llm=40, dtype="float32", pool=2)
    labels, w = _make_inputs(c)
    assert torch.equal(sp.seg_tokens(labels, *w, 4, 2), sp.seg_tokens_reference(labels, *w, 4, 2))

def test_reference_keeps_weight_dtype():
    c = dict(B=1, P=4, grid=2, C=19, d_seg=16, d_llm=16, dtype="bfloat16", pool=1)
    labels, w = _make_inputs(c)
    assert sp.seg_tokens_reference(labels, *w, 4).dtype == torch.bfloat16

def test_check_labels_messages():
    sp.check_labels(torch.zeros(1, 4, 4, dtype=torch.uint8), 19)
    sp.check_labels(torch.full((2, 4, 4), 18, dtype=torch.int64), 19)
    bad = torch.zeros(1, 4, 4, dtype=torch.uint8)
    bad[0, 1, 2] = 23
    with pytest.raises(ValueError, match=r"label map has values outside \[0, 19\): min 0, max 23"):
        sp.check_labels(bad, 19)
    neg = torch.zeros(1, 4, 4, dtype=torch.int32)
    neg[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"outside \[0, 19\): min -1, max 0"):
        sp.check_labels(neg, 19)
    with pytest.raises(ValueError, match="3 dims"):
        sp.check_labels(torch.zeros(4, 4, dtype=torch.uint8), 19)
    with pytest.raises(ValueError, match="3 dims"):
        sp.check_labels(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 19)
    with pytest.raises(ValueError, match="integer dtype"):
        sp.check_labels(torch.zeros(1, 4, 4), 19)
    with pytest.raises(ValueError, match="integer dtype"):
        sp.check_labels(torch.zeros(1, 4, 4, dtype=torch.bool), 19)

@pytest.mark.parametrize("entry", ["seg_tokens", "seg_tokens_triton"])
def test_wrappers_refuse_bad_labels_before_launch(entry, monkeypatch):
    def no_launch():
        raise AssertionError("validation must happen before any kernel is built or launched")

    monkeypatch.setattr(sp, "_kernels", no_launch)
    fn = getattr(sp, entry)
    c = dict(B=2, P=4, grid=2, C=19, d_seg=16, d_llm=16, dtype="float32", pool=1)
    labels, w = _make_inputs(c)
    bad = labels.clone()
    bad[1, 3, 3] = 23
    with pytest.raises(ValueError, match=r"outside \[0, 19\): min 0, max 23"):
        fn(bad, *w, 4)
    with pytest.raises(ValueError, match="3 dims"):
        fn(labels[0], *w, 4)
    with pytest.raises(ValueError, match="integer dtype"):
        fn(labels.float(), *w, 4)
    with pytest.raises(ValueError, match="not divisible by pool"):
        fn(labels, *w, 4, 3)
    with pytest.raises(ValueError, match="pos_embed"):
        fn(labels, w[0], w[1], w[2][:3], *w[3:], 4)
    with pytest.raises(ValueError, match="patch_size"):
        fn(labels, *w, 2)
    with pytest.raises(ValueError, match="one dtype"):
        fn(labels, *w[:3], w[3].half(), *w[4:], 4)

def test_reference_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    c = dict(B=2, P=4, grid=4, C=19, d_seg=24, d_llm=40, dtype="float32", pool=2)
    labels, w = _make_inputs(c)

    class SegBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterList([torch.nn.Parameter(t) for t in w])

        def forward(self, lab):
            return sp.seg_tokens_reference(lab, *self.params, 4, 2)

    m = SegBranch().eval()
    path = tmp_path / "seg.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m, (labels,), str(path), opset_version=17, dynamo=False,
            input_names=["labels"], output_names=["tokens"],
            dynamic_axes={"labels": {0: "batch"}, "tokens": {0: "batch"}},
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels3, _ = _make_inputs(dict(c, B=3), seed=5)
    got = torch.from_numpy(sess.run(None, {"labels": labels3.numpy()})[0])
    with torch.no_grad():
        want = m(labels3)
    assert got.shape == want.shape == (3, 4, 40)
    assert _rel_err(got, want) <= ONNX_TOL

# ------------------------- benchmark CLI (cheap; the benchmark itself needs a GPU) ----------
BENCH = REPO / "benchmarks" / "bench_seg_kernel.py"

def test_bench_help():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--batch-sizes", "--dtype", "--out-dir", "--no-compile"):
        assert flag in proc.stdout

@needs_triton
def test_bench_dry_run_writes_results(tmp_path):
    """The benchmark's own logic end to end on CPU (hidden --device cpu, TRITON_INTERPRET=1)."""
    out_dir = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--batch-sizes", "1", "2", "--grid", "2", "--patch-size", "4",
         "--d-seg", "24", "--d-llm", "40", "--pool", "2", "--copy-mib", "4", "--matmul-n", "128", "--no-compile",
         "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=300, env=_clean_env(TRITON_INTERPRET="1"), cwd=str(REPO),
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    res = json.loads((out_dir / "seg_kernel.json").read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        for variant in ("fused", "fused_nocheck", "torch"):
            assert r[variant]["match"], r
    for key in ("command", "machine", "versions", "floors"):
        assert key in res
    assert "| fused |" in (out_dir / "seg_kernel.md").read_text()


def test_bench_without_cuda_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--batch-sizes", "1"], capture_output=True, text=True, timeout=300,
        env=_clean_env(), cwd=str(REPO),
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "CUDA" in proc.stderr


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2])))
    else:
        print("usage: python tests/test_seg_kernel.py --worker {" + ",".join(GROUPS + ["misc"]) + "}", file=sys.stderr)
        sys.exit(2)

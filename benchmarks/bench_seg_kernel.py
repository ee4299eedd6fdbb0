#!/usr/bin/env python
"""Benchmark the fused seg-token projection kernel (kernels/seg_projection.py) on a CUDA GPU.

Compares, for the faceinsight-7b shapes (P=14, 24x24 patch grid, 19 classes, D_seg 1024,
D_llm 4096, bf16 weights) at several batch sizes:

  * ``fused``    -- seg_tokens_triton (the Triton kernels; autotuned on first use, excluded from timing)
  * ``fused_nocheck`` -- the same with check_values=False (no label min/max reduction + host sync)
  * ``torch``    -- seg_tokens_reference, eager (one-hot map + cuDNN conv + two cuBLAS GEMMs)
  * ``compiled`` -- torch.compile(seg_tokens_reference)

Each is timed with triton.testing.do_bench (CUDA events, median of many runs, L2 flushed between
runs).  The script also measures this machine's floors -- memory bandwidth (a large device-to-device
copy) and tensor-core rate (a large matmul in the same dtype) -- and reports each time against the
roofline floor max(bytes / bandwidth, flops / rate), where bytes are the minimal traffic (labels +
all weights + output tokens) and flops = 2 * M * (D_seg * D_llm + D_llm^2) for the MLP plus
B * H * W * D_seg gather adds for the embedding (M = output tokens).  Outputs are checked against
an fp32 reference on the same weights.

Results go to benchmarks/results/<date>-<gpu>/seg_kernel.{json,md} (or --out-dir).  Without CUDA
(or without triton) it prints why and exits with code 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_GPU = 2
VARIANTS = ("fused", "fused_nocheck", "torch", "compiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fused seg-token projection kernel vs torch eager vs torch.compile (CUDA only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="batch sizes to time")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weight dtype")
    p.add_argument("--patch-size", type=int, default=14, help="P (conv kernel = stride)")
    p.add_argument("--grid", type=int, default=24, help="patch grid side g (H = W = g * P)")
    p.add_argument("--classes", type=int, default=19, help="C, face-parsing classes")
    p.add_argument("--d-seg", type=int, default=1024, help="seg embedding width")
    p.add_argument("--d-llm", type=int, default=4096, help="LLM hidden width")
    p.add_argument("--pool", type=int, default=1, help="pool x pool token averaging")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=200, help="do_bench measurement time (ms)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--tol", type=float, default=2e-2,
                   help="max |out - ref| / max |ref| allowed vs the fp32 reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth-floor copy (MiB)")
    p.add_argument("--matmul-n", type=int, default=8192, help="n of the n^3 tensor-core-floor matmul")
    # Dry run of this script's own logic on CPU under TRITON_INTERPRET=1 (tiny shapes only; the
    # timings mean nothing there).  Used by the test suite.
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="results folder (default benchmarks/results/<date>-<gpu name>)")
    return p.parse_args(argv)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def main(argv=None) -> int:
    args = parse_args(argv)

    import os
    import time

    import torch

    dry_run = args.device == "cpu"
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("bench_seg_kernel: --device cpu is a dry run that needs TRITON_INTERPRET=1", file=sys.stderr)
            return EXIT_NO_GPU
    elif not torch.cuda.is_available():
        print("bench_seg_kernel: no CUDA device available (torch.cuda.is_available() is False); "
              "this benchmark needs an NVIDIA GPU.", file=sys.stderr)
        return EXIT_NO_GPU
    try:
        import triton
        import triton.testing
    except Exception as exc:  # pragma: no cover - GPU machines have triton
        print(f"bench_seg_kernel: triton is not importable ({exc!r}); the fused kernel needs it.", file=sys.stderr)
        return EXIT_NO_GPU

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from kernels import seg_projection as sp

    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    if dry_run:
        machine = dict(gpu="cpu-dry-run", capability="0.0", sm_count=0, gpu_memory_gib=0.0)
    else:
        props = torch.cuda.get_device_properties(dev)
        machine = dict(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    gpu = machine["gpu"]
    P, g, C, ds, dl, pool = args.patch_size, args.grid, args.classes, args.d_seg, args.d_llm, args.pool
    H = W = g * P

    def sync():
        if not dry_run:
            torch.cuda.synchronize()

    def bench(fn):
        """[median, p20, p80] in ms."""
        if not dry_run:
            ms = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
            return [float(v) for v in ms]
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return [ts[1], ts[0], ts[2]]

    # ---------------- machine floors ----------------
    n_copy = args.copy_mib << 20  # bytes each way
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))[0]
    bw = 2 * n_copy / (copy_ms * 1e-3)  # bytes/s (read + write)
    del src, dst
    mm = args.matmul_n
    a = torch.randn(mm, mm, device=dev, dtype=dtype)
    b = torch.randn(mm, mm, device=dev, dtype=dtype)
    mm_ms = bench(lambda: a @ b)[0]
    rate = 2 * mm ** 3 / (mm_ms * 1e-3)  # flop/s
    del a, b
    if not dry_run:
        torch.cuda.empty_cache()

    # ---------------- weights ----------------
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

    weights = [
        r(ds, C, P, P, scale=0.05), r(ds, scale=0.02), r(g * g, ds, scale=0.5),
        r(dl, ds, scale=ds ** -0.5), r(dl, scale=0.02), r(dl, dl, scale=dl ** -0.5), r(dl, scale=0.02),
    ]
    weights_f32 = [w.float() for w in weights]
    weight_bytes = sum(w.numel() * es for w in weights)

    compiled = None
    compile_error = None
    if not args.no_compile:
        try:
            compiled = torch.compile(sp.seg_tokens_reference, dynamic=False)
        except Exception as exc:  # pragma: no cover
            compile_error = repr(exc)

    rows = []
    for B in args.batch_sizes:
        labels = torch.randint(0, C, (B, H, W), generator=gen, dtype=torch.uint8).to(dev)
        n_out = (g // pool) ** 2
        M = B * n_out
        bytes_min = labels.numel() + weight_bytes + M * dl * es
        flops = 2 * M * (ds * dl + dl * dl) + B * H * W * ds
        floor_s = max(bytes_min / bw, flops / rate)

        ref = _fp32_reference(torch, sp, labels, weights_f32, P, pool)
        row = dict(batch=B, tokens=M, bytes_min=bytes_min, flops=flops,
                   floor_ms=floor_s * 1e3, floor_bound="memory" if bytes_min / bw >= flops / rate else "compute")
        variants = {
            "fused": lambda: sp.seg_tokens_triton(labels, *weights, P, pool),
            # without the label range check (its min/max reduction + host sync)
            "fused_nocheck": lambda: sp.seg_tokens_triton(labels, *weights, P, pool, check_values=False),
            "torch": lambda: sp.seg_tokens_reference(labels, *weights, P, pool),
        }
        if compiled is not None:
            variants["compiled"] = lambda: compiled(labels, *weights, P, pool)
        for name, fn in variants.items():
            try:
                out = fn()  # first call: autotune / compile, outside the timing
                sync()
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                med, p20, p80 = bench(fn)
                row[name] = dict(
                    ms=med, ms_p20=p20, ms_p80=p80, max_rel_err=err, match=err <= args.tol,
                    roofline_fraction=floor_s * 1e3 / med,  # 1.0 = at the floor
                    tflops=flops / (med * 1e-3) / 1e12, gbps=bytes_min / (med * 1e-3) / 1e9,
                )
            except Exception as exc:  # record and keep going (e.g. compile failure)
                row[name] = dict(error=repr(exc))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del labels, ref
        if not dry_run:
            torch.cuda.empty_cache()

    result = dict(
        benchmark="seg_kernel",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        machine=dict(
            **machine, host=socket.gethostname(), platform=platform.platform(), python=platform.python_version(),
        ),
        versions=dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__),
        shapes=dict(patch_size=P, grid=g, H=H, W=W, classes=C, d_seg=ds, d_llm=dl, pool=pool, dtype=args.dtype),
        floors=dict(copy_bandwidth_gbps=bw / 1e9, matmul_tflops=rate / 1e12, matmul_n=mm, copy_bytes=n_copy),
        autotune=sp.autotune_report(),
        compile_error=compile_error,
        tolerance=args.tol,
        rows=rows,
    )

    out_dir = args.out_dir or (REPO / "benchmarks" / "results" / f"{_dt.date.today().isoformat()}-{_slug(gpu)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "seg_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "seg_kernel.md").write_text(_markdown(result))
    print(f"wrote {out_dir / 'seg_kernel.json'} and seg_kernel.md")
    bad = [(r["batch"], k) for r in rows for k in VARIANTS
           if k in r and ("error" in r[k] or not r[k]["match"])]
    if any(k.startswith("fused") for _, k in bad):
        print(f"fused kernel failed or mismatched: {bad}", file=sys.stderr)
        return 1
    return 0


def _fp32_reference(torch, sp, labels, weights_f32, P, pool):
    """fp32 reference with TF32 off (cuDNN would use TF32 for the fp32 conv by default)."""
    try:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    except Exception:  # a torch that refuses the legacy TF32 switches: keep its defaults
        return sp.seg_tokens_reference(labels, *weights_f32, P, pool)
    try:
        return sp.seg_tokens_reference(labels, *weights_f32, P, pool)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _markdown(res: dict) -> str:
    m, v, s, f = res["machine"], res["versions"], res["shapes"], res["floors"]
    lines = [
        "# Seg-token projection kernel benchmark",
        "",
        f"- command: `{res['command']}`",
        f"- date: {res['date']}",
        f"- machine: {m['gpu']} (sm_{m['capability'].replace('.', '')}, {m['sm_count']} SMs, "
        f"{m['gpu_memory_gib']} GiB), {m['platform']}, Python {m['python']}",
        f"- versions: torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}",
        f"- shapes: P={s['patch_size']}, grid {s['grid']}x{s['grid']} (H=W={s['H']}), C={s['classes']}, "
        f"D_seg={s['d_seg']}, D_llm={s['d_llm']}, pool={s['pool']}, weights {s['dtype']}",
        f"- floors measured here: copy {f['copy_bandwidth_gbps']:.0f} GB/s, "
        f"{s['dtype']} matmul ({f['matmul_n']}^3) {f['matmul_tflops']:.0f} TFLOP/s",
        f"- roofline fraction = max(bytes/bw, flops/rate) / measured time (1.0 = at the floor); "
        f"outputs checked vs fp32 reference, tol {res['tolerance']:g} (max-abs / max-ref)",
        "",
        "| batch | tokens | floor ms (bound) | variant | median ms | p20-p80 ms | TFLOP/s | roofline frac | max rel err | ok |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        for name in VARIANTS:
            if name not in r:
                continue
            d = r[name]
            head = f"| {r['batch']} | {r['tokens']} | {r['floor_ms']:.3f} ({r['floor_bound']}) | {name} "
            if "error" in d:
                lines.append(head + f"| error: {d['error'][:80]} | | | | | no |")
            else:
                lines.append(
                    head + f"| {d['ms']:.3f} | {d['ms_p20']:.3f}-{d['ms_p80']:.3f} | {d['tflops']:.1f} | "
                    f"{d['roofline_fraction']:.2f} | {d['max_rel_err']:.2e} | {'yes' if d['match'] else 'NO'} |"
                )
    if res.get("compile_error"):
        lines += ["", f"torch.compile failed: `{res['compile_error']}`"]
    if res.get("autotune"):
        lines += ["", "## Autotuned configs", "", "```", json.dumps(res["autotune"], indent=2), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Fused segmentation-token projection: uint8 face-parsing label map -> LLM-width seg tokens.

The FaceInsight seg-token branch is

    one_hot(labels, C) --Conv2d(C, D_seg, P, stride=P)--> [B, D_seg, g, g] --flatten--> + pos_embed
        --(optional pool x pool average)--> Linear(D_seg, D_llm) --GELU(erf)--> Linear(D_llm, D_llm)

This file holds, Liger-Kernel style, everything about it:

* ``seg_tokens_reference`` -- the plain-torch definition (traceable, exported to ONNX opset 17);
* ``check_labels`` -- validation of a label map (kept out of the reference so it stays traceable);
* the ``@triton.jit`` kernels and their thin launcher ``seg_tokens_triton``;
* ``seg_tokens`` -- validate, then run the Triton kernel on CUDA, the reference elsewhere.

Kernel design.  A one-hot patch embedding is a gather-sum: token n's embedding is
``sum_p Wg[label(p), p_y, p_x, :]`` over the P x P pixels p of its patch, where ``Wg`` is the conv
weight re-laid out as ``[C * P * P, D_seg]`` (done once per weight tensor in the launcher and
cached).  The one-hot map is never materialised.  Bias and the positional rows are added in fp32;
pooling gathers over the (pool * P)^2 pixel block and pool^2 positional rows and divides by pool^2.

Two launch plans:

* ``fused`` (both widths, padded to powers of two, <= 128; e.g. the tiny test models): a single
  kernel per block of tokens -- gather-sum embedding, Linear 1, GELU and Linear 2 with the
  embedding and the hidden activation kept in registers.  One launch, nothing but the labels and
  weights read, nothing but the tokens written.
* ``tiled`` (wide models, e.g. faceinsight-7b: D_seg 1024, D_llm 4096): (1) the gather-sum
  embedding kernel writes x [M, D_seg]; (2) a tiled tensor-core GEMM with fused bias + GELU epilogue
  writes h [M, D_llm]; (3) the same GEMM kernel with bias only writes the tokens.  Fusing the
  gather into GEMM 1's prologue would redo the (bandwidth-heavy) gather once per D_llm tile (32x at
  D_llm 4096), and fusing GEMM 2 would redo GEMM 1 once per output tile, so at these widths the
  round trips of x and h through HBM (a few % of the weight/compute floor) are the cheaper choice.

All accumulation is fp32; the embedding and hidden activations are rounded to the weights' dtype
before each GEMM, as the reference does.  fp32 weights use IEEE fp32 dots (no TF32), so fp32 output
matches the reference to ~1e-6.  A label outside [0, C) adds nothing to its patch -- exactly what
its all-zero one-hot row does in the reference -- so the gather can never read out of bounds even
when the range check is skipped (``check_values=False``).

Triton is imported lazily, on the first kernel call, so importing this module (and the reference)
works where Triton is not installed, and ``TRITON_INTERPRET=1`` is honoured if it is set any time
before that first call.  Under the interpreter (CPU tensors) every autotune space collapses to one
config, bf16 dots are done in fp32 (the interpreter's bf16 ``tl.dot`` is wrong) and fp32 -> bf16
casts are rounded to nearest-even by hand (the interpreter's cast truncates); neither workaround is
compiled into the GPU kernels.

Status: correctness is tested on CPU under the interpreter (tests/test_seg_kernel.py); every
autotune config was also compiled ahead of time for sm_90 with triton 3.6 and 3.9 (no register
spills with the usual JIT specialisations), but timings need a GPU: benchmarks/bench_seg_kernel.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
from collections import OrderedDict

import torch
import torch.nn.functional as F

__all__ = [
    "check_labels",
    "seg_tokens_reference",
    "seg_tokens",
    "seg_tokens_triton",
    "triton_available",
    "clear_weight_cache",
    "autotune_report",
    "FUSED_MAX_WIDTH",
]

# Both (power-of-two padded) widths must be at most this for the single-kernel plan.
FUSED_MAX_WIDTH = 128

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Reference (plain torch; traced into ONNX -- keep it free of data-dependent control flow)
# --------------------------------------------------------------------------------------------
def seg_tokens_reference(
    labels: torch.Tensor,
    patch_weight: torch.Tensor,
    patch_bias: torch.Tensor,
    pos_embed: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    patch_size: int,
    pool: int = 1,
) -> torch.Tensor:
    """Seg tokens [B, N', D_llm] from a label map [B, H, W] (values in [0, C)); unvalidated.

    ``patch_weight`` [D_seg, C, P, P] is a Conv2d weight over the one-hot map, ``pos_embed``
    [g_h * g_w, D_seg], ``w1`` [D_llm, D_seg] / ``w2`` [D_llm, D_llm] in nn.Linear layout.  With
    ``pool > 1`` neighbouring pool x pool tokens are averaged (N' = g_h * g_w / pool^2, row-major).
    Output dtype is the weights' dtype.
    """
    num_classes = patch_weight.shape[1]
    classes = torch.arange(num_classes, device=labels.device)
    # Comparison form (not F.one_hot) so the graph exports to ONNX as Equal + Cast.
    one_hot = (labels.long()[:, None] == classes[None, :, None, None]).to(patch_weight.dtype)
    x = F.conv2d(one_hot, patch_weight, patch_bias, stride=patch_size)  # [B, D_seg, gh, gw]
    gh, gw = x.shape[-2], x.shape[-1]
    x = x.flatten(2).transpose(1, 2) + pos_embed  # [B, gh*gw, D_seg]
    if pool > 1:
        x = x.transpose(1, 2).unflatten(2, (gh, gw))  # [B, D_seg, gh, gw]
        x = F.avg_pool2d(x, pool)
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw/pool^2, D_seg]
    h = F.gelu(F.linear(x, w1, b1))
    return F.linear(h, w2, b2)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_label_meta(labels: torch.Tensor, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"label map must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 3:
        raise ValueError(
            f"label map must be [B, H, W] (3 dims), got {labels.ndim} dims with shape {tuple(labels.shape)}"
        )
    if not _is_integer_dtype(labels.dtype):
        raise ValueError(f"label map must be uint8 (or another integer dtype), got {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless ``labels`` is an integer [B, H, W] map with values in [0, C)."""
    _check_label_meta(labels, num_classes)
    if labels.numel() == 0:
        return
    lo, hi = torch.aminmax(labels)
    lo, hi = int(lo), int(hi)  # one device sync, before any launch
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"label map has values outside [0, {num_classes}): min {lo}, max {hi}")


def _check_inputs(labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, patch_size, pool, check_values=True):
    """Validate everything the kernel relies on; returns the derived sizes."""
    tensors = dict(
        patch_weight=patch_weight, patch_bias=patch_bias, pos_embed=pos_embed, w1=w1, b1=b1, w2=w2, b2=b2
    )
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ValueError(f"patch_weight must be [D_seg, C, P, P], got {tuple(patch_weight.shape)}")
    d_seg, num_classes, p = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    if int(patch_size) != p:
        raise ValueError(f"patch_size={patch_size} but patch_weight has {p}x{p} kernels")
    pool = int(pool)
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    if check_values:
        check_labels(labels, num_classes)
    else:  # shape/dtype only: no device sync (e.g. under CUDA-graph capture)
        _check_label_meta(labels, num_classes)
    _, h, w = labels.shape
    if h % p or w % p:
        raise ValueError(f"label map {h}x{w} is not a multiple of patch_size {p}")
    gh, gw = h // p, w // p
    if gh % pool or gw % pool:
        raise ValueError(f"patch grid {gh}x{gw} is not divisible by pool {pool}")
    if tuple(patch_bias.shape) != (d_seg,):
        raise ValueError(f"patch_bias must be [{d_seg}], got {tuple(patch_bias.shape)}")
    if tuple(pos_embed.shape) != (gh * gw, d_seg):
        raise ValueError(f"pos_embed must be [{gh * gw}, {d_seg}] for a {h}x{w} map, got {tuple(pos_embed.shape)}")
    if w1.ndim != 2 or w1.shape[1] != d_seg:
        raise ValueError(f"w1 must be [D_llm, {d_seg}], got {tuple(w1.shape)}")
    d_llm = w1.shape[0]
    if tuple(b1.shape) != (d_llm,) or tuple(w2.shape) != (d_llm, d_llm) or tuple(b2.shape) != (d_llm,):
        raise ValueError(
            f"expected b1 [{d_llm}], w2 [{d_llm}, {d_llm}], b2 [{d_llm}]; got "
            f"{tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}"
        )
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"all weights must share one dtype, got { {k: str(t.dtype) for k, t in tensors.items()} }")
    devices = {t.device for t in tensors.values()} | {labels.device}
    if len(devices) != 1:
        raise ValueError(f"labels and weights must be on one device, got {sorted(str(d) for d in devices)}")
    return types.SimpleNamespace(
        B=labels.shape[0], H=h, W=w, P=p, C=num_classes, gh=gh, gw=gw, pool=pool, d_seg=d_seg, d_llm=d_llm
    )


# --------------------------------------------------------------------------------------------
# Triton kernels (built lazily)
# --------------------------------------------------------------------------------------------
triton = None  # set by _kernels()
_cast = None  # jitted helpers, set by _build_kernels()
_gather_embed = None
tl = None  # set by _kernels(); the jitted kernels resolve ``tl`` through this module's globals

_BUILD_LOCK = threading.Lock()
_KERNELS = None
_IMPORT_ERROR = None


def triton_available() -> bool:
    """True if Triton imports (does import it, so set TRITON_INTERPRET beforehand if wanted)."""
    try:
        _kernels()
    except RuntimeError:
        return False
    return True


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels():
    global _KERNELS, _IMPORT_ERROR, triton, tl
    if _KERNELS is not None:
        return _KERNELS
    with _BUILD_LOCK:
        if _KERNELS is not None:
            return _KERNELS
        if _IMPORT_ERROR is None:
            try:
                import triton as _triton
                import triton.language as _tl
            except Exception as exc:  # ImportError, or a broken install
                _IMPORT_ERROR = exc
        if _IMPORT_ERROR is not None:
            raise RuntimeError(
                "seg_tokens_triton needs the `triton` package (pip install 'facert[kernels]' / "
                f"pip install triton); importing it failed: {_IMPORT_ERROR!r}"
            ) from _IMPORT_ERROR
        triton, tl = _triton, _tl
        _KERNELS = _build_kernels(interpret=_interpret_env())
        return _KERNELS


def _build_kernels(interpret: bool):
    """Define the jitted kernels (needs the module globals ``triton`` and ``tl`` set)."""
    global _cast, _gather_embed
    Config = triton.Config

    @triton.jit
    def _cast(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
        # fp32 -> dtype.  RNE_BF16 (interpreter only): round to nearest even by hand first, since
        # the interpreter's fp32 -> bf16 cast truncates; the GPU cast is already RTNE.
        if RNE_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _gather_embed(
        lab_ptr, wg_ptr, pbias_ptr, pos_ptr, offs_m, m_mask, offs_d, d_mask,
        D_SEG, NO, GWO, GW, H, W, NUM_CLASSES,
        P: tl.constexpr, POOL: tl.constexpr, PB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # fp32 [BLOCK_M, BLOCK_D]: for each token m (row-major over the pooled grid of image b),
        # mean over its POOL x POOL patches of conv(one_hot) + bias + pos, as a gather-sum of
        # Wg[label * P*P + (y % P) * P + (x % P), :] over the token's PB x PB pixels (PB = POOL*P).
        b = offs_m // NO
        t = offs_m % NO
        ty = t // GWO
        tx = t % GWO
        lab_ptrs = lab_ptr + (b.to(tl.int64) * H * W + (ty * PB).to(tl.int64) * W + tx * PB)
        wg_cols = wg_ptr + offs_d[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # One flat loop over the pixels; the next pixel's labels are loaded before this pixel's
        # weight rows, so the label load is off the gather's dependency chain.
        lab = tl.load(lab_ptrs, mask=m_mask, other=0).to(tl.int32)
        for i in range(PB * PB):
            dy = i // PB
            dx = i - dy * PB
            j = tl.minimum(i + 1, PB * PB - 1)
            jy = j // PB
            nxt = tl.load(lab_ptrs + jy * W + (j - jy * PB), mask=m_mask, other=0).to(tl.int32)
            # a label outside [0, C) one-hot encodes to zeros in the reference: add nothing
            ok = m_mask & (lab >= 0) & (lab < NUM_CLASSES)
            row = lab * (P * P) + (dy % P) * P + (dx % P)
            wrow = tl.load(wg_cols + row[:, None] * D_SEG, mask=ok[:, None] & d_mask[None, :], other=0.0)
            acc += wrow.to(tl.float32)
            lab = nxt
        md_mask = m_mask[:, None] & d_mask[None, :]
        for py in tl.static_range(POOL):
            for px in tl.static_range(POOL):
                prow = (ty * POOL + py) * GW + tx * POOL + px
                pos = tl.load(pos_ptr + prow[:, None] * D_SEG + offs_d[None, :], mask=md_mask, other=0.0)
                acc += pos.to(tl.float32)
        bias = tl.load(pbias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        return acc * (1.0 / (POOL * POOL)) + bias[None, :]
    if interpret:
        # One config each: autotuning several needs GPU timing; big blocks keep the
        # interpreter's per-program overhead down.
        embed_cfgs = [Config({"BLOCK_M": 64, "BLOCK_D": 64}, num_warps=4)]
        linear_cfgs = [Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
        fused_cfgs = [Config({"BLOCK_M": 64}, num_warps=4)]
    else:
        embed_cfgs = [
            Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
            for bm, bd, nw, ns in [
                (32, 128, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (64, 128, 8, 3),
                (128, 64, 8, 2), (128, 128, 8, 2), (32, 256, 8, 2), (64, 256, 8, 2),
            ]
        ]
        linear_cfgs = [
            Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
            for bm, bn, bk, ns, nw in [
                (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 32, 4, 4),
                (64, 256, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4),
                (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2), (16, 64, 64, 4, 4),
            ]
        ]
        fused_cfgs = [
            Config({"BLOCK_M": bm}, num_warps=nw, num_stages=ns)
            for bm, nw, ns in [(16, 4, 2), (32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2)]
        ]

    @triton.autotune(configs=embed_cfgs, key=["M", "D_SEG", "PB"])
    @triton.jit
    def seg_embed_kernel(
        lab_ptr, wg_ptr, pbias_ptr, pos_ptr, x_ptr,
        M, D_SEG, NO, GWO, GW, H, W, NUM_CLASSES, stride_xm,
        P: tl.constexpr, POOL: tl.constexpr, PB: tl.constexpr, RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_mask = offs_m < M
        d_mask = offs_d < D_SEG
        x = _gather_embed(
            lab_ptr, wg_ptr, pbias_ptr, pos_ptr, offs_m, m_mask, offs_d, d_mask,
            D_SEG, NO, GWO, GW, H, W, NUM_CLASSES, P, POOL, PB, BLOCK_M, BLOCK_D,
        )
        md_mask = m_mask[:, None] & d_mask[None, :]
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_d[None, :]
        tl.store(x_ptrs, _cast(x, x_ptr.dtype.element_ty, RNE_BF16), mask=md_mask)

    @triton.autotune(configs=linear_cfgs, key=["M", "N", "K"])
    @triton.jit
    def linear_kernel(
        a_ptr, w_ptr, bias_ptr, c_ptr,
        M, N, K,
        stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
        ACT: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # c = act(a @ w^T + bias); a [M, K], w [N, K] (nn.Linear layout); fp32 accumulation
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows/cols past the edge are wrapped for the loads and masked at the store.  32-bit
        # offsets (fewer registers) unless an operand has >= 2**31 elements (IDX64).
        offs_am = offs_m % M
        offs_wn = offs_n % N
        offs_cm = offs_m
        if IDX64:
            offs_am = offs_am.to(tl.int64)
            offs_wn = offs_wn.to(tl.int64)
            offs_cm = offs_cm.to(tl.int64)
        a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_wn[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        n_mask = offs_n < N
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
        if ACT == "gelu":
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, _cast(acc, c_ptr.dtype.element_ty, RNE_BF16), mask=(offs_m < M)[:, None] & n_mask[None, :])

    @triton.autotune(configs=fused_cfgs, key=["M", "D_SEG", "D_LLM"])
    @triton.jit
    def seg_fused_kernel(
        lab_ptr, wg_ptr, pbias_ptr, pos_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        M, D_SEG, D_LLM, NO, GWO, GW, H, W, NUM_CLASSES,
        stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_om,
        P: tl.constexpr, POOL: tl.constexpr, PB: tl.constexpr,
        DS_PAD: tl.constexpr, DL_PAD: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        # embed (gather-sum) -> Linear 1 -> GELU -> Linear 2, all on chip, for BLOCK_M tokens
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, DS_PAD)
        offs_n = tl.arange(0, DL_PAD)
        m_mask = offs_m < M
        k_mask = offs_k < D_SEG
        n_mask = offs_n < D_LLM
        emb = _gather_embed(
            lab_ptr, wg_ptr, pbias_ptr, pos_ptr, offs_m, m_mask, offs_k, k_mask,
            D_SEG, NO, GWO, GW, H, W, NUM_CLASSES, P, POOL, PB, BLOCK_M, DS_PAD,
        )
        x = _cast(emb, w1_ptr.dtype.element_ty, RNE_BF16)

        # Linear 1 + GELU: h = gelu(x @ w1^T + b1)   [BLOCK_M, DL_PAD]
        w1t = tl.load(
            w1_ptr + offs_n[None, :] * stride_w1n + offs_k[:, None] * stride_w1k,
            mask=k_mask[:, None] & n_mask[None, :], other=0.0,
        )
        if DOT_FP32:
            hacc = tl.dot(x.to(tl.float32), w1t.to(tl.float32), input_precision="ieee")
        else:
            hacc = tl.dot(x, w1t, out_dtype=tl.float32)
        b1v = tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        hacc = hacc + b1v[None, :]
        hacc = 0.5 * hacc * (1.0 + tl.math.erf(hacc * 0.7071067811865476))
        hid = _cast(hacc, w2_ptr.dtype.element_ty, RNE_BF16)

        # Linear 2: y = h @ w2^T + b2
        offs_j = tl.arange(0, DL_PAD)
        j_mask = offs_j < D_LLM
        w2t = tl.load(
            w2_ptr + offs_n[None, :] * stride_w2n + offs_j[:, None] * stride_w2k,
            mask=j_mask[:, None] & n_mask[None, :], other=0.0,
        )
        if DOT_FP32:
            yacc = tl.dot(hid.to(tl.float32), w2t.to(tl.float32), input_precision="ieee")
        else:
            yacc = tl.dot(hid, w2t, out_dtype=tl.float32)
        b2v = tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        yacc = yacc + b2v[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, _cast(yacc, out_ptr.dtype.element_ty, RNE_BF16), mask=m_mask[:, None] & n_mask[None, :])

    return types.SimpleNamespace(
        interpret=interpret, embed=seg_embed_kernel, linear=linear_kernel, fused=seg_fused_kernel
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
_WG_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_WG_CACHE_MAX = 4
_WG_LOCK = threading.Lock()
_WG_STATS = {"hits": 0, "misses": 0}


def _tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def _gather_weight(patch_weight: torch.Tensor) -> torch.Tensor:
    """Conv weight [D_seg, C, P, P] re-laid out as [C * P * P, D_seg], cached per weight tensor.

    Keyed on (data_ptr, version counter, shape, strides, dtype, device).  The entry holds a
    reference to the source tensor so its memory cannot be freed and reused by a different tensor
    while the entry exists (a stale hit); in-place updates bump the version and miss.
    """
    key = (
        patch_weight.data_ptr(), _tensor_version(patch_weight), tuple(patch_weight.shape),
        tuple(patch_weight.stride()), patch_weight.dtype, str(patch_weight.device),
    )
    with _WG_LOCK:
        hit = _WG_CACHE.get(key)
        if hit is not None:
            _WG_CACHE.move_to_end(key)
            _WG_STATS["hits"] += 1
            return hit[1]
    d_seg = patch_weight.shape[0]
    wg = patch_weight.detach().permute(1, 2, 3, 0).contiguous().view(-1, d_seg)
    with _WG_LOCK:
        _WG_STATS["misses"] += 1
        _WG_CACHE[key] = (patch_weight, wg)
        while len(_WG_CACHE) > _WG_CACHE_MAX:
            _WG_CACHE.popitem(last=False)
    return wg


def clear_weight_cache() -> None:
    """Drop the cached re-laid-out conv weights."""
    with _WG_LOCK:
        _WG_CACHE.clear()


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def autotune_report() -> dict:
    """The configs the autotuner picked so far, per kernel (empty before the first launch)."""
    if _KERNELS is None:
        return {}
    out = {}
    for name in ("embed", "linear", "fused"):
        kern = getattr(_KERNELS, name)
        cache = getattr(kern, "cache", {}) or {}
        out[name] = {str(k): str(v) for k, v in cache.items()}
    return out


def seg_tokens_triton(
    labels: torch.Tensor,
    patch_weight: torch.Tensor,
    patch_bias: torch.Tensor,
    pos_embed: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    patch_size: int,
    pool: int = 1,
    *,
    impl: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """Validate, then always run the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    ``impl``: "auto" (single fused kernel when both padded widths are <= FUSED_MAX_WIDTH, else the
    three-kernel tiled plan), "fused" or "tiled" to force one.
    ``check_values=False`` skips the label range check (a min/max reduction plus a device sync),
    e.g. for labels straight from the parser's argmax or under CUDA-graph capture; shapes and
    dtypes are still checked, and out-of-range labels then contribute nothing to their patch (as a
    zero one-hot row does in the reference) -- memory-safe, never an out-of-bounds gather.
    """
    if impl not in ("auto", "fused", "tiled"):
        raise ValueError(f"impl must be 'auto', 'fused' or 'tiled', got {impl!r}")
    s = _check_inputs(
        labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, patch_size, pool, check_values=check_values
    )
    return _launch(s, labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, impl)


def _launch(s, labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, impl):
    """Run the kernels on inputs already checked by ``_check_inputs`` (whose result is ``s``)."""
    dtype = patch_weight.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"seg_tokens_triton supports fp32/fp16/bf16 weights, got {dtype}")
    ds_pad = max(16, _next_pow2(s.d_seg))
    dl_pad = max(16, _next_pow2(s.d_llm))
    fits = ds_pad <= FUSED_MAX_WIDTH and dl_pad <= FUSED_MAX_WIDTH
    if impl == "fused" and not fits:
        raise ValueError(
            f"impl='fused' needs D_seg and D_llm <= {FUSED_MAX_WIDTH} (padded), got {s.d_seg}, {s.d_llm}"
        )
    use_fused = fits if impl == "auto" else impl == "fused"

    k = _kernels()  # RuntimeError naming triton if it is missing
    if labels.device.type != "cuda" and not k.interpret:
        raise RuntimeError(
            f"seg_tokens_triton got {labels.device.type} tensors: the Triton kernels need CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before triton is first imported"
        )

    gho, gwo = s.gh // s.pool, s.gw // s.pool
    n_out = gho * gwo
    m = s.B * n_out
    out = torch.empty(s.B, n_out, s.d_llm, device=labels.device, dtype=dtype)
    if m == 0:
        return out
    lab = labels.contiguous()
    wg = _gather_weight(patch_weight)
    pbias = patch_bias.detach().contiguous()
    pos = pos_embed.detach().contiguous()
    w1, b1, w2, b2 = w1.detach(), b1.detach().contiguous(), w2.detach(), b2.detach().contiguous()
    dot_fp32 = dtype == torch.float32 or (k.interpret and dtype == torch.bfloat16)
    rne_bf16 = k.interpret and dtype == torch.bfloat16
    pb = s.pool * s.P
    out2d = out.view(m, s.d_llm)

    with torch.cuda.device(labels.device) if labels.is_cuda else contextlib.nullcontext():
        if use_fused:
            k.fused[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
                lab, wg, pbias, pos, w1, b1, w2, b2, out2d,
                m, s.d_seg, s.d_llm, n_out, gwo, s.gw, s.H, s.W, s.C,
                w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), out2d.stride(0),
                P=s.P, POOL=s.pool, PB=pb, DS_PAD=ds_pad, DL_PAD=dl_pad, DOT_FP32=dot_fp32, RNE_BF16=rne_bf16,
            )
            return out
        x = torch.empty(m, s.d_seg, device=labels.device, dtype=dtype)
        k.embed[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(s.d_seg, meta["BLOCK_D"]))](
            lab, wg, pbias, pos, x,
            m, s.d_seg, n_out, gwo, s.gw, s.H, s.W, s.C, x.stride(0),
            P=s.P, POOL=s.pool, PB=pb, RNE_BF16=rne_bf16,
        )
        h = torch.empty(m, s.d_llm, device=labels.device, dtype=dtype)
        _linear(k, x, w1, b1, h, "gelu", dot_fp32, rne_bf16)
        _linear(k, h, w2, b2, out2d, "none", dot_fp32, rne_bf16)
    return out


def _linear(k, a, w, bias, c, act, dot_fp32, rne_bf16):
    m, kdim = a.shape
    n = w.shape[0]
    span = max((t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + 1 for t in (a, w, c))
    k.linear[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        a, w, bias, c, m, n, kdim,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        ACT=act, DOT_FP32=dot_fp32, RNE_BF16=rne_bf16, IDX64=span >= 2 ** 31,
    )


def seg_tokens(
    labels: torch.Tensor,
    patch_weight: torch.Tensor,
    patch_bias: torch.Tensor,
    pos_embed: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    patch_size: int,
    pool: int = 1,
) -> torch.Tensor:
    """Validated seg tokens: the fused Triton kernel on CUDA (fp32/fp16/bf16) when Triton is
    available, the torch reference otherwise (CPU, Triton missing, or autograd needed -- the
    kernel is inference-only)."""
    s = _check_inputs(labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, patch_size, pool)
    weights = (patch_weight, patch_bias, pos_embed, w1, b1, w2, b2)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in weights)
    if labels.is_cuda and not needs_grad and patch_weight.dtype in _SUPPORTED_DTYPES and triton_available():
        return _launch(s, labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, "auto")
    return seg_tokens_reference(labels, patch_weight, patch_bias, pos_embed, w1, b1, w2, b2, patch_size, pool)

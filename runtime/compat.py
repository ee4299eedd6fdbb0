"""The transformers versions facert runs on: 5.x, and 4.57 (what NVIDIA's TensorRT-LLM 1.x and its
Triton container pin). The few places their APIs differ are bridged here, in one place."""

from __future__ import annotations

import transformers

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def no_init_weights():
    """The context manager that skips weight initialisation (moved to transformers.initialization in 5)."""
    if TRANSFORMERS_MAJOR >= 5:
        from transformers.initialization import no_init_weights as ctx
    else:
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()


def rope_config_kwargs(theta: float, scaling: dict | None = None) -> dict:
    """A LLaMA/Qwen2 config's rotary keywords: `rope_parameters` in 5.x, `rope_theta` + `rope_scaling` in 4.x.

    `scaling` is {"rope_type": ..., "factor": ..., ...} or None for plain RoPE."""
    scaling = dict(scaling or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if TRANSFORMERS_MAJOR >= 5:
        return {"rope_parameters": {"rope_type": kind or "default", "rope_theta": float(theta), **scaling}}
    return {"rope_theta": float(theta), "rope_scaling": {"rope_type": kind, **scaling} if kind else None}


def rope_of(cfg) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict with "rope_type" or None) of a transformers config, either version."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        rope = dict(params)
        theta = rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    else:
        theta = getattr(cfg, "rope_theta", 10000.0)
        rope = dict(getattr(cfg, "rope_scaling", None) or {})
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    return float(theta), (None if kind == "default" else {"rope_type": kind, **rope})


def cache_max_length(cache) -> int:
    """A StaticCache's length: get_max_length() in 5.x, get_max_cache_shape() in 4.57."""
    if hasattr(cache, "get_max_length"):
        return int(cache.get_max_length())
    return int(cache.get_max_cache_shape())

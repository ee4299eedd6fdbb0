"""Fill a Triton model repository from the templates in model_repository/, and validate it.

`fill_repository(out, checkpoint=... | engines=..., target="portable"|"native")` renders one
folder per step (config.pbtxt from its jinja2 template, plus the step's 1/model.py) and the
family's ensemble (`faceinsight`, with the segmentation branch and attribute head, or `facellm`
without), then parses every config.pbtxt against Triton's ModelConfig protobuf (the one
tritonclient ships) and checks the ensemble's wiring against the step configs.

Targets:
- portable: every step is a python-backend model calling facert's runtime (torch components from
  a checkpoint, or ONNX Runtime / TensorRT components from an engines folder). Runs anywhere,
  including the CPU-only tritonserver from nvidia-pytriton.
- native: for NVIDIA's Triton containers on GPU hosts (runtime/serving/native.py). The image steps
  run the folder's TensorRT plans (or ONNX graphs) on the GPU as python models (a request's tiles
  are one [1, R, ...] tensor, which platform models cannot take from an ensemble), the LLM a
  `tensorrt_llm` model on the `tensorrtllm` backend when the folder was built with `--backend
  tensorrt-llm`; the `llm` step stays a python model that streams from it through BLS, so the
  ensemble and its inputs/outputs are the same as portable's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from runtime.preprocess import MAX_IMAGES

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = REPO_ROOT / "model_repository"
STEPS = ("preprocessing", "vision_encoder", "face_parser", "seg_projection", "attribute_head", "llm", "postprocessing")
SEG_BRANCH_STEPS = ("face_parser", "seg_projection", "attribute_head")
NUM_ATTRIBUTES = 40
TARGETS = ("portable", "native")
# Back-pressure defaults: a queue of 64 waiting requests per step (8 full batches at the default
# max_batch_size) and 60 s at most in any queue, unless the client sets its own timeout.
DEFAULT_MAX_QUEUE_SIZE = 64
DEFAULT_QUEUE_TIMEOUT_MS = 60_000
# The llm step's scheduler: in-flight batching over KV-cache slots (runtime/serving/scheduler.py), or
# static (each batch the dynamic batcher hands over runs to its end).
SCHEDULERS = ("inflight", "static")
# Positions per KV-cache slot (prompt + max_tokens must fit; capped at the model's context). Every
# decode step reads each generating slot's whole buffer, so a slot far longer than the answers
# served costs decode time: 1024 holds the demo's 290-token prompt and 700 new tokens.
DEFAULT_SLOT_TOKENS = 1024
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens prefilled per iteration: the most a running request waits for
DEFAULT_PREFIX_CACHE_MB = 256
DEFAULT_ENCODER_CACHE_MB = 64  # per image step


class RepositoryError(ValueError):
    """A model repository (or its source) that Triton would refuse, with the file and the reason."""


# ------------------------------------------------------------------------------------ validation

def parse_config(path: str | Path):
    """The ModelConfig protobuf in a config.pbtxt; RepositoryError naming the file and line if invalid."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except FileNotFoundError:
        raise RepositoryError(f"{path} does not exist") from None
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}:{e}") from None


def validate_repository(root: str | Path) -> dict:
    """Parse every model's config and check ensembles against their steps. Returns {name: ModelConfig}."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"{root} is not a directory")
    configs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        cfg = parse_config(d / "config.pbtxt")
        if cfg.name and cfg.name != d.name:
            raise RepositoryError(f"{d / 'config.pbtxt'}: name {cfg.name!r} differs from its folder {d.name!r}")
        versions = [v for v in d.iterdir() if v.is_dir() and v.name.isdigit()]
        if cfg.platform != "ensemble" and not versions:
            raise RepositoryError(f"{d}: no version folder (1/) with the model's files")
        if cfg.backend == "python" and not any((v / "model.py").exists() for v in versions):
            raise RepositoryError(f"{d}: python-backend model without 1/model.py")
        configs[d.name] = cfg
    if not configs:
        raise RepositoryError(f"{root} holds no models (no */config.pbtxt)")
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            _check_ensemble(name, cfg, configs)
    return configs


def _check_ensemble(name: str, cfg, configs: dict) -> None:
    for i, step in enumerate(cfg.ensemble_scheduling.step):
        if step.model_name not in configs:
            raise RepositoryError(f"ensemble {name}: step {i} runs {step.model_name!r}, which is not in the repository")
        model = configs[step.model_name]
        inputs = {t.name for t in model.input}
        outputs = {t.name for t in model.output}
        for key in step.input_map:
            if key not in inputs:
                raise RepositoryError(f"ensemble {name}: step {step.model_name!r} has no input {key!r} "
                                      f"(it has {sorted(inputs)})")
        for key in step.output_map:
            if key not in outputs:
                raise RepositoryError(f"ensemble {name}: step {step.model_name!r} has no output {key!r} "
                                      f"(it has {sorted(outputs)})")
        missing = [t.name for t in model.input if not t.optional and t.name not in step.input_map]
        if missing:
            raise RepositoryError(f"ensemble {name}: step {step.model_name!r} gets no value for its required "
                                  f"inputs {missing}")


def steps_made_ready(ensemble) -> list[tuple[str, list[str]]]:
    """The ensemble's schedule as Triton runs it, from its config: a step is ready once every tensor it
    maps in exists (the ensemble's inputs exist from the start, optional ones included, and a finished
    step's mapped outputs exist even when it did not produce them). Finishing ready steps one at a time,
    returns (finished step, the steps that finishing made ready), the first entry being ("", the steps
    ready from the inputs alone). A step made ready together with another is what Triton 2.51 can
    answer twice (see the ensemble template)."""
    steps = list(ensemble.ensemble_scheduling.step)
    have = {t.name for t in ensemble.input}
    scheduled: set[int] = set()

    def newly_ready() -> list[int]:
        ready = [i for i, s in enumerate(steps) if i not in scheduled and set(s.input_map.values()) <= have]
        scheduled.update(ready)
        return ready

    queue = newly_ready()
    order = [("", [steps[i].model_name for i in queue])]
    while queue:
        step = steps[queue.pop(0)]
        have.update(step.output_map.values())
        made = newly_ready()
        order.append((step.model_name, [steps[i].model_name for i in made]))
        queue.extend(made)
    return order


# ---------------------------------------------------------------------------------------- source

def describe_checkpoint(path: str | Path) -> dict:
    """Shapes the configs need, read from a checkpoint without loading its weights where possible."""
    import torch

    from runtime.checkpoint import detect_format, load_checkpoint

    path = Path(path).resolve()
    if detect_format(path) == "facert":
        from runtime.models.mllm import build_model

        config = json.loads((path / "config.json").read_text())
        with torch.device("meta"):  # shapes only: no memory, no weights read
            model = build_model(config)
    else:
        model, _, config = load_checkpoint(path)
    return _describe_model(model, config)


def _describe_model(model, config: dict) -> dict:
    spec = model.spec
    has_seg = model.num_seg_tokens > 0
    d = {"family": model.family, "spec_name": spec.get("spec", config.get("spec", "")), "spec": spec,
         "vocab_size": model.vocab_size, "has_seg": has_seg, "image_size": spec["image_size"],
         "num_image_tokens": model.num_image_tokens, "num_seg_tokens": model.num_seg_tokens,
         "llm_hidden": model.llm.config.hidden_size, "vision_hidden": model.vision_tower.config.hidden_size,
         "num_attributes": NUM_ATTRIBUTES,
         "model_card": {"random_parts": list(config.get("random_parts", [])),
                        "real_parts": dict(config.get("real_parts", {}))}}
    if has_seg:
        d["parser_size"] = spec["parser"]["input_size"]
        d["label_size"] = model.seg.label_size
    return d


def describe_engines(path: str | Path) -> dict:
    """Shapes the configs need, from an engines folder's manifest.json (written by `facert build`)."""
    manifest = _read_manifest(Path(path))
    spec, model, comps = manifest["spec"], manifest["model"], manifest["components"]

    def shape(component: str, side: str, index: int) -> list:
        return comps[component][side][index]["shape"]

    has_seg = model.get("num_seg_tokens", 0) > 0
    d = {"family": model["family"], "spec_name": spec.get("spec", ""), "spec": spec,
         "vocab_size": model["vocab_size"], "has_seg": has_seg,
         "image_size": spec["image_size"], "num_image_tokens": model["num_image_tokens"],
         "num_seg_tokens": model.get("num_seg_tokens", 0), "llm_hidden": model["llm"]["hidden_size"],
         "vision_hidden": shape("vision", "outputs", 1)[-1], "num_attributes": NUM_ATTRIBUTES,
         "model_card": {"random_parts": list(spec.get("random_parts", [])),
                        "real_parts": dict(spec.get("real_parts", {}))}}
    if has_seg:
        d["parser_size"] = shape("parser", "inputs", 0)[-1]
        d["label_size"] = shape("seg", "inputs", 0)[-1]
    return d


def _read_manifest(engines: Path) -> dict:
    from runtime.manifest import EngineError, read_manifest

    try:
        return read_manifest(engines)
    except EngineError as e:
        raise RepositoryError(str(e)) from None


# ------------------------------------------------------------------------------------------ fill

def _pbtxt_string(value) -> str:
    """A protobuf text-format string literal."""
    s = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=False, lstrip_blocks=False)
    env.filters["q"] = _pbtxt_string
    return env


def fill_repository(out: str | Path, checkpoint: str | Path | None = None, engines: str | Path | None = None,
                    backend: str = "onnxruntime", target: str = "portable", device: str | None = None,
                    max_batch_size: int = 8, queue_delay_us: int = 2000, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                    queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS, overwrite: bool = False,
                    max_images: int = MAX_IMAGES, scheduler: str = "inflight", kv_slots: int | None = None,
                    slot_tokens: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                    encoder_cache_mb: float = DEFAULT_ENCODER_CACHE_MB) -> dict:
    """Render the repository for one model into `out`; returns {model name: ModelConfig} after validation.

    Back-pressure: every step's queue holds at most `max_queue_size` waiting requests (one more is
    refused at once with UNAVAILABLE), and a request that waits in a queue longer than its own
    timeout (the client's `timeout`, else `queue_timeout_ms`; 0 = no default) is refused.

    The llm step's `scheduler`: "inflight" (default: `kv_slots` slots, default max_batch_size, of
    `slot_tokens` positions, default min(DEFAULT_SLOT_TOKENS, the model's context); `prefill_chunk`
    prompt tokens per iteration; a prefix cache of `prefix_cache_mb`) or "static". Every image step
    keeps an encoder cache of `encoder_cache_mb`. A cache of 0 MB is off.
    """
    if target not in TARGETS:
        raise RepositoryError(f"target must be one of {TARGETS}, got {target!r}")
    if (checkpoint is None) == (engines is None):
        raise RepositoryError("give exactly one source: a checkpoint directory or an engines folder")
    if not 1 <= max_batch_size <= 256:
        raise RepositoryError(f"max_batch_size must be in [1, 256], got {max_batch_size}")
    if not 1 <= max_queue_size <= 1_000_000:
        raise RepositoryError(f"max_queue_size must be in [1, 1000000], got {max_queue_size}")
    if not 1 <= max_images <= 64:
        raise RepositoryError(f"max_images must be in [1, 64], got {max_images}")
    if not 0 <= queue_timeout_ms <= 3_600_000:
        raise RepositoryError(f"queue_timeout_ms must be in [0, 3600000] (0: no default timeout), got {queue_timeout_ms}")
    if scheduler not in SCHEDULERS:
        raise RepositoryError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    kv_slots = max_batch_size if kv_slots is None else kv_slots
    if not 1 <= kv_slots <= 256:
        raise RepositoryError(f"kv_slots must be in [1, 256], got {kv_slots}")
    if prefill_chunk < 1:
        raise RepositoryError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
    for name, mb in (("prefix_cache_mb", prefix_cache_mb), ("encoder_cache_mb", encoder_cache_mb)):
        if not 0 <= mb <= 1_048_576:
            raise RepositoryError(f"{name} must be in [0, 1048576] (0: off), got {mb}")
    if target == "native" and engines is None:
        raise RepositoryError("the native target runs engine files: give --engines (built by `facert build`)")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RepositoryError(f"{out} exists and is not empty (--force replaces it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    if device is None:
        device = "cuda" if target == "native" else "cpu"
    if engines is not None:
        engines = Path(engines).resolve()
        info = describe_engines(engines)
        source = {"engines": str(engines), "backend": backend, "device": device}
    else:
        checkpoint = Path(checkpoint).resolve()
        info = describe_checkpoint(checkpoint)
        source = {"checkpoint": str(checkpoint), "device": device}

    source["max_images"] = str(max_images)  # preprocessing refuses requests with more
    llm_spec = info["spec"].get("llm")
    context = int(llm_spec.get("max_position_embeddings", 4096)) if isinstance(llm_spec, dict) else 4096
    slot_tokens = min(DEFAULT_SLOT_TOKENS, context) if slot_tokens is None else slot_tokens
    if not 2 <= slot_tokens <= context:
        raise RepositoryError(f"slot_tokens must be in [2, {context}] (the model's context), got {slot_tokens}")
    llm_parameters = {"scheduler": scheduler, "kv_slots": str(kv_slots), "slot_tokens": str(slot_tokens),
                      "prefill_chunk": str(prefill_chunk), "max_waiting": str(max_queue_size),
                      "prefix_cache_bytes": str(int(prefix_cache_mb * 2**20))}
    has_seg = info["has_seg"]
    upstream = ["PREPROCESS_MS", "VISION_MS"] + (["PARSER_MS", "SEG_MS", "ATTRIBUTES_MS"] if has_seg else [])
    ctx = dict(info, source=source, target=target, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
               max_queue_size=max_queue_size, queue_timeout_us=queue_timeout_ms * 1000,
               instance_kind="KIND_GPU" if device.startswith("cuda") else "KIND_CPU",
               ensemble_name=info["family"], upstream_timings=upstream, llm_parameters=llm_parameters,
               encoder_cache_bytes=str(int(encoder_cache_mb * 2**20)))
    steps = [s for s in STEPS if has_seg or s not in SEG_BRANCH_STEPS]
    env = _environment()

    if target == "native":
        from runtime.serving.native import render_native

        render_native(out, env, ctx, engines, _read_manifest(engines))
    for step in steps:
        (out / step / "1").mkdir(parents=True)
        (out / step / "config.pbtxt").write_text(env.get_template(f"{step}/config.pbtxt.j2").render(ctx))
        shutil.copy2(TEMPLATES / step / "1" / "model.py", out / step / "1" / "model.py")
    ens = out / ctx["ensemble_name"]
    ens.mkdir()
    (ens / "1").mkdir()  # Triton wants a version folder for ensembles too
    (ens / "config.pbtxt").write_text(env.get_template("ensemble/config.pbtxt.j2").render(ctx))
    return validate_repository(out)


def tensorrt_llm_world_size(repository: Path) -> int:
    """How many GPUs (ranks) the repository's tensorrt_llm model runs on: 1 without one, else the
    count of its gpu_device_ids (written from the engine's mapping by render_native)."""
    config = Path(repository) / "tensorrt_llm" / "config.pbtxt"
    if not config.is_file():
        return 1
    ids = parse_config(config).parameters.get("gpu_device_ids")
    return len([g for g in ids.string_value.split(",") if g.strip()]) if ids is not None and ids.string_value else 1

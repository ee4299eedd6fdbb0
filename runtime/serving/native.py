"""The native target: engine files served by Triton's own backends (NVIDIA's Triton containers, GPU).

From an engines folder (`facert build`):
- the vision encoder, face parser, seg projection and attribute head become `onnxruntime_onnx`
  (kind "onnx") or `tensorrt_plan` (kind "plan") models on their engine files, with the tensor
  names the manifest records;
- if the folder holds a TensorRT-LLM engine (`--backend tensorrt-llm`), a `tensorrt_llm` model on
  the `tensorrtllm` backend serves it with in-flight batching, and the `llm` step becomes a python
  model that streams from it through BLS (parameter llm_backend=tensorrtllm); otherwise the `llm`
  step runs the folder's own LLM graphs as in the portable target.
Preprocessing and postprocessing stay python models, so the ensemble's inputs and outputs are the
same as portable's. None of this runs on the CPU-only tritonserver here (it has only the python
backend); the configs are checked against the ModelConfig schema like every other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "uint8": "TYPE_UINT8",
          "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}
STEP_COMPONENTS = {"vision_encoder": "vision", "face_parser": "parser", "seg_projection": "seg",
                   "attribute_head": "attributes"}
# The ensemble tensors each engine's inputs/outputs carry, in the order the manifest lists them.
ROLES = {"vision_encoder": (["PIXEL_VALUES"], ["IMAGE_TOKENS", "POOLED"]),
         "face_parser": (["PARSER_PIXELS"], ["LABELS"]),
         "seg_projection": (["LABELS"], ["SEG_TOKENS"]),
         "attribute_head": (["POOLED"], ["ATTRIBUTE_PROBS"])}
STEP_TIMINGS = {"vision_encoder": "VISION_MS", "face_parser": "PARSER_MS", "seg_projection": "SEG_MS",
                "attribute_head": "ATTRIBUTES_MS"}
PROMPT_TABLE_TYPES = {"fp16": "TYPE_FP16", "bf16": "TYPE_BF16", "fp32": "TYPE_FP32", "fp8": "TYPE_FP16"}


def _tensors(entries: list[dict], where: str) -> list[dict]:
    from runtime.serving.repo import RepositoryError

    out = []
    for t in entries:
        if t["dtype"] not in DTYPES:
            raise RepositoryError(f"{where}: tensor {t['name']} has dtype {t['dtype']}, which Triton configs here do not map")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in t["shape"][1:]]  # the batch axis is implicit
        out.append({"name": t["name"], "data_type": DTYPES[t["dtype"]], "dims": dims})
    return out


def render_native(out: Path, env, ctx: dict, engines: Path, manifest: dict, steps: list[str]) -> set[str]:
    """Write the platform models and the tensorrt_llm model; returns the steps written here.

    Updates ctx: `io` (engine tensor names per step), `upstream_timings` (platform models report no
    timing tensor) and `llm_parameters`.
    """
    from runtime.serving.repo import RepositoryError

    components = manifest["components"]
    written: set[str] = set()
    for step in steps:
        name = STEP_COMPONENTS.get(step)
        entry = components.get(name) if name else None
        if entry is None or entry.get("kind") not in PLATFORMS:
            continue
        where = f"{engines / 'manifest.json'}: component {name}"
        inputs, outputs = _tensors(entry["inputs"], where), _tensors(entry["outputs"], where)
        roles_in, roles_out = ROLES[step]
        if len(inputs) != len(roles_in) or len(outputs) < len(roles_out):
            raise RepositoryError(f"{where} has {len(inputs)} inputs / {len(outputs)} outputs; the {step} step needs "
                                  f"{len(roles_in)} / {len(roles_out)}")
        ctx["io"][step] = {**ctx["io"][step], **dict(zip(roles_in, (t["name"] for t in inputs))),
                           **dict(zip(roles_out, (t["name"] for t in outputs)))}
        version = out / step / "1"
        version.mkdir(parents=True)
        for rel in [entry["file"], *entry.get("data_files", [])]:
            shutil.copy2(engines / rel, version / Path(rel).name)
        (out / step / "config.pbtxt").write_text(env.get_template("native/platform_model.pbtxt.j2").render(
            ctx, model_name=step, component=name, engines_dir=str(engines), platform=PLATFORMS[entry["kind"]],
            filename=Path(entry["file"]).name, inputs=inputs, outputs=outputs))
        written.add(step)
    ctx["upstream_timings"] = [t for t in ctx["upstream_timings"]
                               if t not in {STEP_TIMINGS[s] for s in written}]

    llm = components.get("llm")
    if llm is not None and llm.get("kind") == "tensorrt-llm-engine":
        engine_dir = (engines / llm["file"]).parent
        table_type = PROMPT_TABLE_TYPES.get(llm.get("precision", "fp16"), "TYPE_FP16")
        (out / "tensorrt_llm" / "1").mkdir(parents=True)  # the engine stays in the engines folder
        (out / "tensorrt_llm" / "config.pbtxt").write_text(env.get_template("native/tensorrt_llm.pbtxt.j2").render(
            ctx, llm_engines_dir=str(engine_dir), prompt_table_type=table_type))
        ctx["llm_parameters"] = {"llm_backend": "tensorrtllm", "tensorrt_llm_model": "tensorrt_llm",
                                 "prompt_table_type": table_type}
    return written

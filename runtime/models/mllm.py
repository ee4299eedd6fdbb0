"""The two model families, as plain modules you can read top to bottom.

FaceInsight (LLaVA-1.5 style): CLIP vision tower (second-to-last layer, CLS dropped) -> 2-layer GELU
MLP projector -> LLaMA; plus the BiSeNet face parser -> segmentation-token branch, and the
attribute head on the pooled vision features.

FaceLLM (InternVL3): InternViT (last layer, CLS dropped) -> pixel-unshuffle 0.5 -> LayerNorm-MLP
projector -> Qwen2.

Both expose the same small surface the pipeline and every backend use: `encode_image`,
`image_tokens`, `seg_tokens` (FaceInsight with trained seg weights only), `llm`, `vocab_size`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLConfig,
    InternVLVisionConfig,
    InternVLVisionModel,
)
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from runtime.models.attributes import AttributeHead
from runtime.models.bisenet import BiSeNet
from runtime.models.seg_branch import SegTokenBranch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (a 7B model built in fp32 would not fit in memory)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def llm_config(llm_spec: dict):
    kwargs = dict(llm_spec)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


class LlavaProjector(nn.Module):
    """Linear(D_vis, D) - GELU - Linear(D, D): names as in transformers' LlavaMultiModalProjector."""

    def __init__(self, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, llm_hidden)
        self.linear_2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class FaceInsight(nn.Module):
    family = "faceinsight"

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        vcfg = CLIPVisionConfig(**spec["vision"])
        vcfg._attn_implementation = "sdpa"
        self.vision_tower = CLIPVisionModel(vcfg)
        self.vision_feature_layer = spec.get("vision_feature_layer", -2)
        lcfg = llm_config(spec["llm"])
        self.projector = LlavaProjector(vcfg.hidden_size, lcfg.hidden_size)
        self.llm = AutoModelForCausalLM.from_config(lcfg)
        self.grid = vcfg.image_size // vcfg.patch_size
        # The face parser, seg branch and attribute head exist only where the checkpoint has weights
        # for them (facert's FaceInsight format); a llava-hf directory is plain LLaVA.
        self.parser = self.seg = self.attributes = None
        if "seg" in spec:
            p = spec["parser"]
            self.parser = BiSeNet(p["num_classes"], p["width"])
            s = spec["seg"]
            self.seg = SegTokenBranch(p["num_classes"], s["patch_size"], self.grid, s["hidden_size"],
                                      lcfg.hidden_size, s.get("pool", 1))
            self.attributes = AttributeHead(vcfg.hidden_size, spec["attributes"]["dim"])

    @property
    def vocab_size(self) -> int:
        return self.llm.config.vocab_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_seg_tokens(self) -> int:
        return self.seg.num_tokens if self.seg is not None else 0

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, grid*grid, D_vis]: the chosen layer's patch tokens, CLS dropped."""
        out = self.vision_tower(pixel_values=pixel_values.to(self.projector.linear_1.weight.dtype),
                                output_hidden_states=True)
        return out.hidden_states[self.vision_feature_layer][:, 1:]

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens in the LLM width [B, N, D] and pooled vision features [B, D_vis]."""
        feats = self.vision_features(pixel_values)
        return self.projector(feats), feats.mean(dim=1)

    def parse_face(self, parser_pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, P, P] ImageNet-normalised -> label map [B, grid*patch, grid*patch] uint8."""
        return self.parser.parse(parser_pixels.to(self.projector.linear_1.weight.dtype), self.seg.label_size)


def pixel_unshuffle(features: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """InternVL's downsampling: [B, W, H, C] -> [B, W*r, H*r, C/r^2] (same element order as HF)."""
    b, w, h, c = features.shape
    x = features.reshape(b, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(b, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3)


class FaceLLM(nn.Module):
    family = "facellm"

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        vcfg = InternVLVisionConfig(**spec["vision"])
        vcfg._attn_implementation = "sdpa"
        lcfg = llm_config(spec["llm"])
        self.downsample_ratio = spec.get("downsample_ratio", 0.5)
        self.vision_tower = InternVLVisionModel(vcfg)
        self.projector = InternVLMultiModalProjector(
            InternVLConfig(vision_config=vcfg.to_dict(), text_config=lcfg.to_dict(),
                           downsample_ratio=self.downsample_ratio))
        self.llm = AutoModelForCausalLM.from_config(lcfg)
        self.grid = vcfg.image_size[0] // vcfg.patch_size[0]

    @property
    def vocab_size(self) -> int:
        return self.llm.config.vocab_size

    @property
    def num_image_tokens(self) -> int:
        return int(self.grid * self.downsample_ratio) ** 2

    num_seg_tokens = 0

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.projector.linear_1.weight.dtype
        feats = self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state[:, 1:]
        b, n, c = feats.shape
        side = int(n ** 0.5)
        x = pixel_unshuffle(feats.reshape(b, side, side, c), self.downsample_ratio)
        return self.projector(x.reshape(b, -1, x.shape[-1])), feats.mean(dim=1)


def build_model(spec: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    cls = {"faceinsight": FaceInsight, "facellm": FaceLLM}[spec["family"]]
    with default_dtype(dtype):
        model = cls(spec)
    return model.eval()

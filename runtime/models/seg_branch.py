"""FaceInsight's segmentation-token branch: face label map -> LLM tokens.

label map [B, H, W] (H = W = grid * patch) -> one-hot patch embedding on the vision grid
(+ bias + position embedding) -> optional pool x pool average -> Linear - GELU - Linear into the
LLM width. The math lives in `kernels.seg_projection` beside the fused Triton kernel that replaces
it on CUDA; this module only owns the parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class SegTokenBranch(nn.Module):
    def __init__(self, num_classes: int, patch_size: int, grid: int, hidden_size: int,
                 llm_hidden_size: int, pool: int = 1):
        super().__init__()
        if grid % pool:
            raise ValueError(f"seg pool {pool} must divide the vision grid {grid}")
        self.num_classes, self.patch_size, self.grid, self.pool = num_classes, patch_size, grid, pool
        self.patch_weight = nn.Parameter(torch.empty(hidden_size, num_classes, patch_size, patch_size))
        self.patch_bias = nn.Parameter(torch.zeros(hidden_size))
        self.pos_embed = nn.Parameter(torch.empty(grid * grid, hidden_size))
        self.linear_1 = nn.Linear(hidden_size, llm_hidden_size)
        self.linear_2 = nn.Linear(llm_hidden_size, llm_hidden_size)
        nn.init.normal_(self.patch_weight, std=(num_classes * patch_size * patch_size) ** -0.5)
        nn.init.normal_(self.pos_embed, std=0.02)

    @property
    def label_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def num_tokens(self) -> int:
        return (self.grid // self.pool) ** 2

    def weights(self) -> tuple[torch.Tensor, ...]:
        return (self.patch_weight, self.patch_bias, self.pos_embed, self.linear_1.weight,
                self.linear_1.bias, self.linear_2.weight, self.linear_2.bias)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Validated; the fused kernel on CUDA, the torch reference elsewhere."""
        from kernels import seg_projection
        return seg_projection.seg_tokens(labels, *self.weights(), patch_size=self.patch_size, pool=self.pool)

    def reference(self, labels: torch.Tensor) -> torch.Tensor:
        """Plain torch ops only (what the ONNX export traces)."""
        from kernels import seg_projection
        return seg_projection.seg_tokens_reference(labels, *self.weights(), patch_size=self.patch_size,
                                                   pool=self.pool)

"""The torch backend: the model's own modules, the reference every other backend is checked
against, and the GPU fast path (bf16, static KV cache, CUDA-graph decode; runtime.generate.TorchLLM)."""

from __future__ import annotations

import torch

from runtime.backends.base import Components
from runtime.generate import TorchLLM


class TorchComponents(Components):
    """The torch backend: the model's own modules (runtime.backends.base.Components)."""

    backend = "torch"

    def __init__(self, model, device: str | torch.device = "cpu", cuda_graphs: bool | None = None):
        if torch.device(device).type != "meta":  # parts loaded on meta (not needed here) stay there
            for m in model.children():
                if next(m.parameters(), torch.empty(0)).device.type != "meta":
                    m.to(device)
        self.model = model.eval()
        self.device = torch.device(device)
        if cuda_graphs is None:  # the GPU fast path is the default wherever there is a GPU
            cuda_graphs = self.device.type == "cuda"
        self.spec = model.spec
        self.family = model.family
        self.vocab_size = model.vocab_size
        self.num_image_tokens = model.num_image_tokens
        self.num_seg_tokens = model.num_seg_tokens
        self.llm = TorchLLM(model.llm, cuda_graphs=cuda_graphs)

    def _t(self, x) -> torch.Tensor:
        return torch.as_tensor(x).to(self.device)

    @torch.inference_mode()
    def encode_image(self, pixel_values):
        return self.model.encode_image(self._t(pixel_values))

    @torch.inference_mode()
    def parse_face(self, parser_pixels):
        return self.model.parse_face(self._t(parser_pixels))

    @torch.inference_mode()
    def seg_tokens(self, labels):
        return self.model.seg(self._t(labels))

    @torch.inference_mode()
    def attributes(self, pooled):
        return self.model.attributes(self._t(pooled))

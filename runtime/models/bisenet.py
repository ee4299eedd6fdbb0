"""BiSeNet face parser, as in the widely used face-parsing.PyTorch (CelebAMask-HQ, 19 classes).

Module and parameter names match that project's `79999_iter.pth`, so the public checkpoint loads
with `torch.load(path, weights_only=True)` and `load_state_dict(strict=True)`. As in that
checkpoint, the spatial path is replaced by the ResNet's 1/8 features (res3b1): there is no
`sp.*` in the file. `width` scales every channel count (64 is the real model) so tests can use a
small parser with the same graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELEBAMASK_CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chan),
            )

    def forward(self, x):
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan, 1))


class Resnet18(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _layer(w, w, 1)
        self.layer2 = _layer(w, 2 * w, 2)
        self.layer3 = _layer(2 * w, 4 * w, 2)
        self.layer4 = _layer(4 * w, 8 * w, 2)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.resnet = Resnet18(w)
        self.arm16 = AttentionRefinementModule(4 * w, 2 * w)
        self.arm32 = AttentionRefinementModule(8 * w, 2 * w)
        self.conv_head32 = ConvBNReLU(2 * w, 2 * w)
        self.conv_head16 = ConvBNReLU(2 * w, 2 * w)
        self.conv_avg = ConvBNReLU(8 * w, 2 * w, ks=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        feat32_sum = self.arm32(feat32) + avg  # broadcasting == nearest upsampling of a 1x1 map
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, size=feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, size=feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Input: [B, 3, S, S] ImageNet-normalised RGB. Output: class logits [B, C, S, S].

    The auxiliary heads (`conv_out16`, `conv_out32`) exist so the public checkpoint loads
    strictly; inference uses the main head only.
    """

    def __init__(self, num_classes: int = 19, width: int = 64):
        super().__init__()
        w = width
        self.cp = ContextPath(w)
        self.ffm = FeatureFusionModule(4 * w, 4 * w)
        self.conv_out = BiSeNetOutput(4 * w, 4 * w, num_classes)
        self.conv_out16 = BiSeNetOutput(2 * w, w, num_classes)
        self.conv_out32 = BiSeNetOutput(2 * w, w, num_classes)

    def forward(self, x):
        feat_res8, feat_cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat_res8, feat_cp8))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def parse(self, x: torch.Tensor, out_size: int) -> torch.Tensor:
        """Label map [B, out_size, out_size] uint8: argmax over classes, resized nearest."""
        labels = self.forward(x).argmax(dim=1, keepdim=True).to(torch.float32)
        if labels.shape[-1] != out_size:
            labels = F.interpolate(labels, size=(out_size, out_size), mode="nearest")
        return labels[:, 0].to(torch.uint8)

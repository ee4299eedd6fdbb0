"""Facial-attribute head (FaceInsight's attribute alignment) and its logical-constraint step.

Scores the 40 CelebA attributes: pooled vision features are projected into the attribute space
and compared (cosine) with stored attribute query vectors. The queries are the attribute text
features refined by one graph-convolution step over an attribute co-occurrence graph, as in
FaceInsight; probabilities are `sigmoid(scale * cos + bias)`.

The constraint step then enforces a table of hard rules. Every rule says "at most one of these
attributes is present" (a pair is a group of two). Read probabilistically, mutually exclusive
events satisfy p(a) + p(b) <= 1, so when a rule is violated at the decision level (two or more
members >= 0.5) the most likely member is kept and every other member is lowered to
min(p, 1 - p_max), which is < 0.5. The step only ever lowers probabilities, so one pass over the
table satisfies every rule at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
ATTRIBUTE_INDEX = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}

# The hard rules: (name, members, why). "At most one member present."
CONSTRAINT_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("one_hair_colour", ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"),
     "hair has one dominant colour"),
    ("bald_no_black_hair", ("Bald", "Black_Hair"), "a bald head shows no hair colour"),
    ("bald_no_blond_hair", ("Bald", "Blond_Hair"), "a bald head shows no hair colour"),
    ("bald_no_brown_hair", ("Bald", "Brown_Hair"), "a bald head shows no hair colour"),
    ("bald_no_gray_hair", ("Bald", "Gray_Hair"), "a bald head shows no hair colour"),
    ("bald_no_bangs", ("Bald", "Bangs"), "bangs need hair"),
    ("bald_no_straight_hair", ("Bald", "Straight_Hair"), "hair texture needs hair"),
    ("bald_no_wavy_hair", ("Bald", "Wavy_Hair"), "hair texture needs hair"),
    ("straight_or_wavy", ("Straight_Hair", "Wavy_Hair"), "hair is straight or wavy, not both"),
    ("goatee_is_a_beard", ("Goatee", "No_Beard"), "a goatee is a beard"),
    ("sideburns_is_a_beard", ("Sideburns", "No_Beard"), "CelebA counts sideburns as beard"),
    ("stubble_is_a_beard", ("5_o_Clock_Shadow", "No_Beard"), "stubble is facial hair"),
)


@dataclass
class ConstraintResult:
    probs: torch.Tensor  # [B, 40] after the constraint step
    fired: list[list[str]]  # per image, the names of the rules that changed something


def apply_constraints(probs: torch.Tensor) -> ConstraintResult:
    """Enforce CONSTRAINT_TABLE on attribute probabilities [B, 40] (or [40])."""
    squeeze = probs.dim() == 1
    p = probs.detach().clone().reshape(-1, len(CELEBA_ATTRIBUTES)).float()
    fired: list[list[str]] = [[] for _ in range(p.shape[0])]
    for name, members, _why in CONSTRAINT_TABLE:
        idx = torch.tensor([ATTRIBUTE_INDEX[m] for m in members])
        group = p[:, idx]
        violated = (group >= 0.5).sum(dim=1) >= 2
        if not violated.any():
            continue
        top = group.argmax(dim=1)
        cap = 1.0 - group.max(dim=1).values
        for b in torch.nonzero(violated).flatten().tolist():
            for j in range(len(members)):
                if j != int(top[b]):
                    group[b, j] = torch.minimum(group[b, j], cap[b])
            fired[b].append(name)
        p[:, idx] = group
    out = p.to(probs.dtype)
    return ConstraintResult(out[0] if squeeze else out, fired)


def constraint_violations(probs: torch.Tensor) -> list[list[str]]:
    """Rules violated at the decision level (>= 0.5), per image."""
    p = probs.reshape(-1, len(CELEBA_ATTRIBUTES))
    out = []
    for row in p:
        out.append([name for name, members, _ in CONSTRAINT_TABLE
                    if int(sum(bool(row[ATTRIBUTE_INDEX[m]] >= 0.5) for m in members)) >= 2])
    return out


class AttributeHead(nn.Module):
    """Pooled vision features [B, D_vis] -> attribute probabilities [B, 40]."""

    def __init__(self, vision_dim: int, dim: int, num_attributes: int = len(CELEBA_ATTRIBUTES)):
        super().__init__()
        self.proj = nn.Linear(vision_dim, dim)
        self.text_features = nn.Parameter(torch.randn(num_attributes, dim) * dim ** -0.5)
        # Co-occurrence counts between attributes (symmetric); row-normalised with self loops below.
        self.register_buffer("cooccurrence", torch.zeros(num_attributes, num_attributes))
        self.gcn = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.zeros(num_attributes))

    def queries(self) -> torch.Tensor:
        adj = self.cooccurrence + torch.eye(self.cooccurrence.shape[0], dtype=self.cooccurrence.dtype,
                                            device=self.cooccurrence.device)
        adj = adj / adj.sum(dim=1, keepdim=True)
        return self.text_features + F.relu(self.gcn(adj.to(self.text_features.dtype) @ self.text_features))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.proj(pooled), dim=-1)
        q = F.normalize(self.queries(), dim=-1)
        return torch.sigmoid(self.logit_scale * f @ q.t() + self.logit_bias)

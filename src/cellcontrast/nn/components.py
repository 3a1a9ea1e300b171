"""Contrastive components h: they map the base embedding z to the embedding fed to the head.

Default widths (``hidden_dim=None`` / ``out_dim=None``): the paper's MLP-CL maps R^d -> R^d,
so both default to d, except when d is large (LR, where z is the preprocessed expression
with up to 2,000 genes): there hidden is capped at 256 and the output at 128, which keeps h
small enough to train in seconds and leaves the head a compact input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDE_INPUT = 256  # above this input width the default widths are capped
WIDE_HIDDEN = 256
WIDE_OUT = 128


def default_hidden_dim(in_dim: int) -> int:
    return in_dim if in_dim <= WIDE_INPUT else WIDE_HIDDEN


def default_out_dim(in_dim: int) -> int:
    return in_dim if in_dim <= WIDE_INPUT else WIDE_OUT


class MLPComponent(nn.Module):
    """MLP-CL: Linear -> ReLU -> Linear, output on the unit sphere."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        self.in_dim = int(in_dim)
        self.hidden_dim = int(hidden_dim) if hidden_dim else default_hidden_dim(self.in_dim)
        self.out_dim = int(out_dim) if out_dim else default_out_dim(self.in_dim)
        self.net = nn.Sequential(nn.Linear(self.in_dim, self.hidden_dim), nn.ReLU(),
                                 nn.Linear(self.hidden_dim, self.out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(z), dim=-1)

    def contrastive_features(self, z: torch.Tensor) -> torch.Tensor:
        """What ``supcon_loss`` takes: ``[B, out_dim]`` unit-norm."""
        return self.forward(z)

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim, "hidden_dim": self.hidden_dim, "out_dim": self.out_dim}


class MLSComponent(nn.Module):
    """MLS-CL: one 2-D unit-norm embedding per class, concatenated to a 2C vector.

    All C maps h_k are computed at once: a hidden layer shared by the classes (Linear + ReLU),
    then ONE Linear to 2C outputs reshaped to [B, C, 2], so column block k is class k's own
    output map. Sharing the hidden layer keeps parameters at d*hidden + hidden*2C instead of
    C separate networks (C*d*hidden, ~25M for LR with 50 classes), while each latent space
    still has its own projection and its own loss term.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int | None = None,
                 class_hidden_dim: int = 0):
        super().__init__()
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.hidden_dim = int(hidden_dim) if hidden_dim else default_hidden_dim(self.in_dim)
        self.class_hidden_dim = int(class_hidden_dim or 0)
        self.out_dim = 2 * self.n_classes
        # hidden_dim < 0: no hidden layer, each h_k is a linear map R^d -> R^2.
        if self.hidden_dim < 0:
            self.hidden = nn.Identity()
            width = self.in_dim
        else:
            self.hidden = nn.Sequential(nn.Linear(self.in_dim, self.hidden_dim), nn.ReLU())
            width = self.hidden_dim
        if self.class_hidden_dim:
            # Per-class branches h_k: hidden -> class_hidden (ReLU) -> 2, as stacked weights
            # applied with einsum (one batched op for all classes, no loop).
            m, c = self.class_hidden_dim, self.n_classes
            self.branch_w1 = nn.Parameter(torch.empty(c, width, m))
            self.branch_b1 = nn.Parameter(torch.zeros(c, m))
            self.branch_w2 = nn.Parameter(torch.empty(c, m, 2))
            self.branch_b2 = nn.Parameter(torch.zeros(c, 2))
            for w, fan_in in ((self.branch_w1, width), (self.branch_w2, m)):
                bound = 1.0 / fan_in**0.5  # nn.Linear's default scale
                nn.init.uniform_(w, -bound, bound)
            self.latent = None
        else:
            self.latent = nn.Linear(width, self.out_dim)

    def latent_spaces(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, 2]``: each class's embedding, normalised to the unit circle."""
        hidden = self.hidden(z)
        if self.latent is not None:
            per_class = self.latent(hidden).reshape(-1, self.n_classes, 2)
        else:
            inner = torch.relu(torch.einsum("bh,chm->bcm", hidden, self.branch_w1) + self.branch_b1)
            per_class = torch.einsum("bcm,cmo->bco", inner, self.branch_w2) + self.branch_b2
        return F.normalize(per_class, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent_spaces(z).reshape(-1, self.out_dim)

    def contrastive_features(self, z: torch.Tensor) -> torch.Tensor:
        """What ``mls_loss`` takes: ``[B, C, 2]``."""
        return self.latent_spaces(z)

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim, "n_classes": self.n_classes, "hidden_dim": self.hidden_dim,
                "class_hidden_dim": self.class_hidden_dim}


COMPONENTS: dict[str, type[nn.Module]] = {"mlp": MLPComponent, "mls": MLSComponent}

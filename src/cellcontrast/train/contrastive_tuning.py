"""The encoder fine-tuned for what stays the same across batches: cross-entropy plus a weighted
supervised contrastive term (paper eq. 1) while the base's classifier trains its encoder.

A frozen encoder caps what a component on top of it can learn (issue: the components lose to
their own base on the paper's settings). Here the contrastive term shapes the encoder itself:
the loss of each minibatch is ``CE(head(g(x)), y) + weight * L_supcon(p(g(x)), y)``, with ``p`` a
projection (Linear-ReLU-Linear onto the unit sphere, as MLP-CL) trained alongside and then
discarded, so the exported chain has the base's own graph (ONNX unchanged). Positives are the
cells of the anchor's type in the minibatch, or, given each cell's batch (``groups``, `fit
--batch-key`), only those from *other* batches: the encoder is pulled to map a type's cells
from different donors together. ``weight`` 0 is the base's plain recipe.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cellcontrast.nn.components import MLPComponent
from cellcontrast.nn.losses import supcon_loss
from cellcontrast.train.loops import EncoderHead


class ContrastiveTuned(nn.Module):
    """``head(encoder(x))`` for the classifier loop, keeping (in training) the code of the same
    forward pass so that `contrastive_loss` needs no second encoder pass."""

    def __init__(self, encoder: nn.Module, head: nn.Module, code_dim: int, train_y: np.ndarray, *,
                 weight: float, temperature: float, groups: np.ndarray | None = None):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.projection = MLPComponent(code_dim)
        self.weight, self.temperature = float(weight), float(temperature)
        self.y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
        cross = groups is not None and len(np.unique(groups)) >= 2
        self.groups = torch.as_tensor(np.unique(groups, return_inverse=True)[1]) if cross else None
        self.code: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encoder(x)
        if self.training:
            self.code = code
        return self.head(code)

    def contrastive_loss(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``weight`` x eq. 1 on the last training forward pass (the `train_classifier` hook)."""
        groups = None if self.groups is None else self.groups[index]
        return self.weight * supcon_loss(self.projection(self.code), self.y[index], self.temperature, groups)


def tuned_net(encoder: nn.Module, head: nn.Module, code_dim: int, train_y: np.ndarray, p: dict,
              groups: np.ndarray | None) -> tuple[nn.Module, object]:
    """The net the classifier loop trains and its ``extra_loss``: the plain encoder-head pair
    when ``p["contrastive_weight"]`` is 0, else a `ContrastiveTuned` (positives across
    ``groups`` when ``p["positives"]`` is "cross_batch")."""
    weight = float(p.get("contrastive_weight") or 0.0)
    if weight <= 0:
        return EncoderHead(encoder, head), None
    net = ContrastiveTuned(encoder, head, code_dim, train_y, weight=weight, temperature=p["contrastive_temperature"],
                           groups=groups if p.get("positives") == "cross_batch" else None)
    return net, net.contrastive_loss

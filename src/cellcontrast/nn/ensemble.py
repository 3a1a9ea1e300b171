"""An ensemble chain: the weighted mean of several calibrated chains' probabilities.

Chains that err differently (a linear base on every gene, a deep base on 2,000 HVGs) can be
averaged into a better annotator than either. Each member keeps its own preprocessing and
temperature; the weights are chosen on validation (`train.ensemble`). The module exports to
ONNX as one graph like any chain: probabilities, the weighted energy of the members, and the
``expression`` novelty score of the ensemble's predicted class.
"""

from __future__ import annotations

import torch
from torch import nn

from cellcontrast.nn.chain import ChainModule


class EnsembleModule(nn.Module):
    """``sum_m w_m softmax(logits_m / T_m)`` over the member chains (same genes, same classes)."""

    def __init__(self, members: list[ChainModule], weights):
        super().__init__()
        if len({m.n_genes for m in members}) != 1 or len({m.n_classes for m in members}) != 1:
            raise ValueError("ensemble members must share their genes and classes")
        self.members = nn.ModuleList(members)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", weights / weights.sum())
        # The members are calibrated each; the mixture gets no temperature of its own.
        self.register_buffer("temperature", torch.ones(()))
        # Every member's expression score was fitted on the same training cells; the first one's
        # is read with the ensemble's predicted class.
        self.novelty = members[0].novelty

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return sum(w * m(counts) for w, m in zip(self.weights, self.members, strict=True))

    def logits(self, counts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities: what `predict_logits` and the attribution read."""
        return torch.log(self(counts).clamp_min(1e-12))

    def energy(self, counts: torch.Tensor) -> torch.Tensor:
        """The members' energies ``-T logsumexp(logits / T)``, weighted."""
        parts = []
        for m in self.members:
            t = m.temperature
            parts.append(-t * torch.logsumexp(m.logits(counts) / t, dim=-1))
        return sum(w * e for w, e in zip(self.weights, parts, strict=True))

    def unexplained_expression(self, counts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.novelty(counts, logits.argmax(dim=-1))

    @property
    def n_genes(self) -> int:
        return self.members[0].n_genes

    @property
    def n_classes(self) -> int:
        return self.members[0].n_classes

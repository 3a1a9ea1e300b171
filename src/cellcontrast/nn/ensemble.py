"""An ensemble chain: the weighted mean of several calibrated chains' probabilities.

Chains that err differently (a linear base on every gene, a deep base on 2,000 HVGs) can be
averaged into a better annotator than either. Each member keeps its own preprocessing and
temperature; the weights are chosen on validation (`train.ensemble`). The module exports to
ONNX as one graph like any chain: probabilities, the weighted energy of the members, and the
``expression`` novelty score of the ensemble's predicted class.

The energy may be weighted differently from the probabilities (``energy_weights``): a chain
whose ``--flag-unseen`` energy comes from the LR beside it is this module with weights
``[1, 0]`` and energy weights ``[0, 1]`` (`model.ensemble.with_energy_of`). A member of weight
0 is not run for that output.

The last ``n_fold_members`` members, if any, are the fold models of that energy's source
(grouped validation): ``fold_energies`` gives a cell's energy under each, which `annotate`
reads against the energies of the cells each fold held out (`model.ensemble.with_fold_energies`).
"""

from __future__ import annotations

import torch
from torch import nn

from cellcontrast.nn.chain import ChainModule


class EnsembleModule(nn.Module):
    """``sum_m w_m softmax(logits_m / T_m)`` over the member chains (same genes, same classes)."""

    def __init__(self, members: list[ChainModule], weights, energy_weights=None, n_fold_members: int = 0):
        super().__init__()
        if len({m.n_genes for m in members}) != 1 or len({m.n_classes for m in members}) != 1:
            raise ValueError("ensemble members must share their genes and classes")
        self.members = nn.ModuleList(members)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", weights / weights.sum())
        energy_weights = weights if energy_weights is None else torch.as_tensor(energy_weights, dtype=torch.float32)
        self.register_buffer("energy_weights", energy_weights / energy_weights.sum())
        # which members each output runs (plain lists: known when the graph is traced)
        self._run = [i for i, w in enumerate(weights.tolist()) if w > 0]
        self._run_energy = [i for i, w in enumerate(self.energy_weights.tolist()) if w > 0]
        self._folds = list(range(len(members) - n_fold_members, len(members)))
        # The members are calibrated each; the mixture gets no temperature of its own (one
        # member alone: its own, with its logits).
        alone = members[self._run[0]].temperature.detach().clone() if len(self._run) == 1 else torch.ones(())
        self.register_buffer("temperature", alone)
        # Every member's expression score was fitted on the same training cells; the first one's
        # is read with the ensemble's predicted class.
        self.novelty = members[0].novelty

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[i] * self.members[i](counts) for i in self._run)

    def logits(self, counts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (one member alone: its logits): what `predict_logits` and the
        attribution read; ``softmax(logits / temperature)`` is the forward either way."""
        if len(self._run) == 1:
            return self.members[self._run[0]].logits(counts)
        return torch.log(self(counts).clamp_min(1e-12))

    def energy(self, counts: torch.Tensor) -> torch.Tensor:
        """The members' energies ``-T logsumexp(logits / T)``, weighted by ``energy_weights``."""
        parts = []
        for i in self._run_energy:
            t = self.members[i].temperature
            parts.append(self.energy_weights[i] * -t * torch.logsumexp(self.members[i].logits(counts) / t, dim=-1))
        return sum(parts)

    @property
    def n_fold_members(self) -> int:
        return len(self._folds)

    def fold_energies(self, counts: torch.Tensor) -> torch.Tensor:
        """``[batch, folds]``: each fold model's energy ``-T logsumexp(logits / T)``."""
        return torch.stack([-self.members[i].temperature
                            * torch.logsumexp(self.members[i].logits(counts) / self.members[i].temperature, dim=-1)
                            for i in self._folds], dim=-1)

    @property
    def weighted_members(self) -> list[ChainModule]:
        """The members the probabilities come from (weight above 0)."""
        return [self.members[i] for i in self._run]

    def unexplained_expression(self, counts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.novelty(counts, logits.argmax(dim=-1))

    @property
    def n_genes(self) -> int:
        return self.members[0].n_genes

    @property
    def n_classes(self) -> int:
        return self.members[0].n_classes

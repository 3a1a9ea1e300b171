"""How much of a cell's expression its predicted class does not explain: the ``expression``
novelty score, as a module that is saved and exported with the chain.

A cell of a type the reference lacks shows that type's own markers, genes no known class
expresses so highly; the head's logits (and the energy) only see the genes the known classes
use. For each cell the module takes its predicted class's training profile ``p`` (a share of
the library per gene), its expected counts ``mu = library x p``, and returns the largest
negative-binomial deviance

    2 [x log(x / mu) - (x + 1/phi) log((1 + phi x) / (1 + phi mu))]

over the genes it expresses above ``mu``, among the genes kept at fitting (detected in enough
training cells). What is learnt (profiles, dispersions, kept genes) is fitted on training cells
by ``train.open_set.fit_unexplained_expression`` and lives in buffers.
"""

from __future__ import annotations

import torch
from torch import nn


class UnexplainedExpression(nn.Module):
    """The largest deviance of an over-expressed gene against the predicted class's profile.

    ``profile`` ``[n_classes, n_kept]`` (shares of the library, every value > 0),
    ``dispersion`` ``[n_kept]``, and ``gene_index`` ``[n_kept]``: the kept genes' columns in the
    chain's input (sorted).
    """

    def __init__(self, n_genes: int, n_classes: int, n_kept: int):
        super().__init__()
        self.n_genes, self.n_classes, self.n_kept = int(n_genes), int(n_classes), int(n_kept)
        self.register_buffer("gene_index", torch.arange(self.n_kept, dtype=torch.long))
        self.register_buffer("profile", torch.full((self.n_classes, self.n_kept), 1.0 / max(1, self.n_genes)))
        self.register_buffer("dispersion", torch.ones(self.n_kept))

    def forward(self, counts: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The score ``[batch]`` of raw ``counts`` ``[batch, n_genes]`` given predicted ``classes``."""
        if self.n_kept == 0:
            return counts.new_zeros(counts.shape[0])
        library = counts.sum(dim=1, keepdim=True)
        x = torch.index_select(counts, 1, self.gene_index)
        mu = library * torch.index_select(self.profile, 0, classes)
        phi = self.dispersion
        # x log(x / mu) is 0 where x = 0; the other branch's NaN (0 / 0 in an empty cell) is not taken
        ratio_term = torch.where(x > 0, x * torch.log(x / mu), torch.zeros_like(x))
        deviance = 2.0 * (ratio_term - (x + 1.0 / phi) * torch.log((1.0 + phi * x) / (1.0 + phi * mu)))
        above = torch.where(x > mu, deviance, torch.zeros_like(deviance))
        return above.max(dim=1).values

    def get_config(self) -> dict:
        return {"n_genes": self.n_genes, "n_classes": self.n_classes, "n_kept": self.n_kept}

"""What a chain draws from each gene: the share of its predictions that a query lacking the
gene would lose, so that `annotate` can weigh a missing gene by what it costs.

For a cell ``x`` (raw counts) and its predicted class ``k``, the first-order change of the
logit ``z_k`` when gene ``g`` reads as zero is ``x_g * dz_k/dx_g`` (gradient times input);
the library-size normalisation is inside the chain, so a gene the base never selects still
counts through the cell's depth, only less. A gene's weight is the mean absolute change over
a seeded sample of reference cells, the weights summing to 1.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from cellcontrast.nn.chain import ChainModule

ATTRIBUTION_CELLS = 2000


def gene_weights(chain: ChainModule, counts, *, max_cells: int = ATTRIBUTION_CELLS, seed: int = 0,
                 batch_size: int = 256) -> np.ndarray:
    """Each input gene's share ``[n_genes]`` (sums to 1) of the chain's gradient-times-input on
    its predicted logit, averaged over at most ``max_cells`` cells of ``counts``."""
    n = counts.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, max_cells), replace=False))
    total = torch.zeros(chain.n_genes, dtype=torch.float64)
    was_training = chain.training
    chain.eval()
    try:
        for start in range(0, rows.size, batch_size):
            block = counts[rows[start:start + batch_size]]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            x = torch.as_tensor(block, dtype=torch.float32).requires_grad_(True)
            with torch.enable_grad():
                logits = chain.logits(x)
                picked = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                (grad,) = torch.autograd.grad(picked, x)
            total += (grad * x.detach()).abs().sum(0).double()
    finally:
        chain.train(was_training)
    weights = total.numpy()
    return weights / weights.sum() if weights.sum() > 0 else np.full(chain.n_genes, 1.0 / chain.n_genes)

"""Views of a cell made from its own counts, for training a component to ignore technical noise.

A new donor or batch differs from the reference partly in how it was sequenced: fewer reads per
cell, and genes that happen to be missed. Binomial thinning (each read kept with probability
p, drawn per cell from U(keep, 1)) is what a shallower sequencing of the same cell gives;
gene dropout zeroes a random share of its detected genes. Views go through the frozen encoder
like the cells themselves, and the contrastive loss treats a cell and its views as positives
(``view_positives="labels"``: with every cell of its type too; ``"self"``: only its own views).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def thinned_views(counts, n_views: int, keep: float, dropout: float, seed: int) -> list[sp.csr_matrix]:
    """``n_views`` noisy copies of the raw ``counts`` (cells x genes), seeded."""
    if not 0.0 < keep <= 1.0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"view_keep must be in (0, 1] and view_dropout in [0, 1); got {keep}, {dropout}")
    X = sp.csr_matrix(counts)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    reads = np.rint(X.data).astype(np.int64)
    views = []
    for v in range(n_views):
        rng = np.random.default_rng([seed, 7, v])
        p = rng.uniform(keep, 1.0, X.shape[0])[rows]
        data = rng.binomial(reads, p).astype(np.float32)
        data[rng.random(data.size) < dropout] = 0.0
        view = sp.csr_matrix((data, X.indices.copy(), X.indptr.copy()), shape=X.shape)
        view.eliminate_zeros()
        views.append(view)
    return views

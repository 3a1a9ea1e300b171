"""Each base model's preprocessing as a torch module, so that it exports to ONNX with the model.

Every module takes raw counts ``float32 [batch, n_genes]`` (dense, in the model's gene order)
and returns the model's input features. What is learnt from data (selected genes, means,
scales) lives in buffers, fitted on the TRAINING split only by the ``fit`` classmethods, so
that ``state_dict`` carries it and validation/test cells never influence it.

Constructors only allocate buffers of the right shape (``n_genes``, ``n_selected``); this is
what ``chain.load_chain`` uses to rebuild a module before loading its state_dict.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from cellcontrast.core.names import ALL_GENES

TARGET_SUM = 1e4


# ---------------------------------------------------------------- torch building blocks


def library_scale(counts: torch.Tensor, target_sum: float) -> torch.Tensor:
    """Per-cell factor ``[batch, 1]`` that scales each cell to ``target_sum`` counts.

    The clamp keeps it finite for empty cells: their counts are all 0, so
    0 * (large finite number) = 0 and no NaN can appear.
    """
    return target_sum / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------- numpy/scipy fitting helpers


def _as_csr(counts) -> sp.csr_matrix:
    if sp.issparse(counts):
        return sp.csr_matrix(counts, dtype=np.float64)
    return sp.csr_matrix(np.asarray(counts, dtype=np.float64))


def _normalized_csr(counts, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Library-size normalised counts (sparse, float64), empty cells left at zero."""
    x = _as_csr(counts)
    library = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    return sp.csr_matrix(sp.diags(scale) @ x)


def _gene_mean_var(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and population variance of a sparse matrix without densifying it."""
    mean = np.asarray(x.mean(axis=0)).ravel()
    mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    return mean, np.maximum(mean_sq - mean**2, 0.0)


def _log1p_csr(x: sp.csr_matrix, base: float | None = None) -> sp.csr_matrix:
    out = x.copy()
    out.data = np.log1p(out.data)
    if base is not None:
        out.data /= np.log(base)
    return out


class GeneMoments:
    """Per-gene sums over cells of library-normalised counts and of their log1p (and of the
    squares), added a chunk of raw counts at a time: what `LRPreprocess.from_moments` fits
    from, so that a reference read in chunks (`fit` on a backed file) is never held whole.
    Sums are float64 and exact to rounding: the fit equals `LRPreprocess.fit` on the same cells."""

    def __init__(self, n_genes: int, target_sum: float = TARGET_SUM):
        self.target_sum = float(target_sum)
        self.n_cells = 0
        self.sums = np.zeros((4, int(n_genes)))  # x, x^2, log1p(x), log1p(x)^2

    def add(self, counts, sign: int = 1) -> GeneMoments:
        """Add the cells of ``counts`` (csr or dense raw counts); ``sign=-1`` takes them out."""
        normalized = _normalized_csr(counts, self.target_sum)
        normalized.sum_duplicates()
        logged = _log1p_csr(normalized)
        for i, m in enumerate((normalized, normalized.multiply(normalized), logged, logged.multiply(logged))):
            self.sums[i] += sign * np.asarray(m.sum(axis=0)).ravel()
        self.n_cells += sign * normalized.shape[0]
        return self

    def mean_var(self, logged: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's mean and population variance (of log1p values with ``logged``)."""
        s, s2 = self.sums[2:] if logged else self.sums[:2]
        mean = s / max(self.n_cells, 1)
        return mean, np.maximum(s2 / max(self.n_cells, 1) - mean**2, 0.0)


def highly_variable_genes(normalized: sp.csr_matrix, n_top: int | str, n_bins: int = 20) -> np.ndarray:
    """Indices (sorted ascending) of the ``n_top`` most dispersed genes, Seurat flavour.

    Same recipe as ``scanpy.pp.highly_variable_genes(flavor='seurat')``: on library-normalised
    counts, dispersion = var / mean; log dispersion is z-scored within 20 bins of log1p(mean)
    so that highly expressed genes do not win by expression alone. Genes never expressed in
    the training cells rank last. Written here so that it runs on a sparse matrix directly;
    tests check that it agrees with scanpy.
    """
    return top_dispersed(dispersion_scores(normalized, n_bins), n_top)


def top_dispersed(score: np.ndarray, n_top: int | str) -> np.ndarray:
    """Indices (sorted) of the ``n_top`` highest dispersion scores; every gene for ``ALL_GENES``."""
    n_genes = score.shape[0]
    if n_top == ALL_GENES or n_top >= n_genes:
        return np.arange(n_genes)
    # Stable sort on the negated score: ties keep gene order, so the choice is reproducible.
    chosen = np.argsort(-score, kind="stable")[:n_top]
    return np.sort(chosen)


def dispersion_scores(normalized: sp.csr_matrix, n_bins: int = 20) -> np.ndarray:
    """Seurat's normalised dispersion per gene (-inf for genes without a defined one)."""
    return dispersion_scores_of(*_gene_mean_var(normalized), n_bins)


def dispersion_scores_of(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """`dispersion_scores` from each gene's mean and variance of library-normalised counts."""
    n_genes = mean.shape[0]
    expressed = mean > 0
    dispersion = np.full(n_genes, np.nan)
    dispersion[expressed] = var[expressed] / mean[expressed]
    log_dispersion = np.full(n_genes, np.nan)
    positive = expressed & (dispersion > 0)
    log_dispersion[positive] = np.log(dispersion[positive])
    log_mean = np.log1p(mean)

    score = np.full(n_genes, -np.inf)
    valid = np.isfinite(log_dispersion)
    if valid.any():
        # Equal-width, right-closed bins over all genes' log mean, like pandas.cut in scanpy.
        edges = np.linspace(log_mean.min(), log_mean.max(), n_bins + 1)
        bins = np.searchsorted(edges[1:-1], log_mean, side="left")
        for b in np.unique(bins[valid]):
            members = valid & (bins == b)
            values = log_dispersion[members]
            sd = values.std(ddof=1) if values.size > 1 else 0.0
            # A bin with one gene (or no spread) gives no evidence of variability: score 1
            # like scanpy does for singleton bins, so such genes are neither lost nor favoured.
            score[members] = (values - values.mean()) / sd if sd > 0 else 1.0
    return score


# ---------------------------------------------------------------- modules


def _check_gene_index(module: nn.Module, incompatible) -> None:
    """Refuse a loaded gene index that is not sorted, unique and within the input genes."""
    index = module.gene_index
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= module.n_genes
                          or bool((index[1:] <= index[:-1]).any())):
        raise ValueError(f"{type(module).__name__}: gene_index must be sorted, unique genes of 0..{module.n_genes - 1}")


class GeneSelecting(nn.Module):
    """Shared plumbing: an index buffer of selected genes and the input width."""

    def __init__(self, n_genes: int, n_selected: int):
        super().__init__()
        self.n_genes = int(n_genes)
        self.n_selected = int(n_selected)
        self.register_buffer("gene_index", torch.arange(self.n_selected, dtype=torch.long))
        self.register_load_state_dict_post_hook(_check_gene_index)

    def selected_normalized(self, counts: torch.Tensor, target_sum: float) -> torch.Tensor:
        """The selected genes of library-normalised ``counts``.

        The library size sums every gene; the selection comes before the per-value work, so
        the element-wise steps that follow (log, scaling) touch only the kept genes. The
        indices are sorted and unique (``fit``; checked on load), so keeping every gene is
        the identity and needs no gather: ONNX Runtime's column Gather was 40% of the
        exported LR chain's time.
        """
        scale = library_scale(counts, target_sum)
        if self.n_selected != self.n_genes:
            counts = torch.index_select(counts, 1, self.gene_index)
        return counts * scale

    @property
    def out_dim(self) -> int:
        return self.n_selected

    def selected_genes(self) -> np.ndarray:
        return self.gene_index.cpu().numpy()


def _kept(module: GeneSelecting) -> str:
    if module.n_selected == module.n_genes:
        return f"all {module.n_genes} genes"
    return f"keep {module.n_selected} of {module.n_genes} genes (highly variable, Seurat dispersion, fit on train)"


class LRPreprocess(GeneSelecting):
    """Logistic regression: normalise to 1e4, log1p, highly variable genes, z-score, clip.

    Genes whose training sd is below ``sd_floor`` (constant in train) get sd = 1, so they map
    to (x - mean) instead of exploding. ``standardize=False`` keeps log1p values (mean 0 and
    sd 1 in the buffers, so the graph is the same): z-scoring gives every selected gene the
    same scale, which lifts noisy, weakly expressed genes to the level of markers; on some
    atlases the unscaled model is better on validation (see ``train.base_model.fit_base``).
    """

    def __init__(self, n_genes: int, n_selected: int, target_sum: float = TARGET_SUM, clip: float = 10.0,
                 standardize: bool = True):
        super().__init__(n_genes, n_selected)
        self.target_sum = float(target_sum)
        self.clip = float(clip)
        self.standardize = bool(standardize)
        self.register_buffer("mean", torch.zeros(self.n_selected))
        self.register_buffer("std", torch.ones(self.n_selected))

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(self.selected_normalized(counts, self.target_sum))
        if self.standardize:  # unscaled: mean 0 and sd 1, so the step is skipped
            x = (x - self.mean) / self.std
        return x.clamp(-self.clip, self.clip)

    @classmethod
    def fit(cls, counts, n_hvg: int | str = 2000, target_sum: float = TARGET_SUM, clip: float = 10.0,
            sd_floor: float = 1e-6, standardize: bool = True) -> LRPreprocess:
        normalized = _normalized_csr(counts, target_sum)
        genes = highly_variable_genes(normalized, n_hvg)
        module = cls(normalized.shape[1], len(genes), target_sum, clip, standardize)
        module.gene_index.copy_(torch.as_tensor(genes, dtype=torch.long))
        if standardize:
            mean, var = _gene_mean_var(_log1p_csr(normalized[:, genes]))
            sd = np.sqrt(var)
            sd[sd < sd_floor] = 1.0
            module.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            module.std.copy_(torch.as_tensor(sd, dtype=torch.float32))
        return module

    @classmethod
    def from_moments(cls, moments: GeneMoments, n_hvg: int | str = 2000, clip: float = 10.0,
                     sd_floor: float = 1e-6, standardize: bool = True) -> LRPreprocess:
        """`fit` from streamed sums (`GeneMoments`) instead of the cells themselves."""
        genes = top_dispersed(dispersion_scores_of(*moments.mean_var()), n_hvg)
        module = cls(moments.sums.shape[1], len(genes), moments.target_sum, clip, standardize)
        module.gene_index.copy_(torch.as_tensor(genes, dtype=torch.long))
        if standardize:
            mean, var = (v[genes] for v in moments.mean_var(logged=True))
            sd = np.sqrt(var)
            sd[sd < sd_floor] = 1.0
            module.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            module.std.copy_(torch.as_tensor(sd, dtype=torch.float32))
        return module

    def sparse_features(self, counts) -> tuple[sp.csr_matrix, np.ndarray]:
        """This module's output on ``counts`` as ``offset + S`` without the dense matrix.

        A zero count maps to the same value on every cell: log1p(0) = 0, hence
        ``clip(-mean / sd)`` for its gene (``offset``, float64 ``[n_selected]``). So the output
        is that row plus ``S``, a float32 CSR with the pattern of the selected genes' nonzero
        counts holding the difference. Exact, clip included; computed in float64 where
        ``forward`` is float32, so the two agree to float32 rounding. LR on every gene of a
        large reference trains on it (``train.loops.SparseAffineSource``): 30,000 genes x
        100,000 cells at 5% detected are 1.2 GB here against 12 GB dense.
        """
        normalized = _normalized_csr(counts, self.target_sum)
        normalized.sum_duplicates()
        if self.n_selected != self.n_genes:
            normalized = normalized[:, self.selected_genes()]
        logged = _log1p_csr(normalized)
        if self.standardize:
            mean, sd = self.mean.double().numpy(), self.std.double().numpy()
            offset = np.clip(-mean / sd, -self.clip, self.clip)
            cols = logged.indices
            values = np.clip((logged.data - mean[cols]) / sd[cols], -self.clip, self.clip) - offset[cols]
        else:
            offset = np.zeros(self.n_selected)
            values = np.clip(logged.data, -self.clip, self.clip)
        matrix = sp.csr_matrix((values.astype(np.float32), logged.indices, logged.indptr), shape=logged.shape)
        return matrix, offset

    def get_config(self) -> dict:
        return {"n_genes": self.n_genes, "n_selected": self.n_selected,
                "target_sum": self.target_sum, "clip": self.clip, "standardize": self.standardize}

    def describe(self) -> str:
        scaling = "standardise with train mean/sd" if self.standardize else "no standardisation"
        return (f"library-size normalise to {self.target_sum:g}; log1p; {_kept(self)}; "
                f"{scaling}; clip at +-{self.clip:g}")


class ActinnPreprocess(GeneSelecting):
    """ACTINN: scale each cell to 1e4 counts, log2(x + 1), keep genes by expression and CV.

    Genes are kept when their total (log) expression over training cells lies within the
    [low, high] percentiles across genes, and then, among those, their coefficient of
    variation does too (the order of ACTINN's ``scale_sets``). The original fit this on
    train + test together; we fit on train only. Genes never expressed in train have no
    defined CV and are dropped (in the original they would turn every CV percentile to NaN).
    """

    def __init__(self, n_genes: int, n_selected: int, target_sum: float = TARGET_SUM):
        super().__init__(n_genes, n_selected)
        self.target_sum = float(target_sum)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.log2(self.selected_normalized(counts, self.target_sum) + 1.0)

    @classmethod
    def fit(cls, counts, low_percentile: float = 1.0, high_percentile: float = 99.0,
            target_sum: float = TARGET_SUM) -> ActinnPreprocess:
        logged = _log1p_csr(_normalized_csr(counts, target_sum), base=2.0)
        n_cells, n_genes = logged.shape
        total = np.asarray(logged.sum(axis=0)).ravel()
        keep = (total >= np.percentile(total, low_percentile)) & (total <= np.percentile(total, high_percentile))
        mean, var = _gene_mean_var(logged)
        keep &= mean > 0
        candidates = np.flatnonzero(keep)
        cv = np.sqrt(var[candidates]) / mean[candidates]
        in_range = (cv >= np.percentile(cv, low_percentile)) & (cv <= np.percentile(cv, high_percentile))
        genes = candidates[in_range]
        module = cls(n_genes, len(genes), target_sum)
        module.gene_index.copy_(torch.as_tensor(genes, dtype=torch.long))
        return module

    def get_config(self) -> dict:
        return {"n_genes": self.n_genes, "n_selected": self.n_selected, "target_sum": self.target_sum}

    def describe(self) -> str:
        return (f"scale each cell to {self.target_sum:g} counts; log2(x+1); keep {self.n_selected} of "
                f"{self.n_genes} genes inside the 1st..99th percentile of total expression and of "
                "coefficient of variation (fit on train)")


class ScdaePreprocess(GeneSelecting):
    """scDAE: normalise to 1e4, log1p, highly variable genes, divide by the train maximum.

    The public scDAE code takes an already normalised matrix and reconstructs it through a
    sigmoid decoder with MSE, which only makes sense for inputs in [0, 1]. So we log-normalise
    like the other models and scale each gene by its training maximum (genes never expressed
    in train keep scale 1). Gene selection is ours, for tractability: the 1000-unit first
    layer on ~30k genes would dominate training time; the original used whatever genes it
    was given.
    """

    def __init__(self, n_genes: int, n_selected: int, target_sum: float = TARGET_SUM):
        super().__init__(n_genes, n_selected)
        self.target_sum = float(target_sum)
        self.register_buffer("scale", torch.ones(self.n_selected))

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.selected_normalized(counts, self.target_sum)) / self.scale

    @classmethod
    def fit(cls, counts, n_hvg: int | str = 2000, target_sum: float = TARGET_SUM) -> ScdaePreprocess:
        normalized = _normalized_csr(counts, target_sum)
        genes = highly_variable_genes(normalized, n_hvg)
        logged = _log1p_csr(normalized[:, genes])
        maximum = logged.max(axis=0).toarray().ravel()
        maximum[maximum <= 0] = 1.0
        module = cls(normalized.shape[1], len(genes), target_sum)
        module.gene_index.copy_(torch.as_tensor(genes, dtype=torch.long))
        module.scale.copy_(torch.as_tensor(maximum, dtype=torch.float32))
        return module

    def get_config(self) -> dict:
        return {"n_genes": self.n_genes, "n_selected": self.n_selected, "target_sum": self.target_sum}

    def describe(self) -> str:
        return (f"library-size normalise to {self.target_sum:g}; log1p; {_kept(self)}; divide "
                "each gene by its train maximum (inputs in [0, 1] for the sigmoid decoder)")


PREPROCESSORS: dict[str, type[GeneSelecting]] = {
    "lr": LRPreprocess,
    "svm": LRPreprocess,  # after "lr": a chain's base is named by its config, this is a fallback
    "actinn": ActinnPreprocess,
    "scdae": ScdaePreprocess,
}


def fit_preprocess(base: str, counts, **options) -> GeneSelecting:
    """Fit the named base model's preprocessing on training counts (csr or dense)."""
    try:
        cls = PREPROCESSORS[base]
    except KeyError:
        raise ValueError(f"unknown base model {base!r}; expected one of {sorted(PREPROCESSORS)}") from None
    return cls.fit(counts, **options)

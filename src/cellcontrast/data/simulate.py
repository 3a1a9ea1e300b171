"""A simulated atlas shaped like one animal of Tabula Microcebus: the project's embedded default.

Structure, from coarse to fine: compartments (immune, epithelial, ...) contain lineages, which
contain cell types. Each level adds its own gene programme on the log scale, so sibling types
share their compartment and lineage programmes and differ only by a few weak markers: they are
hard to tell apart, as in a real atlas. Type abundance is long-tailed (geometric decay, with
noise). Counts are negative binomial around `library size x expression profile`, with donor
(individual) effects, a continuous cell-state programme shared by all types, and dropout.

Individuals differ the way donors do: each has its own sequencing depth, its own mix of types
(a Dirichlet draw per type over individuals), a small shift on every gene and a strong one on a
few donor genes (sex, ambient RNA, a dissociation response), so that a model trained on some
individuals meets a shifted distribution on another (the held-out-batch setting).

The difficulty knobs (`marker_effect`, `n_markers`, ...) are calibrated so that a plain logistic
regression lands near the paper's figures (about 0.93 top-1 in Default, 0.82 in Data Scarce);
`bench/calibrate_simulator.py` prints those figures.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path

COMPARTMENTS = ["Immune", "Epithelial", "Stromal", "Endothelial", "Neural", "Germline"]
LINEAGE_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@dataclass(frozen=True)
class SimulationKnobs:
    """Effect sizes on the natural-log scale of expression. Calibrated, see module docstring."""

    compartment_genes: int = 200
    compartment_effect: float = 1.2
    lineage_genes: int = 80
    lineage_effect: float = 0.8
    n_markers: int = 8
    marker_effect: float = 2.8
    donor_effect: float = 0.25
    donor_genes: int = 40  # strong donor-specific genes per individual
    donor_gene_effect: float = 1.0
    donor_depth_sd: float = 0.35  # individuals' depth: x exp(N(0, sd)) on every cell's library
    donor_composition: float = 4.0  # Dirichlet concentration of a type's individuals (inf: even)
    state_genes: int = 150
    state_effect: float = 0.6
    mean_library_size: float = 1800.0
    library_sd: float = 0.55
    dispersion: float = 0.35
    dropout_midpoint: float = 0.3
    abundance_decay: float = 0.92
    types_per_lineage: float = 4.0
    marker_spread: float = 0.3  # types differ in how distinct they are: effect x U(1-s, 1+s)


def _type_abundances(n_types: int, n_cells: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Cells per type: geometric decay with multiplicative noise, sorted, summing to n_cells."""
    weights = decay ** np.arange(n_types) * np.exp(rng.normal(0.0, 0.15, n_types))
    weights = np.sort(weights)[::-1]
    counts = np.floor(weights / weights.sum() * n_cells).astype(np.int64)
    counts = np.maximum(counts, 5)
    counts[0] += n_cells - counts.sum()  # the most common type absorbs the rounding
    return counts


def _hierarchy(n_types: int, types_per_lineage: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Assign types to compartments and lineages; return (compartment, lineage, type names)."""
    n_comp = min(len(COMPARTMENTS), max(1, n_types // 8))
    n_lineages = max(n_comp, int(round(n_types / types_per_lineage)))
    lineage_comp = np.concatenate([np.arange(n_comp), rng.integers(0, n_comp, n_lineages - n_comp)])
    # Lineages gather types of similar abundance (rank plus noise), so that the top-K types of
    # any setting include sibling types, as T-cell subtypes are all common in a real atlas.
    jittered_rank = np.argsort(np.arange(n_types) + rng.normal(0.0, types_per_lineage * 1.5, n_types))
    type_lineage = np.empty(n_types, dtype=np.int64)
    type_lineage[jittered_rank] = np.minimum(np.arange(n_types) * n_lineages // n_types, n_lineages - 1)
    type_comp = lineage_comp[type_lineage]
    names, seen = [], {}
    for lin, comp in zip(type_lineage, type_comp, strict=True):
        word = LINEAGE_WORDS[lin % len(LINEAGE_WORDS)]
        seen[lin] = seen.get(lin, 0) + 1
        names.append(f"{COMPARTMENTS[comp]} {word}-{lin} type {seen[lin]}")
    return type_comp, type_lineage, names


def _programme(n_groups: int, n_genes: int, n_active: int, effect: float, rng) -> np.ndarray:
    """Log fold changes [groups, genes]: each group moves `n_active` random genes up or down."""
    lfc = np.zeros((n_groups, n_genes), dtype=np.float64)
    for g in range(n_groups):
        genes = rng.choice(n_genes, size=min(n_active, n_genes), replace=False)
        lfc[g, genes] = rng.normal(0.0, effect, genes.size) + np.sign(rng.normal(size=genes.size)) * effect * 0.5
    return lfc


def _donors(n_individuals: int, n_genes: int, labels: np.ndarray, k: SimulationKnobs, rng) -> tuple:
    """Each cell's individual (drawn from its type's Dirichlet mix of individuals), each
    individual's depth factor and its strong donor-gene shifts [individuals, genes]."""
    n_types = int(labels.max()) + 1
    if np.isfinite(k.donor_composition):
        mix = rng.dirichlet(np.full(n_individuals, k.donor_composition), size=n_types)
    else:
        mix = np.full((n_types, n_individuals), 1.0 / n_individuals)
    cumulative = np.cumsum(mix, axis=1)[labels]
    individuals = (rng.random(labels.size)[:, None] > cumulative).sum(axis=1).clip(max=n_individuals - 1)
    depth = np.exp(rng.normal(0.0, k.donor_depth_sd, n_individuals))
    genes = _programme(n_individuals, n_genes, k.donor_genes, k.donor_gene_effect, rng)
    return individuals, depth, genes


def _rows_per_chunk(n_genes: int) -> int:
    """Cells simulated at a time: 8192 up to 2,000 genes (the atlases made so far, unchanged),
    fewer beyond, so a chunk's dense [rows, genes] arrays stay near 130 MB each (20,000 genes:
    819 rows) and memory does not grow with the gene count."""
    return 8192 if n_genes <= 2_000 else max(256, 8192 * 2_000 // n_genes)


def simulate_atlas(
    n_cells: int = 90_000,
    n_types: int = 97,
    n_genes: int = 2_000,
    n_individuals: int = 4,
    seed: int = 0,
    knobs: SimulationKnobs | None = None,
) -> ad.AnnData:
    """Simulate a labelled atlas of raw counts (CSR float32). Deterministic for a seed."""
    if n_cells < 10 * n_types or n_types < 2 or n_genes < 50 or n_individuals < 1:
        raise InputError(
            f"cannot simulate {n_cells} cells of {n_types} types over {n_genes} genes: "
            "need at least 10 cells per type, 2 types, 50 genes and 1 individual"
        )
    k = knobs or SimulationKnobs()
    rows_per_chunk = _rows_per_chunk(n_genes)
    root = np.random.SeedSequence(seed)
    structure_seq, *chunk_seqs = root.spawn(1 + max(1, -(-n_cells // rows_per_chunk)))
    rng = np.random.default_rng(structure_seq)
    (donor_seq,) = root.spawn(1)  # spawned after the others, so they draw as they did before
    drng = np.random.default_rng(donor_seq)

    type_counts = _type_abundances(n_types, n_cells, k.abundance_decay, rng)
    type_comp, type_lineage, type_names = _hierarchy(n_types, k.types_per_lineage, rng)
    n_lineages = type_lineage.max() + 1

    gene_base = rng.normal(0.0, 1.3, n_genes)  # baseline log-expression, long right tail after exp
    comp_lfc = _programme(len(COMPARTMENTS), n_genes, k.compartment_genes, k.compartment_effect, rng)
    lin_lfc = _programme(n_lineages, n_genes, k.lineage_genes, k.lineage_effect, rng)
    type_lfc = _programme(n_types, n_genes, k.n_markers, k.marker_effect, rng)
    type_lfc *= rng.uniform(1 - k.marker_spread, 1 + k.marker_spread, (n_types, 1))
    log_profile = gene_base + comp_lfc[type_comp] + lin_lfc[type_lineage] + type_lfc  # [types, genes]
    donor_lfc = rng.normal(0.0, k.donor_effect, (n_individuals, n_genes))
    state_lfc = _programme(1, n_genes, k.state_genes, k.state_effect, rng)[0]
    type_library = np.exp(rng.normal(0.0, 0.3, n_types))  # some types are bigger cells
    gene_dispersion = k.dispersion * np.exp(rng.normal(0.0, 0.3, n_genes))

    labels = rng.permutation(np.repeat(np.arange(n_types), type_counts))
    individuals, donor_depth, donor_genes_lfc = _donors(n_individuals, n_genes, labels, k, drng)
    donor_lfc = donor_lfc + donor_genes_lfc

    def simulate_chunk(i: int) -> sp.csr_matrix:
        crng = np.random.default_rng(chunk_seqs[i])
        rows = slice(i * rows_per_chunk, min(n_cells, (i + 1) * rows_per_chunk))
        lab, ind = labels[rows], individuals[rows]
        state = crng.normal(0.0, 1.0, lab.size)
        logits = log_profile[lab] + donor_lfc[ind] + state[:, None] * state_lfc
        profile = np.exp(logits - logits.max(axis=1, keepdims=True))
        profile /= profile.sum(axis=1, keepdims=True)
        library = k.mean_library_size * type_library[lab] * donor_depth[ind] * np.exp(crng.normal(-k.library_sd**2 / 2, k.library_sd, lab.size))
        mean = (profile * library[:, None]).astype(np.float32)
        shape = (1.0 / gene_dispersion).astype(np.float32)
        rate = crng.gamma(shape, 1.0, size=mean.shape).astype(np.float32) / shape
        counts = crng.poisson(mean * rate).astype(np.float32)
        # Dropout: weakly expressed genes lose their reads more often (technical zeros).
        p_drop = k.dropout_midpoint / (k.dropout_midpoint + mean)
        counts[crng.random(mean.shape, dtype=np.float32) < p_drop * 0.5] = 0.0
        return sp.csr_matrix(counts)

    n_chunks = -(-n_cells // rows_per_chunk)
    # numpy's generators release the GIL, so two threads use both cores; each chunk has its
    # own seed, so the result does not depend on scheduling.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        X = sp.vstack(list(pool.map(simulate_chunk, range(n_chunks))), format="csr")
    X.sort_indices()

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(labels, categories=type_names),
            "compartment": pd.Categorical.from_codes(type_comp[labels], categories=COMPARTMENTS),
            "individual": pd.Categorical([f"L{i + 1}" for i in individuals]),
            "method": pd.Categorical(["10x"] * n_cells),
        },
        index=[f"cell{i:06d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"Gene{g:04d}" for g in range(n_genes)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["simulation"] = {"seed": seed, **{f: getattr(k, f) for f in k.__dataclass_fields__}}
    return adata


def simulate_atlas_to_file(path: str, **kwargs) -> ad.AnnData:
    """Simulate and write atomically to `path` (.h5ad)."""
    if not str(path).endswith(".h5ad"):
        raise InputError(f"--out {path!r} must end with .h5ad")
    adata = simulate_atlas(**kwargs)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    print(f"wrote {path}: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['cell_type'].nunique()} types")
    return adata

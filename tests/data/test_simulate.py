import numpy as np
import scipy.sparse as sp

from cellcontrast.data.simulate import simulate_atlas


def test_shape_types_and_metadata(small_atlas):
    a = small_atlas
    assert a.shape == (3000, 200)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    assert {"cell_type", "compartment", "individual"} <= set(a.obs.columns)
    assert a.obs["cell_type"].nunique() == 20
    assert a.var_names.is_unique and a.obs_names.is_unique
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() > 0


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = simulate_atlas(n_cells=600, n_types=10, n_genes=80, seed=3)
    b = simulate_atlas(n_cells=600, n_types=10, n_genes=80, seed=3)
    c = simulate_atlas(n_cells=600, n_types=10, n_genes=80, seed=4)
    assert (a.X != b.X).nnz == 0 and (a.obs["cell_type"] == b.obs["cell_type"]).all()
    assert (a.X != c.X).nnz > 0


def test_long_tailed_abundance_at_the_defaults_is_cheap_to_check():
    # Only the abundance model, not the counts: types sorted by size must decay steeply.
    from cellcontrast.data.simulate import SimulationKnobs, _type_abundances

    counts = _type_abundances(97, 90_000, SimulationKnobs().abundance_decay, np.random.default_rng(0))
    assert counts.sum() == 90_000
    ranked = np.sort(counts)[::-1]
    assert ranked[24] >= 600 and ranked[49] >= 75
    assert ranked[0] > 5 * ranked[24]


def test_sibling_types_are_closer_than_unrelated_types(small_atlas):
    # Mean log expression of types in the same lineage correlates more than across compartments.
    a = small_atlas
    X = a.X.multiply(1e4 / a.X.sum(axis=1)).tocsr()
    X.data = np.log1p(X.data)
    names = a.obs["cell_type"].cat.categories
    means = np.vstack([np.asarray(X[(a.obs["cell_type"] == t).to_numpy()].mean(axis=0)).ravel() for t in names])
    lineage = np.array([n.split(" type")[0] for n in names])
    compartment = np.array([n.split(" ")[0] for n in names])
    corr = np.corrcoef(means)
    same = [corr[i, j] for i in range(len(names)) for j in range(i) if lineage[i] == lineage[j]]
    other = [corr[i, j] for i in range(len(names)) for j in range(i) if compartment[i] != compartment[j]]
    assert same and other and np.mean(same) > np.mean(other)


def test_individuals_differ_in_depth_composition_and_expression():
    """Held-out-individual is harder than a random split only if individuals differ as donors do."""
    from cellcontrast.data.simulate import SimulationKnobs

    def atlas(**knobs):
        return simulate_atlas(n_cells=4000, n_types=8, n_genes=150, n_individuals=3, seed=2,
                              knobs=SimulationKnobs(**knobs))

    a = atlas()
    individual = a.obs["individual"].astype(str).to_numpy()
    depth = {i: float(a.X[individual == i].sum(axis=1).mean()) for i in np.unique(individual)}
    assert max(depth.values()) > 1.15 * min(depth.values())
    mix = a.obs.groupby(["cell_type", "individual"], observed=False).size().unstack().to_numpy(float)
    share = mix / mix.sum(axis=1, keepdims=True)  # each type's cells over individuals
    assert share.std(axis=0).max() > 0.08  # types are not spread evenly over individuals
    even = atlas(donor_composition=float("inf"), donor_depth_sd=0.0)
    mix = even.obs.groupby(["cell_type", "individual"], observed=False).size().unstack().to_numpy(float)
    assert (mix / mix.sum(axis=1, keepdims=True)).std(axis=0).max() < 0.06


def test_many_genes_are_simulated_in_smaller_chunks_deterministically():
    """Past 2,000 genes the cells are drawn in smaller chunks (memory bounded by the chunk, not
    the gene count); the atlas is still one seed's deterministic draw."""
    from cellcontrast.data.simulate import _rows_per_chunk

    assert _rows_per_chunk(2_000) == 8192 and _rows_per_chunk(20_000) * 20_000 <= 8192 * 2_000
    a = simulate_atlas(n_cells=4000, n_types=8, n_genes=6000, n_individuals=2, seed=3)
    b = simulate_atlas(n_cells=4000, n_types=8, n_genes=6000, n_individuals=2, seed=3)
    assert a.shape == (4000, 6000) and -(-4000 // _rows_per_chunk(6000)) > 1
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert np.asarray(a.X.sum(axis=1)).min() > 0  # every chunk holds real cells

"""Genes that travel: a Cell Ranger-wide reference (most genes never detected) annotates a query
of another lab's gene list; the overlap is weighed by what the model draws from each gene;
`fit --query` trains on the genes the query measures."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellcontrast as cc
from cellcontrast.cli.entry import main
from cellcontrast.data.simulate import simulate_atlas

N_WIDE, N_QUERY_GENES = 33_000, 14_000
FAST = {"lr": {"n_hvg": 100, "l2_path": [1e-2, 1e-3]}}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 33,000-gene reference (300 detected) and a query of another individual listing 14,000
    genes, 270 of the detected ones among them (another lab's filtered list)."""
    small = simulate_atlas(n_cells=1200, n_types=6, n_genes=300, n_individuals=2, seed=5)
    rng = np.random.default_rng(0)
    names = np.array([f"GENE{i:05d}" for i in range(N_WIDE)])
    where = np.sort(rng.choice(N_WIDE, small.n_vars, replace=False))
    placed = sp.csr_matrix(small.X)
    columns = sp.csr_matrix((np.ones(small.n_vars), (np.arange(small.n_vars), where)), shape=(small.n_vars, N_WIDE))
    wide = ad.AnnData(X=sp.csr_matrix(placed @ columns, dtype=np.float32), obs=small.obs.copy(),
                      var=pd.DataFrame(index=names))
    is_query = (wide.obs["individual"] == "L2").to_numpy()
    kept_detected = rng.choice(where, 270, replace=False)
    others = rng.choice(np.setdiff1d(np.arange(N_WIDE), where), N_QUERY_GENES - 270, replace=False)
    query_genes = np.sort(np.r_[kept_detected, others])
    folder = tmp_path_factory.mktemp("wide")
    reference, query = folder / "reference.h5ad", folder / "query.h5ad"
    wide[~is_query].copy().write_h5ad(reference)
    wide[is_query][:, query_genes].copy().write_h5ad(query)
    return reference, query, names[where]


def test_a_wide_reference_annotates_a_query_of_another_gene_list(wide, tmp_path, capsys):
    reference, query, detected = wide
    model, out = tmp_path / "a.onnx", tmp_path / "q.h5ad"
    assert main(["fit", "--reference", str(reference), "--out", str(model), "--chains", "lr", "--no-register",
                 "--experiment", "gene-panel"]) == 0
    assert "32700 of 33000 reference genes are never detected" in capsys.readouterr().err
    annotator = cc.Annotator.load(model)
    assert sorted(annotator.genes) == sorted(detected)  # only the detected genes enter the model
    weights = annotator.gene_weights
    assert weights is not None and weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    # 14,000 of the 33,000 listed genes (42%) would be refused; 270 of the 300 it uses are not
    assert main(["annotate", str(model), str(query), "--out", str(out)]) == 0
    assert "found 270 of 300 model genes (90.0%, carrying" in capsys.readouterr().out
    annotated = ad.read_h5ad(out)
    accuracy = (annotated.obs["cellcontrast_label"].astype(str) == annotated.obs["cell_type"].astype(str)).mean()
    assert accuracy > 0.5


def test_the_overlap_weighs_genes_by_what_the_model_draws_from_them(wide, tmp_path, capsys):
    reference, _, _ = wide
    model = tmp_path / "a.onnx"
    cc.fit_annotator(ad.read_h5ad(reference), "cell_type", chains="lr", params=FAST, out=model, experiment=None)
    annotator = cc.Annotator.load(model)
    order = np.argsort(-annotator.gene_weights)
    top = np.cumsum(annotator.gene_weights[order]) <= 0.6
    assert top.sum() < 0.5 * len(order)  # a few genes carry most of the weight
    keep = np.sort(order[~top])  # most genes, few of the ones it reads
    query = ad.read_h5ad(reference)[:50]
    query = query[:, query.var_names.isin(np.asarray(annotator.genes)[keep])].copy()
    path = tmp_path / "q.h5ad"
    query.write_h5ad(path)
    assert main(["annotate", str(model), str(path), "--out", str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "of what the model draws on) found" in err and "--min-overlap" in err and "Traceback" not in err


def test_fit_query_trains_on_the_genes_the_query_measures(wide, tmp_path, capsys):
    reference, query, detected = wide
    model = tmp_path / "a.onnx"
    assert main(["fit", "--reference", str(reference), "--query", str(query), "--out", str(model), "--chains", "lr",
                 "--no-register", "--experiment", "gene-panel"]) == 0
    assert "training on the 270 detected reference genes that --query" in capsys.readouterr().err
    genes = cc.Annotator.load(model).genes
    assert len(genes) == 270 and set(genes) <= set(detected)
    out = tmp_path / "q.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(out)]) == 0
    assert "found 270 of 270 model genes (100.0%" in capsys.readouterr().out


def test_a_query_sharing_too_few_genes_is_refused(wide, tmp_path, capsys):
    reference, _, detected = wide
    other = ad.AnnData(X=sp.csr_matrix((3, 120), dtype=np.float32), var=pd.DataFrame(index=detected[:120]))
    path, model = tmp_path / "other.h5ad", tmp_path / "a.onnx"
    other.write_h5ad(path)
    assert main(["fit", "--reference", str(reference), "--query", str(path), "--out", str(model),
                 "--chains", "lr", "--no-register"]) == 2
    err = capsys.readouterr().err
    assert f"--query {path} shares only 120 of the reference's 300 detected genes (40.0%" in err
    assert not model.exists()

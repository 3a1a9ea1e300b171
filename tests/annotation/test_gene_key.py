"""Gene identifiers: a CELLxGENE-style query (Ensembl IDs in the index, symbols in
``var['feature_name']``) annotates with ``gene_key``, and without it is refused with the hint."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellcontrast as cc
from cellcontrast.annotation.genes import align_genes, identifier_kind, strip_version
from cellcontrast.cli.entry import main

FAST = {"lr": {"n_hvg": 100, "l2_path": [1e-2]}}


@pytest.fixture(scope="module")
def annotator(small_atlas, tmp_path_factory):
    chain = cc.fit(small_atlas[:1500].copy(), "cell_type", params=FAST)
    return chain.export(tmp_path_factory.mktemp("model") / "symbols.onnx")


def cellxgene_style(adata: ad.AnnData) -> ad.AnnData:
    """IDs (with versions) in the index, symbols in var['feature_name'], as CELLxGENE writes them."""
    out = adata.copy()
    out.var = pd.DataFrame({"feature_name": pd.Categorical(adata.var_names),
                            "feature_biotype": "gene"},
                           index=[f"ENSG{i:011d}.{i % 7 + 1}" for i in range(adata.n_vars)])
    return out


@pytest.fixture(scope="module")
def query(small_atlas):
    return small_atlas[1500:1800].copy()


def test_a_cellxgene_query_annotates_by_its_symbol_column(annotator, query, tmp_path):
    plain = cc.annotate(query, annotator, copy=True)
    styled = cellxgene_style(query)
    with pytest.raises(cc.InputError, match="try --gene-key feature_name"):
        cc.annotate(styled, annotator, copy=True)
    by_symbol = cc.annotate(styled, annotator, gene_key="feature_name", copy=True)
    assert (by_symbol.obs["cellcontrast_label"] == plain.obs["cellcontrast_label"]).all()
    assert by_symbol.uns["cellcontrast"]["gene_key"] == "feature_name"

    path = tmp_path / "cellxgene.h5ad"
    styled.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    assert main(["annotate", str(annotator), str(path), "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["annotate", str(annotator), str(path), "--out", str(out), "--gene-key", "feature_name"]) == 0
    written = ad.read_h5ad(out)
    np.testing.assert_array_equal(written.obs["cellcontrast_raw_label"].astype(str),
                                  plain.obs["cellcontrast_raw_label"].astype(str))


def test_refusals_name_the_columns_and_the_way_back(annotator, query, tmp_path, capsys):
    path = tmp_path / "q.h5ad"
    cellxgene_style(query).write_h5ad(path)
    assert main(["annotate", str(annotator), str(path), "--out", str(tmp_path / "o.h5ad"),
                 "--gene-key", "gene_symbols"]) == 2
    err = capsys.readouterr().err
    assert "gene_symbols" in err and "feature_name" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.h5ad").exists()
    plain = query.copy()
    plain.var["feature_biotype"] = "gene"
    with pytest.raises(cc.InputError, match="drop --gene-key"):  # the symbols are the index here
        cc.annotate(plain, annotator, gene_key="feature_biotype")
    with pytest.raises(cc.InputError, match="not a var column"):
        cc.annotate(plain, annotator, gene_key="nope")


def test_versions_are_ignored_and_the_kind_of_identifier_is_recognised():
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000059552.8") == "ENSMUSG00000059552"
    assert strip_version("HLA-A.1") == "HLA-A.1"  # not an Ensembl ID: unchanged
    cols = align_genes(pd.Index(["ENSG00000000003.15", "x", "ENSG00000000005"]),
                       ["ENSG00000000005.6", "ENSG00000000003"])
    assert cols.tolist() == [1, -1, 0]
    assert identifier_kind(["ENSG00000000003", "ENSG00000000005.2", "TP53"]) == "ensembl"
    assert identifier_kind(["TP53", "CD3E", "ENSG00000000005"]) == "symbol"


def test_the_model_records_the_kind_of_its_genes(annotator):
    assert cc.Annotator.load(annotator).metadata["gene_identifiers"] == "symbol"

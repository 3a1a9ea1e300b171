"""`cellcontrast annotate`: alignment, streaming, thresholds, outputs, refusals, no torch.

The model here is a small ONNX graph built with onnx.helper (no torch needed):
probabilities = softmax(log1p(1e4 * counts / total) @ W + b), with a numpy twin as reference.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cellcontrast.annotation import UNASSIGNED, annotate_file  # noqa: E402
from cellcontrast.cli.entry import main  # noqa: E402
from tiny_onnx import (  # noqa: E402
    CLASSES,
    COLS,
    MODEL_GENES,
    build_model,
    make_counts,
    reference_proba,
    write_query,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    """60 cells; the query has the model's genes shuffled plus 5 extra genes."""
    rng = np.random.default_rng(1)
    counts_model = make_counts(60, len(MODEL_GENES))
    extra = make_counts(60, 5, seed=9)
    genes = np.array(MODEL_GENES + [f"Extra{i}" for i in range(5)])
    full = np.hstack([counts_model, extra])
    order = rng.permutation(len(genes))
    path = write_query(tmp_path_factory.mktemp("query") / "query.h5ad", full[:, order], genes[order],
                       compression="gzip")
    return path, counts_model


def run_cli(*argv) -> int:
    return main(["annotate", *map(str, argv)])


def _expected_labels(probs):
    return np.asarray(CLASSES)[probs.argmax(1)]


def test_predictions_match_model_and_outputs(model_path, query, tmp_path, capsys):
    path, counts = query
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out, csv = tmp_path / "out.h5ad", tmp_path / "out.csv"
    assert run_cli(model_path, path, "--out", out, "--csv", csv, "--probabilities", "--batch-size", 16) == 0
    assert "found 30 of 30 model genes" in capsys.readouterr().out

    expected = reference_proba(counts)
    res = ad.read_h5ad(out)
    assert res.shape == (60, 0)
    assert list(res.obs_names) == [f"cell{i}" for i in range(60)]
    assert "batch" in res.obs.columns  # the query's obs kept
    np.testing.assert_array_equal(res.obs["cellcontrast_label"].astype(str), _expected_labels(expected))
    np.testing.assert_allclose(res.obs["cellcontrast_confidence"], expected.max(1), atol=1e-5)
    np.testing.assert_allclose(res.obsm["cellcontrast_probabilities"], expected, atol=1e-5)
    top = np.argsort(-expected, axis=1)[:, :3]
    for j in range(3):
        np.testing.assert_array_equal(res.obs[f"cellcontrast_top{j + 1}"].astype(str), np.asarray(CLASSES)[top[:, j]])
        np.testing.assert_allclose(res.obs[f"cellcontrast_top{j + 1}_prob"],
                                   np.take_along_axis(expected, top[:, j:j + 1], 1)[:, 0], atol=1e-5)
    uns = res.uns["cellcontrast"]
    assert uns["genes_found"] == 30 and uns["genes_total"] == 30
    assert list(uns["classes"]) == CLASSES

    table = pd.read_csv(csv, index_col="cell_id")
    assert list(table.columns) == COLS
    assert list(table.index) == list(res.obs_names)
    for col in COLS:
        if col.endswith(("confidence", "prob")):
            np.testing.assert_allclose(table[col], res.obs[col], atol=1e-6)
        else:
            np.testing.assert_array_equal(table[col].astype(str), res.obs[col].astype(str))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # input untouched


def test_chunked_equals_one_batch_and_dense(model_path, query, tmp_path):
    path, counts = query
    small = annotate_file(model_path, path, tmp_path / "a.h5ad", batch_size=7, log=lambda *_: None)
    big = annotate_file(model_path, path, tmp_path / "b.h5ad", batch_size=10000, log=lambda *_: None)
    pd.testing.assert_frame_equal(small, big)
    a, b = ad.read_h5ad(tmp_path / "a.h5ad").obs, ad.read_h5ad(tmp_path / "b.h5ad").obs
    pd.testing.assert_frame_equal(a, b)
    dense = write_query(tmp_path / "dense.h5ad", counts, MODEL_GENES, sparse=False)
    annotate_file(model_path, dense, tmp_path / "c.h5ad", batch_size=9, log=lambda *_: None)
    c = ad.read_h5ad(tmp_path / "c.h5ad").obs
    np.testing.assert_array_equal(c["cellcontrast_label"].astype(str), a["cellcontrast_label"].astype(str))
    np.testing.assert_allclose(c["cellcontrast_confidence"], a["cellcontrast_confidence"], atol=1e-6)


def test_byte_capped_chunks_give_same_result(model_path, query, tmp_path, monkeypatch):

    path, counts = query
    ref = annotate_file(model_path, path, tmp_path / "ref.h5ad", log=lambda *_: None)
    monkeypatch.setattr("cellcontrast.annotation.query.READ_BYTES", 400)  # a few cells per read
    monkeypatch.setattr("cellcontrast.annotation.prediction.INFERENCE_ROWS", 3)
    capped = annotate_file(model_path, path, tmp_path / "capped.h5ad", log=lambda *_: None)
    pd.testing.assert_frame_equal(ref, capped)
    dense = write_query(tmp_path / "dense.h5ad", counts, MODEL_GENES, sparse=False)
    annotate_file(model_path, dense, tmp_path / "dense_out.h5ad", log=lambda *_: None)
    a = ad.read_h5ad(tmp_path / "capped.h5ad").obs
    b = ad.read_h5ad(tmp_path / "dense_out.h5ad").obs
    pd.testing.assert_frame_equal(a.drop(columns="batch"), b.drop(columns="batch"))


def test_gzip_chunks_inflated_in_threads_give_same_result(model_path, query, tmp_path, monkeypatch):
    """A query whose CSR arrays are gzip chunks of 11 values: reads span and split chunks."""
    import h5py

    import cellcontrast.data.h5chunks as h5chunks

    path, counts = query
    rewritten = tmp_path / "small_chunks.h5ad"
    rewritten.write_bytes(path.read_bytes())
    with h5py.File(rewritten, "r+") as f:
        for name in ("data", "indices"):
            values = f["X"][name][:]
            del f["X"][name]
            f["X"].create_dataset(name, data=values, chunks=(11,), compression="gzip")
    reads = []
    submit = h5chunks.ChunkedGzipArray.submit
    monkeypatch.setattr(h5chunks.ChunkedGzipArray, "submit", lambda self, lo, hi: reads.append(hi - lo) or submit(self, lo, hi))
    monkeypatch.setattr("cellcontrast.annotation.query.READ_BYTES", 800)  # about 100 values a read
    annotate_file(model_path, rewritten, tmp_path / "out.h5ad", probabilities=True, log=lambda *_: None)
    assert len(reads) > 10  # the inflating reader did the reading
    res = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_allclose(res.obsm["cellcontrast_probabilities"], reference_proba(counts), atol=1e-5)


def test_missing_genes_are_zeros(model_path, tmp_path, capsys):
    counts = make_counts(20, len(MODEL_GENES), seed=5)
    keep = np.arange(len(MODEL_GENES)) >= 6  # the query lacks the first six model genes
    path = write_query(tmp_path / "q.h5ad", counts[:, keep], np.asarray(MODEL_GENES)[keep])
    out = tmp_path / "out.h5ad"
    assert run_cli(model_path, path, "--out", out) == 0
    assert "found 24 of 30 model genes (80.0%)" in capsys.readouterr().out
    zeroed = counts.copy()
    zeroed[:, ~keep] = 0
    res = ad.read_h5ad(out)
    np.testing.assert_allclose(res.obs["cellcontrast_confidence"], reference_proba(zeroed).max(1), atol=1e-5)
    assert sorted(res.uns["cellcontrast"]["genes_missing"]) == sorted(MODEL_GENES[:6])


def test_case_insensitive(model_path, tmp_path, capsys):
    counts = make_counts(12, len(MODEL_GENES), seed=6)
    path = write_query(tmp_path / "q.h5ad", counts, [g.upper() for g in MODEL_GENES])
    out = tmp_path / "out.h5ad"
    assert run_cli(model_path, path, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only 0 of 30 model genes" in err and "--case-insensitive" in err
    assert not out.exists()
    assert run_cli(model_path, path, "--out", out, "--case-insensitive") == 0
    res = ad.read_h5ad(out)
    np.testing.assert_array_equal(res.obs["cellcontrast_label"].astype(str), _expected_labels(reference_proba(counts)))


def test_min_confidence_unassigned_and_accuracy(model_path, query, tmp_path, capsys):
    path, counts = query
    probs = reference_proba(counts)
    threshold = float(np.median(probs.max(1)))
    truth = _expected_labels(probs).astype(object)
    truth[:10] = "Unknown type"  # not a model class: left out of the accuracy
    obs = pd.DataFrame({"cell_type": truth}, index=[f"c{i}" for i in range(60)])
    q2 = write_query(tmp_path / "q2.h5ad", counts, MODEL_GENES, obs=obs)
    out = tmp_path / "out.h5ad"
    assert run_cli(model_path, q2, "--out", out, "--min-confidence", threshold, "--label-key", "cell_type") == 0
    printed = capsys.readouterr().out
    assert "accuracy against obs['cell_type']: 1.0000 on 50 of 60 cells" in printed
    res = ad.read_h5ad(out).obs
    low = probs.max(1) < threshold
    assert low.any() and (~low).any()
    assert (res["cellcontrast_label"].astype(str)[low] == UNASSIGNED).all()
    np.testing.assert_array_equal(res["cellcontrast_label"].astype(str)[~low], _expected_labels(probs)[~low])
    np.testing.assert_array_equal(res["cellcontrast_raw_label"].astype(str), _expected_labels(probs))


def test_layers_and_raw(model_path, tmp_path):
    counts = make_counts(15, len(MODEL_GENES), seed=8)
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=MODEL_GENES))
    adata.raw = adata.copy()
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.X = sp.csr_matrix(lognorm)
    path = tmp_path / "q.h5ad"
    adata.write_h5ad(path)
    expected = _expected_labels(reference_proba(counts))
    for layer in ("counts", "raw"):
        out = tmp_path / f"{layer}.h5ad"
        annotate_file(model_path, path, out, layer=layer, log=lambda *_: None)
        np.testing.assert_array_equal(ad.read_h5ad(out).obs["cellcontrast_label"].astype(str), expected)


# ------------------------------------------------------------------ refusals: exit 2, one line, no output


def _refused(capsys, out, *argv, match: str):
    assert run_cli(*argv, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cellcontrast annotate: error:")
    assert match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp left


def test_bad_model_files(model_path, query, tmp_path, capsys):
    path, _ = query
    out = tmp_path / "out.h5ad"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(2048))
    _refused(capsys, out, corrupt, path, match="not a readable ONNX model")
    text = tmp_path / "model.txt"
    text.write_text("this is not a model\n")
    _refused(capsys, out, text, path, match="not a readable ONNX model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    _refused(capsys, out, truncated, path, match="not a readable ONNX model")
    bare = build_model(tmp_path / "bare.onnx", metadata=False)
    _refused(capsys, out, bare, path, match="without cellcontrast metadata")
    _refused(capsys, out, tmp_path / "missing.onnx", path, match="does not exist")


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_bad_queries(model_path, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    counts = make_counts(40, len(MODEL_GENES), seed=2)

    other = write_query(tmp_path / "other.h5ad", counts, [f"ENSG{i:011d}" for i in range(30)])
    _refused(capsys, out, model_path, other, match="only 0 of 30 model genes (0.0%) found in the query")

    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    logq = write_query(tmp_path / "log.h5ad", lognorm, MODEL_GENES)
    _refused(capsys, out, model_path, logq, match="not counts: looks like log-normalised data")

    # Bad values only in the very last chunk: still no output file.
    late = counts.copy()
    late[-1, 3] = 0.5
    lateq = write_query(tmp_path / "late.h5ad", late, MODEL_GENES)
    _refused(capsys, out, model_path, lateq, "--batch-size", 7, "--csv", tmp_path / "late.csv", match="not counts")
    assert not (tmp_path / "late.csv").exists()

    negative = counts.copy()
    negative[5, 2] = -3
    negq = write_query(tmp_path / "neg.h5ad", negative, MODEL_GENES, sparse=False)
    _refused(capsys, out, model_path, negq, match="negative values")

    nan = counts.copy()
    nan[1, 1] = np.nan
    nanq = write_query(tmp_path / "nan.h5ad", nan, MODEL_GENES)
    _refused(capsys, out, model_path, nanq, match="NaN or infinite")

    empty = write_query(tmp_path / "empty.h5ad", np.zeros((0, 30), np.float32), MODEL_GENES,
                        obs=pd.DataFrame(index=pd.Index([], dtype=str)))
    _refused(capsys, out, model_path, empty, match="the query is empty")

    dup = write_query(tmp_path / "dup.h5ad", counts, MODEL_GENES[:-1] + [MODEL_GENES[0]])
    _refused(capsys, out, model_path, dup, match="duplicated gene names")

    _refused(capsys, out, model_path, other, "--layer", "counts", match="no layer 'counts'")
    notq = tmp_path / "not.h5ad"
    notq.write_text("nope")
    _refused(capsys, out, model_path, notq, match="not an .h5ad")


def test_torch_never_imported(model_path, query, tmp_path):
    path, _ = query
    out = tmp_path / "sub.h5ad"
    code = textwrap.dedent(f"""
        import sys
        from cellcontrast.cli.entry import main
        rc = main(["annotate", {str(model_path)!r}, {str(path)!r}, "--out", {str(out)!r}])
        assert rc == 0, rc
        heavy = [m for m in ("torch", "mlflow", "sklearn") if m in sys.modules]
        assert not heavy, heavy
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert out.exists()


@pytest.mark.parametrize("fallback", [False, True])
def test_densify_maps_columns_sums_duplicates_and_drops_unknown_genes(monkeypatch, fallback):
    from cellcontrast.annotation import stream as annotate_mod

    if fallback:  # scipy without the C helper: the public route gives the same rows
        import scipy.sparse._sparsetools as tools

        monkeypatch.setattr(tools, "csr_todense", lambda *a: (_ for _ in ()).throw(TypeError("moved")))
    # 3 cells x 4 query genes; query gene 2 is unknown to the model; cell 1 repeats gene 0
    indptr = np.array([0, 2, 5, 6])
    indices = np.array([0, 3, 0, 0, 2, 1])
    data = np.array([1, 2, 3, 4, 5, 6], dtype=np.float32)
    chunk = sp.csr_matrix((data, indices, indptr), shape=(3, 4))
    col_map = np.array([2, 0, -1, 1])  # query gene -> model column
    mapped = annotate_mod.to_model_columns(chunk, col_map, 3, 0, "X")
    expected = np.array([[0, 2, 1], [0, 0, 7], [6, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(mapped.rows(0, 3), expected)
    np.testing.assert_array_equal(mapped.rows(1, 3), expected[1:])
    identity = annotate_mod.to_model_columns(chunk, np.arange(4), 4, 0, "X")
    np.testing.assert_array_equal(identity.rows(0, 3), chunk.toarray())

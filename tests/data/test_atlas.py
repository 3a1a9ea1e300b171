"""Reading atlases: X, a layer, .raw; filters; and every bad input refused with one line."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellcontrast.cli.entry import main
from cellcontrast.core.errors import InputError
from cellcontrast.data.atlas import read_atlas


def _atlas(X, labels=None, genes=None):
    n, g = X.shape
    obs = pd.DataFrame(
        {"cell_type": labels if labels is not None else [f"t{i % 3}" for i in range(n)],
         "individual": ["L3" if i % 2 else "L1" for i in range(n)]},
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes or [f"g{j}" for j in range(g)]))


@pytest.fixture
def counts():
    return np.random.default_rng(0).poisson(1.0, (30, 12)).astype(np.float32)


def test_reads_x_layer_and_raw_alike(tmp_path, counts):
    a = _atlas(sp.csr_matrix(np.log1p(counts)))
    a.layers["raw_counts"] = sp.csr_matrix(counts)
    a.raw = _atlas(sp.csr_matrix(counts))
    a.write_h5ad(tmp_path / "a.h5ad")
    from_layer = read_atlas(tmp_path / "a.h5ad", layer="raw_counts")
    from_raw = read_atlas(tmp_path / "a.h5ad", layer="raw")
    _atlas(counts).write_h5ad(tmp_path / "dense.h5ad")
    from_x = read_atlas(tmp_path / "dense.h5ad")
    for got in (from_layer, from_raw, from_x):
        assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.float32
        np.testing.assert_array_equal(got.X.toarray(), counts)


def test_integer_matrix_and_other_label_key(tmp_path, counts):
    a = _atlas(sp.csr_matrix(counts.astype(np.int32)))
    a.obs["celltype_fine"] = a.obs.pop("cell_type")
    a.write_h5ad(tmp_path / "a.h5ad")
    got = read_atlas(tmp_path / "a.h5ad", label_key="celltype_fine")
    assert got.X.dtype == np.float32 and got.obs["cell_type"].nunique() == 3


def test_filters_combine(tmp_path, counts):
    _atlas(counts).write_h5ad(tmp_path / "a.h5ad")
    got = read_atlas(tmp_path / "a.h5ad", filters={"individual": "L3"})
    assert got.n_obs == 15 and (got.obs["individual"] == "L3").all()


def test_numeric_labels_and_missing_labels(tmp_path, counts, capsys):
    labels = [i % 3 for i in range(30)]
    a = _atlas(counts, labels=labels)
    a.obs["cell_type"] = a.obs["cell_type"].astype(float)
    a.obs.iloc[0, 0] = np.nan
    a.write_h5ad(tmp_path / "a.h5ad")
    got = read_atlas(tmp_path / "a.h5ad")
    assert got.n_obs == 29 and "without a label" in capsys.readouterr().err


def _write(path, adata):
    adata.write_h5ad(path)
    return path


def _text_file(p, c):
    (p / "x.h5ad").write_text("cell,gene\n")
    return p / "x.h5ad"


def _truncated(p, c):
    full = _write(p / "full.h5ad", _atlas(c)).read_bytes()
    (p / "t.h5ad").write_bytes(full[: len(full) // 3])
    return p / "t.h5ad"


BAD_INPUTS = {
    "missing file": (lambda p, c: p / "nope.h5ad", [], "no such file"),
    "not an h5ad": (_text_file, [], "not an .h5ad"),
    "truncated h5ad": (_truncated, [], "h5ad"),
    "missing label column": (lambda p, c: _write(p / "a.h5ad", _atlas(c)), ["--label-key", "celltype"], "no label column 'celltype'"),
    "missing layer": (lambda p, c: _write(p / "a.h5ad", _atlas(c)), ["--layer", "raw_counts"], "no layer 'raw_counts'"),
    "missing raw": (lambda p, c: _write(p / "a.h5ad", _atlas(c)), ["--layer", "raw"], "has no .raw"),
    "filter matches nothing": (lambda p, c: _write(p / "a.h5ad", _atlas(c)), ["--filter", "individual=L9"], "matches no cell"),
    "filter column missing": (lambda p, c: _write(p / "a.h5ad", _atlas(c)), ["--filter", "method=10x"], "no obs column 'method'"),
    "negative values": (lambda p, c: _write(p / "a.h5ad", _atlas(c - 2)), [], "negative"),
    "NaN values": (lambda p, c: _write(p / "a.h5ad", _atlas(np.where(c > 1, np.nan, c))), [], "NaN"),
    "infinite values": (lambda p, c: _write(p / "a.h5ad", _atlas(np.where(c > 1, np.inf, c))), [], "infinite"),
    "log-normalised values": (lambda p, c: _write(p / "a.h5ad", _atlas(np.log1p(c))), [], "log-normalised"),
    "duplicate genes": (lambda p, c: _write(p / "a.h5ad", _atlas(c, genes=["g0"] * 2 + [f"g{j}" for j in range(2, 12)])), [], "duplicate gene"),
    "empty matrix": (lambda p, c: _write(p / "a.h5ad", _atlas(c[:, :0])), [], "empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_exit_2(case, tmp_path, counts, capsys):
    make, extra, message = BAD_INPUTS[case]
    path = make(tmp_path, counts)
    out = tmp_path / "out"
    code = main(["split", "--atlas", str(path), "--setting", "default", "--seed", "0", "--out-dir", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_read_atlas_raises_input_error_not_other_exceptions(tmp_path):
    with pytest.raises(InputError):
        read_atlas(tmp_path)

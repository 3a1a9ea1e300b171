"""Malformed input, property-based: every entry point that reads user counts works or refuses.

Hypothesis builds small AnnData objects (0-40 cells x 30 genes) with NaN, +-inf, negative,
fractional, log-normalised, centred or huge values (1e9, 3e38), no cells or no genes,
duplicate gene or cell names, missing / empty / single labels, in int64, int32, uint16,
float16, float32 or float64, stored dense, CSR or CSC. Each goes to

* ``cellcontrast split`` and ``cellcontrast annotate`` (written to an .h5ad): the exit code is
  0 with the output written, or 2 with exactly one line on stderr, no traceback, and nothing
  at --out / --out-dir (nor a temporary file beside it);
* ``cc.fit`` and ``cc.annotate`` (in memory): a result, or ``cc.InputError`` and nothing else;
  the input's matrix, and on a refusal of ``cc.annotate`` its obs, are left as they were.

An oracle (``_problems``) names what makes an example unusable from its final values; an
example without problems must succeed and one with problems must be refused, so neither
"refuse everything" nor "accept everything" passes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cellcontrast as cc
from cellcontrast.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import tiny_onnx  # noqa: E402

GENES = tiny_onnx.MODEL_GENES
DTYPES = (np.int64, np.int32, np.uint16, np.float16, np.float32, np.float64)
STORAGES = ("dense", "csr", "csc")
# Spoilt values: one entry (at a drawn cell and gene) or the whole matrix; and the shape.
VALUE_DEFECTS = ("nan", "inf", "-inf", "negative", "fraction", "huge", "float32 max",
                 "log-normalised", "centred")
SHAPE_DEFECTS = ("no cells", "no genes", "duplicate gene")
LABEL_DAMAGE = ("some missing", "all missing", "some empty", "all empty")

FIT_PARAMS = {"lr": {"n_hvg": 20, "l2_path": [1e-2], "max_iter": 20}}
SPLIT_PARAMS = "settings: {default: {k: 3, cap: 10, equalize: true, fractions: [0.8, 0.1, 0.1]}}\n"
SPLIT_K, SPLIT_CAP = 3, 10
PARTS = ("train", "val", "test")

# The package's limits on counts (cellcontrast.data.counts), restated as the spec.
LARGEST_COUNT = 2**24
INTEGER_TOLERANCE = 1e-3

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------ strategies


@st.composite
def counts(draw, n_cells: int) -> np.ndarray:
    """Clean integer counts (float64 for now): some cells without any count, some matrices
    without any count at all."""
    rate = draw(st.sampled_from([2.0, 0.3, 0.0]))
    seed = draw(st.integers(0, 2**16))
    m = np.random.default_rng(seed).poisson(rate, (n_cells, len(GENES))).astype(np.float64)
    m[sorted(draw(st.sets(st.integers(0, n_cells - 1), max_size=3)))] = 0.0
    return m


@st.composite
def spoilt(draw, m: np.ndarray, defects: frozenset) -> np.ndarray:
    """``m`` with each of ``defects`` applied, at a drawn cell and gene where it is one entry."""
    m = m.copy()
    for defect in sorted(defects):
        i, j = draw(st.integers(0, m.shape[0] - 1)), draw(st.integers(0, m.shape[1] - 1))
        with np.errstate(all="ignore"):
            match defect:
                case "nan" | "inf" | "-inf":
                    m[i, j] = float(defect)
                case "negative":
                    m[i, j] = -draw(st.integers(1, 5))
                case "fraction":
                    m[i, j] += 0.5
                case "huge":
                    m[i, j] = 1e9
                case "float32 max":
                    m[i, j] = 3e38
                case "log-normalised":
                    m = np.log1p(1e4 * m / np.maximum(m.sum(1, keepdims=True), 1.0))
                case "centred":
                    m = m - m.mean(0)
    return m


def _holds(dtype, m: np.ndarray) -> bool:
    """Whether ``dtype`` holds the values of ``m`` (floats hold all: a float16 may overflow to
    inf or round, which the oracle then sees)."""
    if np.dtype(dtype).kind == "f":
        return True
    info = np.iinfo(dtype)
    return bool(np.isfinite(m).all() and (m == np.rint(m)).all()
                and (m.size == 0 or (m.min() >= info.min and m.max() <= info.max)))


@st.composite
def stored(draw, m: np.ndarray):
    """``m`` in a dtype that holds it, dense, CSR or CSC (scipy has no float16 sparse)."""
    dtype = draw(st.sampled_from([d for d in DTYPES if _holds(d, m)]))
    with np.errstate(all="ignore"):
        m = m.astype(dtype)
    storage = draw(st.sampled_from(STORAGES if m.dtype != np.float16 else ("dense",)))
    if storage == "dense":
        return m
    return sp.csr_matrix(m) if storage == "csr" else sp.csc_matrix(m)


@st.composite
def labels(draw, n_cells: int, damage: str | None) -> pd.Series:
    """1-4 types dealt round the cells, as strings or numbers; ``damage`` removes some or all."""
    n_types = draw(st.sampled_from([3, 2, 4, 1]))  # shrinks towards an ordinary atlas
    codes = np.arange(n_cells) % n_types
    hit = np.zeros(n_cells, dtype=bool)
    if damage is not None and damage.startswith("some"):
        some = draw(st.sets(st.integers(0, n_cells - 1), min_size=1, max_size=n_cells // 3))
        hit[sorted(some)] = True
    elif damage is not None:
        hit[:] = True
    if draw(st.booleans()):  # numeric labels: a missing one is NaN, there is no empty number
        values = codes.astype(np.float64)
        values[hit] = np.nan
        return pd.Series(values)
    names = np.array([f"type {c}" for c in codes], dtype=object)
    names[hit] = np.nan if damage is not None and damage.endswith("missing") else ""
    return pd.Series(pd.Categorical(names))


@dataclass
class Example:
    adata: ad.AnnData
    what: str  # the recipe, shown when a property fails


@st.composite
def examples(draw) -> Example:
    """An AnnData of 6-40 cells x the model's 30 genes, clean or spoilt in one or two ways."""
    n_cells = draw(st.integers(6, 40))
    m = draw(counts(n_cells))
    defects, damage = set(), None
    if draw(st.booleans()):  # the other half is clean: those examples must work
        defects = draw(st.sets(st.sampled_from(VALUE_DEFECTS + SHAPE_DEFECTS), min_size=1,
                               max_size=2))
        damage = draw(st.sampled_from((None, *LABEL_DAMAGE)))
    m = draw(spoilt(m, frozenset(defects) & set(VALUE_DEFECTS)))
    cell_type = draw(labels(n_cells, damage))
    cells, genes = [f"c{i}" for i in range(n_cells)], list(GENES)
    if draw(st.booleans()):  # duplicate cell names are made unique, not refused
        cells[1] = cells[0]
    if "duplicate gene" in defects:
        genes[1] = genes[0]
    if "no cells" in defects:
        m, cell_type, cells = m[:0], cell_type[:0], []
    if "no genes" in defects:
        m, genes = m[:, :0], []
    X = draw(stored(m))
    obs = pd.DataFrame({"cell_type": cell_type.array}, index=pd.Index(cells, dtype=object))
    with warnings.catch_warnings():  # anndata warns of the duplicate names
        warnings.simplefilter("ignore")
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    return Example(adata, f"{type(X).__name__} {X.dtype} {X.shape}, defects {sorted(defects)}, "
                          f"label damage {damage}, first cells {cells[:2]}")


# ------------------------------------------------------------------ the oracle


def _dense(X) -> np.ndarray:
    return (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64)


def _labelled(adata: ad.AnnData) -> np.ndarray:
    values = adata.obs["cell_type"]
    return ~(values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy())


def _value_problem(m: np.ndarray) -> str | None:
    if m.size == 0:
        return None
    if not np.isfinite(m).all():
        return "NaN or infinite"
    if m.min() < 0:
        return "negative"
    if m.max() > LARGEST_COUNT:
        return "above 2**24"
    if (np.abs(m - np.rint(m)) > INTEGER_TOLERANCE).any():
        return "not whole numbers"
    return None


def _type_counts(adata: ad.AnnData) -> list[int]:
    keep = _labelled(adata)
    return sorted(adata.obs["cell_type"][keep].astype(str).value_counts().tolist(), reverse=True)


def _split_too_small(type_counts: list[int]) -> bool:
    """Whether the K-th type (or the rarest, when fewer) would leave val or test empty."""
    n = min(type_counts[:SPLIT_K][-1], SPLIT_CAP)
    n_val = round(n * 0.1)  # as train/val/test are cut: val and test rounded, train the rest
    return n_val < 1 or n - 2 * n_val < 1


def _problems(adata: ad.AnnData, entry: str) -> list[str]:
    """Why ``entry`` ("fit", "split", "annotate") must refuse ``adata``; [] if it must work."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        return ["empty"]
    found = []
    if adata.var_names.has_duplicates:
        found.append("duplicate genes")
    # fit and split leave unlabelled cells out before checking the values; annotate reads all
    rows = _labelled(adata) if entry != "annotate" else np.ones(adata.n_obs, dtype=bool)
    if entry != "annotate" and not rows.any():
        return [*found, "no label"]
    if problem := _value_problem(_dense(adata.X)[rows]):
        found.append(problem)
    if entry == "fit" and sum(n >= 2 for n in _type_counts(adata)) < 2:
        found.append("fewer than 2 types with 2+ cells")
    if entry == "split" and _split_too_small(_type_counts(adata)):
        found.append("a type too small to split")
    return found


def _expect(worked: bool, problems: list[str], detail: str) -> None:
    event(f"{'worked' if worked else 'refused'}: {problems[0] if problems else 'valid'}")
    if problems:
        assert not worked, f"accepted although {problems}"
    else:
        assert worked, f"refused a valid example: {detail}"


# ------------------------------------------------------------------ helpers


def _write(adata: ad.AnnData, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    return path


def _cli(argv) -> tuple[int, str]:
    """Run the command line; (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _assert_clean_exit(code: int, err: str, out: Path) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].strip(), f"a refusal must be one line, got: {err!r}"
        _nothing_at(out)


def _nothing_at(path: Path) -> None:
    """No output file / folder content at ``path``, and no temporary file beside it."""
    if path.is_dir():
        assert not any(path.iterdir()), sorted(p.name for p in path.rglob("*"))
    else:
        assert not path.exists(), path
    if path.parent.exists():
        assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def _same_matrix(a, b) -> bool:
    return (type(a) is type(b) and a.dtype == b.dtype
            and np.array_equal(_dense(a), _dense(b), equal_nan=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny ONNX annotator and the split params file, shared by every example."""
    root = tmp_path_factory.mktemp("malformed")
    (root / "params.yaml").write_text(SPLIT_PARAMS)
    return {"model": tiny_onnx.build_model(root / "tiny.onnx"), "params": root / "params.yaml"}


# ------------------------------------------------------------------ the properties


@SETTINGS
@given(example=examples())
def test_split_works_or_refuses_in_one_line(example, files):
    with tempfile.TemporaryDirectory() as tmp:
        atlas, out = _write(example.adata, Path(tmp) / "atlas.h5ad"), Path(tmp) / "split"
        code, err = _cli(["split", "--atlas", atlas, "--setting", "default", "--seed", "0",
                          "--out-dir", out, "--params", files["params"]])
        _assert_clean_exit(code, err, out)
        if code == 0:
            assert (out / "split.json").is_file()
            assert all((out / f"{part}.h5ad").is_file() for part in PARTS)
        _expect(code == 0, _problems(example.adata, "split"), err)


@SETTINGS
@given(example=examples())
def test_annotate_command_works_or_refuses_in_one_line(example, files):
    with tempfile.TemporaryDirectory() as tmp:
        query = _write(example.adata, Path(tmp) / "query.h5ad")
        out = Path(tmp) / "out" / "annotated.h5ad"
        code, err = _cli(["annotate", files["model"], query, "--out", out])
        _assert_clean_exit(code, err, out)
        if code == 0:
            assert ad.read_h5ad(out).n_obs == example.adata.n_obs
        _expect(code == 0, _problems(example.adata, "annotate"), err)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="fit needs torch")
@SETTINGS
@given(example=examples())
def test_fit_returns_a_chain_or_raises_input_error(example):
    adata = example.adata
    before = adata.X.copy()
    try:
        chain = cc.fit(adata, "cell_type", params=FIT_PARAMS)
    except cc.InputError as err:
        worked, detail = False, str(err)
    else:
        assert isinstance(chain, cc.Chain)
        worked, detail = True, ""
    assert _same_matrix(adata.X, before), "fit changed the caller's matrix"
    _expect(worked, _problems(adata, "fit"), detail)


@SETTINGS
@given(example=examples())
def test_annotate_in_memory_works_or_raises_input_error(example, files):
    adata = example.adata
    obs, X = adata.obs.copy(), adata.X.copy()
    try:
        cc.annotate(adata, files["model"])
    except cc.InputError as err:
        pd.testing.assert_frame_equal(adata.obs, obs)  # a refusal leaves obs as it was
        worked, detail = False, str(err)
    else:
        assert adata.obs["cellcontrast_label"].notna().all()
        worked, detail = True, ""
    assert _same_matrix(adata.X, X), "annotate changed the caller's matrix"
    _expect(worked, _problems(adata, "annotate"), detail)

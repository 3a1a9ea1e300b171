"""Issue 7, bad input: every command that reads user data either works or refuses with one line.

One parametrized case per (command, bad input). A refusal is exit code 2, exactly one
non-empty line on stderr naming the problem, no traceback, and nothing left under the
command's --out / --out-dir. Cases the older suites already cover word for word
(tests/test_io.py for `split`, test_annotate.py `test_bad_queries` / `test_bad_model_files`,
test_export.py `test_cli_bad_sources_exit_2`, test_tuning.py
`test_bad_inputs_exit_2_with_one_line`, test_experiment.py `test_bad_params_file_is_one_line`)
are not repeated here for the same command.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellcontrast.cli.entry import main

# ------------------------------------------------------------------ helpers


def _call(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_refused(code: int, err: str, match: str | tuple[str, ...]) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # exactly one non-empty line
    for text in (match,) if isinstance(match, str) else match:
        assert text in lines[0], lines[0]


def _nothing_at(path: Path) -> None:
    """No output file / folder content at `path`, and no temporary file beside it."""
    path = Path(path)
    if path.is_dir():
        assert not any(path.iterdir()), sorted(p.name for p in path.rglob("*"))
    else:
        assert not path.exists(), path
    if path.parent.exists():
        assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def _atlas(X, labels=None, genes=None, cells=None, obs_extra=None) -> ad.AnnData:
    """A small labelled atlas: 3 types of 10 cells (t0, t1, t2) unless told otherwise."""
    n, g = X.shape
    obs = pd.DataFrame(
        {"cell_type": labels if labels is not None else [f"t{i % 3}" for i in range(n)],
         "individual": ["L3" if i % 2 else "L1" for i in range(n)]},
        index=cells if cells is not None else [f"c{i}" for i in range(n)],
    )
    for key, value in (obs_extra or {}).items():
        obs[key] = value
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes or [f"g{j}" for j in range(g)]))


def _counts(n=30, g=12, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, (n, g)).astype(np.float32)


def _write(path: Path, adata: ad.AnnData) -> Path:
    adata.write_h5ad(path)
    return path


def _truncate(path: Path, keep: float = 0.4) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class _Boom:
    """A pickle that, if ever unpickled, creates the file `marker` (it must never be)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(_Boom(marker), fh)
    return path


def _hdf5_not_anndata(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["numbers"] = np.arange(10)
    return path


# ------------------------------------------------------------------ split

SPLIT_PARAMS = (
    "settings:\n"
    "  default: {k: 3, cap: 10, equalize: true, fractions: [0.8, 0.1, 0.1]}\n"
    "  wide: {k: 10, cap: 10, equalize: true, fractions: [0.8, 0.1, 0.1]}\n"
)


def _split_bad(tmp: Path, c: np.ndarray) -> dict:
    """name -> (atlas path, extra argv, message). None of them is in tests/test_io.py."""
    good = lambda: _write(tmp / "a.h5ad", _atlas(c))  # noqa: E731
    return {
        "folder instead of file": lambda: (tmp.joinpath("dir.h5ad").mkdir() or tmp / "dir.h5ad", [], "is a folder"),
        "empty file": lambda: ((tmp / "e.h5ad").write_bytes(b"") or tmp / "e.h5ad", [], "not an .h5ad"),
        "hdf5 but not anndata": lambda: (_hdf5_not_anndata(tmp / "h.h5ad"), [], "cannot read"),
        "all labels empty": lambda: (_write(tmp / "a.h5ad", _atlas(c, labels=[""] * 30)), [], "has a label"),
        "all labels missing": lambda: (_write(tmp / "a.h5ad", _atlas(c, labels=[np.nan] * 30)), [], "has a label"),
        "negative integer counts": lambda: (_write(tmp / "a.h5ad", _atlas(sp.csr_matrix((c - 3).astype(np.int32)))), [], "negative"),
        "NaN in a layer": lambda: (_with_layer(tmp, c, np.where(c > 2, np.nan, c)), ["--layer", "counts"], "NaN"),
        "log-normalised layer": lambda: (_with_layer(tmp, c, np.log1p(c)), ["--layer", "counts"], "log-normalised"),
        "duplicate genes in .raw": lambda: (_dup_raw(tmp, c), ["--layer", "raw"], "duplicate gene"),
        "two filters match nothing together": lambda: (
            _write(tmp / "a.h5ad", _atlas(c, obs_extra={"method": ["SS2" if i % 2 else "10x" for i in range(30)]})),
            ["--filter", "individual=L1", "--filter", "method=SS2"], "together match no cell"),
        "filter without =": lambda: (good(), ["--filter", "individualL3"], "COLUMN=VALUE"),
        "type too small to split": lambda: (
            _write(tmp / "a.h5ad", _atlas(c, labels=["t0"] * 14 + ["t1"] * 14 + ["t2"] * 2)), [], "too few to split"),
        "unknown setting": lambda: (good(), ["--setting", "nosuch"], "unknown setting"),
        "missing params file": lambda: (good(), ["--params", tmp / "nope.yaml"], "no params file"),
        "params not YAML": lambda: (good(), ["--params", _text(tmp / "p.yaml", "settings: [unclosed\n")], "not valid YAML"),
    }


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _with_layer(tmp: Path, c, layer) -> Path:
    a = _atlas(c)
    a.layers["counts"] = layer
    return _write(tmp / "a.h5ad", a)


def _dup_raw(tmp: Path, c) -> Path:
    a = _atlas(np.log1p(c))
    a.raw = _atlas(c, genes=["g0", "g0"] + [f"g{j}" for j in range(2, 12)])
    return _write(tmp / "a.h5ad", a)


SPLIT_CASES = list(_split_bad(Path("/nonexistent"), np.zeros((30, 12))))


def _split_argv(atlas, out, params, extra=()):
    argv = ["split", "--atlas", atlas, "--setting", "default", "--seed", "0", "--out-dir", out, "--params", params]
    # a later --setting / --params overrides the defaults above (argparse keeps the last)
    return [*argv, *extra]


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_refuses(case, tmp_path, capsys):
    params = _text(tmp_path / "params.yaml", SPLIT_PARAMS)
    atlas, extra, message = _split_bad(tmp_path, _counts())[case]()
    out = tmp_path / "out"
    code, _, err = _call(_split_argv(atlas, out, params, extra), capsys)
    _assert_refused(code, err, message)
    _nothing_at(out)


def test_split_refuses_unreadable_file(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import h5py

    atlas = _write(tmp_path / "a.h5ad", _atlas(_counts()))
    atlas.chmod(0)
    if os.geteuid() == 0:  # root reads files whatever their mode: give it the kernel's refusal
        real = h5py.is_hdf5

        def refuse(path):
            if Path(path) == atlas:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path)

        monkeypatch.setattr(h5py, "is_hdf5", refuse)
    out = tmp_path / "out"
    code, _, err = _call(_split_argv(atlas, out, _text(tmp_path / "p.yaml", SPLIT_PARAMS)), capsys)
    _assert_refused(code, err, "cannot read")
    _nothing_at(out)


def _matrix(kind: str, c: np.ndarray):
    dtype = {"int": np.int32, "float": np.float32, "float64": np.float64, "uint16": np.uint16}[kind.split("-")[0]]
    m = c.astype(dtype)
    return sp.csr_matrix(m) if kind.endswith("sparse") else (sp.csc_matrix(m) if kind.endswith("csc") else m)


MATRIX_KINDS = ["int-dense", "int-sparse", "float-dense", "float-sparse", "float64-csc", "uint16-dense"]


@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_split_accepts_any_count_matrix(kind, tmp_path, capsys):
    c = _counts()
    atlas = _write(tmp_path / "a.h5ad", _atlas(_matrix(kind, c)))
    out = tmp_path / "out"
    code, stdout, err = _call(_split_argv(atlas, out, _text(tmp_path / "p.yaml", SPLIT_PARAMS)), capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["k"] == 3
    parts = {p: ad.read_h5ad(out / f"{p}.h5ad") for p in ("train", "val", "test")}
    assert [parts[p].n_obs for p in ("train", "val", "test")] == [24, 3, 3]
    for part in parts.values():  # the same counts, whatever the input's storage
        rows = [int(name[1:]) for name in part.obs_names]
        np.testing.assert_array_equal(part.X.toarray(), c[rows])


def test_split_k_larger_than_types_works_with_a_warning(tmp_path, capsys):
    atlas = _write(tmp_path / "a.h5ad", _atlas(_counts()))
    out = tmp_path / "out"
    params = _text(tmp_path / "p.yaml", SPLIT_PARAMS)
    code, stdout, err = _call(_split_argv(atlas, out, params, ["--setting", "wide"]), capsys)
    assert code == 0, err
    assert "warning: K=10 but the atlas has 3 types; using all 3" in err
    assert json.loads(stdout.strip().splitlines()[-1])["k"] == 3
    assert json.loads((out / "split.json").read_text())["k_requested"] == 10


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_split_numeric_labels_duplicate_cells_and_some_empty_labels_work(tmp_path, capsys):
    labels = [float(i % 3) for i in range(33)]
    labels[-3:] = [np.nan, np.nan, np.nan]  # three unlabelled cells: left out, with a note
    cells = [f"c{i % 31}" for i in range(33)]  # two duplicate cell names: made unique, with a note
    atlas = _write(tmp_path / "a.h5ad", _atlas(_counts(33), labels=labels, cells=cells))
    out = tmp_path / "out"
    code, _, err = _call(_split_argv(atlas, out, _text(tmp_path / "p.yaml", SPLIT_PARAMS)), capsys)
    assert code == 0, err
    assert "3 cells without a label" in err
    info = json.loads((out / "split.json").read_text())
    assert sorted(info["classes"]) == ["0.0", "1.0", "2.0"]
    names = [n for p in ("train", "val", "test") for n in ad.read_h5ad(out / f"{p}.h5ad").obs_names]
    assert len(names) == len(set(names)) == 30


# ------------------------------------------------------------------ train and tune: damaged split folders


def _copy_split(tiny_split: Path, tmp: Path) -> Path:
    dst = tmp / "split"
    shutil.copytree(tiny_split, dst)
    return dst


def _rewrite_part(split: Path, part: str, change) -> None:
    a = ad.read_h5ad(split / f"{part}.h5ad")
    a = change(a)
    (split / f"{part}.h5ad").unlink()
    a.write_h5ad(split / f"{part}.h5ad")


def _reverse_genes(a):
    return a[:, a.var_names[::-1]].copy()


def _foreign_labels(a):
    a.obs["cell_type"] = pd.Categorical(["Martian cell"] * a.n_obs)
    return a


def _drop_key(split: Path, key: str) -> None:
    info = json.loads((split / "split.json").read_text())
    del info[key]
    (split / "split.json").write_text(json.dumps(info))


SPLIT_DAMAGE = {
    # name: (damage(split_dir) -> split_dir to pass, message)
    "split folder missing": (lambda s: s.parent / "no_such_split", "not a split folder"),
    "no split.json": (lambda s: (s / "split.json").unlink() or s, "not a split folder"),
    "split.json not JSON": (lambda s: _text(s / "split.json", "{not json") and s, "split.json"),
    "split.json without classes": (lambda s: _drop_key(s, "classes") or s, "split.json"),
    "train.h5ad missing": (lambda s: (s / "train.h5ad").unlink() or s, "no such file"),
    "val.h5ad truncated": (lambda s: _truncate(s / "val.h5ad") and s, "val.h5ad"),
    "train.h5ad not h5ad": (lambda s: _text(s / "train.h5ad", "gene,cell\n") and s, "not an .h5ad"),
    "val.h5ad other genes": (lambda s: _rewrite_part(s, "val", _reverse_genes) or s, "other genes"),
    "train.h5ad foreign labels": (lambda s: _rewrite_part(s, "train", _foreign_labels) or s, "outside split.json"),
}
# Already in tests/test_experiment.py (train) and tests/test_tuning.py (tune), verbatim.
_COVERED = {("train", "no split.json"), ("tune", "split folder missing")}
TRAIN_TUNE_CASES = [(cmd, case) for cmd in ("train", "tune") for case in SPLIT_DAMAGE if (cmd, case) not in _COVERED]


def _store_runs(tmp: Path) -> int:
    db = tmp / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet
            return 0


def _train_argv(split, tmp, *extra):
    return ["train", "--split-dir", split, "--base", "lr", "--out-dir", tmp / "models", *extra]


def _tune_argv(split, tmp, *extra):
    return ["tune", "--split-dir", split, "--base", "lr", "--n-trials", "1",
            "--storage", f"sqlite:///{tmp}/optuna.db", "--out", tmp / "best.json", *extra]


@pytest.mark.parametrize(("command", "case"), TRAIN_TUNE_CASES)
def test_train_and_tune_refuse_damaged_split(command, case, tiny_split, tmp_path, mlflow_store, capsys):
    damage, message = SPLIT_DAMAGE[case]
    split = damage(_copy_split(tiny_split, tmp_path))
    params = _text(tmp_path / "params.json", json.dumps({"lr": {"epochs": 1}}))
    if command == "train":
        argv = _train_argv(split, tmp_path, "--params", params)
    else:
        argv = _tune_argv(split, tmp_path, "--params", _text(tmp_path / "p.yaml", "tune: {seed: 0}\n"))
    code, _, err = _call(argv, capsys)
    _assert_refused(code, err, message)
    _nothing_at(tmp_path / ("models" if command == "train" else "best.json"))
    assert _store_runs(tmp_path) == 0


TRAIN_PARAMS = {
    "missing file": (None, "no such params file"),
    "not JSON": ("{lr: 1", "not valid JSON"),
    "a list": ("[1, 2]", "must map model names"),
    "unknown model": ('{"rf": {"C": 1}}', "unknown model 'rf'"),
    "wrong value type": ('{"lr": {"epochs": "many"}}', "epochs"),
    "negative epochs": ('{"lr": {"epochs": -3}}', "epochs"),
}


@pytest.mark.parametrize("case", list(TRAIN_PARAMS))
def test_train_refuses_bad_params_file(case, tiny_split, tmp_path, mlflow_store, capsys):
    text, message = TRAIN_PARAMS[case]
    params = tmp_path / "params.json"
    if text is not None:
        params.write_text(text)
    code, _, err = _call(_train_argv(tiny_split, tmp_path, "--params", params), capsys)
    _assert_refused(code, err, message)
    _nothing_at(tmp_path / "models")
    assert _store_runs(tmp_path) == 0


TUNE_PARAMS = {
    "not YAML": ("tune: {seed: [unclosed\n", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "mapping"),
    "tune not a mapping": ("tune: [1, 2]\n", "`tune` must be a mapping"),
    "seed not a number": ("tune: {seed: abc}\n", "tune.seed"),
    "unknown hyperparameter": ("tune: {mlp: {nonsense: [1, 2]}}\n", "nonsense"),
    "reversed range": ("tune: {lr: {lr: [0.1, 0.01]}}\n", "lr"),
    "unknown fixed parameter": ("model_params: {lr: {no_such_knob: 1}}\n", "no_such_knob"),
}


@pytest.mark.parametrize("case", list(TUNE_PARAMS))
def test_tune_refuses_bad_params_file(case, tiny_split, tmp_path, mlflow_store, capsys):
    text, message = TUNE_PARAMS[case]
    params = _text(tmp_path / "params.yaml", text)
    component = "mlp" if "hyperparameter" in case else "none"
    code, _, err = _call(_tune_argv(tiny_split, tmp_path, "--params", params, "--component", component), capsys)
    _assert_refused(code, err, message)
    _nothing_at(tmp_path / "best.json")
    assert _store_runs(tmp_path) == 0


def test_train_accepts_dense_integer_parts(tiny_split, tmp_path, mlflow_store, capsys):
    """A hand-made split whose parts hold dense int32 counts trains like the float CSR one."""
    split = _copy_split(tiny_split, tmp_path)
    for part in ("train", "val", "test"):
        _rewrite_part(split, part, lambda a: ad.AnnData(X=a.X.toarray().astype(np.int32), obs=a.obs, var=a.var))
    params = _text(tmp_path / "params.json", json.dumps({"lr": {"epochs": 2}}))
    code, stdout, err = _call(_train_argv(split, tmp_path, "--params", params), capsys)
    assert code == 0, err
    row = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    assert row["test_top1"] > 0.5
    assert (tmp_path / "models" / "lr-none" / "chain.pt").exists()


# ------------------------------------------------------------------ benchmark: refuse before any training

BENCH_PARAMS = (
    "settings:\n"
    "  default: {k: 3, cap: 10}\n"
    "  scarce: {k: 3, cap: 2}\n"  # 2 cells per type: too few to split 80/10/10
    "grid: {bases: [lr], components: [none], workers: 1}\n"
    "model_params:\n"
    "  lr: {epochs: 1}\n"
)


def _bench_bad(tmp: Path, c: np.ndarray) -> dict:
    good = lambda: _write(tmp / "a.h5ad", _atlas(c))  # noqa: E731
    return {
        "missing atlas": lambda: (tmp / "nope.h5ad", [], "no such file"),
        "atlas not h5ad": lambda: (_text(tmp / "a.h5ad", "cell,gene\n"), [], "not an .h5ad"),
        "truncated atlas": lambda: (_truncate(_write(tmp / "a.h5ad", _atlas(c))), [], "h5ad"),
        "bad label key": lambda: (good(), ["--label-key", "celltype"], "no label column 'celltype'"),
        "missing layer": lambda: (good(), ["--layer", "counts"], "no layer 'counts'"),
        "log-normalised atlas": lambda: (_write(tmp / "a.h5ad", _atlas(np.log1p(c))), [], "log-normalised"),
        "infinite values": lambda: (_write(tmp / "a.h5ad", _atlas(np.where(c > 3, np.inf, c))), [], "infinite"),
        "duplicate genes": lambda: (_write(tmp / "a.h5ad", _atlas(c, genes=["g1"] * 12)), [], "duplicate gene"),
        "filter matches nothing": lambda: (good(), ["--filter", "individual=L9"], "matches no cell"),
        "unknown setting": lambda: (good(), ["--settings", "default,nosuch"], "unknown setting 'nosuch'"),
        "second setting too small to split": lambda: (good(), ["--settings", "default,scarce"], "too few to split"),
        "zero seeds": lambda: (good(), ["--seeds", "0"], "--seeds"),
        "unknown model parameter": lambda: (
            good(), ["--params", _text(tmp / "p2.yaml", BENCH_PARAMS + "  mlp: {no_such_knob: 1}\n")], "no_such_knob"),
    }


BENCH_CASES = list(_bench_bad(Path("/nonexistent"), np.zeros((30, 12))))


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("case", BENCH_CASES)
def test_benchmark_refuses_before_training(case, tmp_path, mlflow_store, capsys):
    params = _text(tmp_path / "params.yaml", BENCH_PARAMS)
    atlas, extra, message = _bench_bad(tmp_path, _counts())[case]()
    out = tmp_path / "bench"
    argv = ["benchmark", "--atlas", atlas, "--out-dir", out, "--params", params, "--settings", "default",
            "--seeds", "1", *extra]
    code, _, err = _call(argv, capsys)
    _assert_refused(code, err, message)
    _nothing_at(out)  # no split, no model, no results
    assert _store_runs(tmp_path) == 0  # nothing was trained


# ------------------------------------------------------------------ annotate

def _ta():
    """tests/tiny_onnx.py's tiny ONNX model and query writers (onnx, onnxruntime needed)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import tiny_onnx

    return tiny_onnx


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _ta().build_model(tmp_path_factory.mktemp("bad_input_model") / "tiny.onnx")


def _partial_metadata_model(path: Path) -> Path:
    import onnx

    _ta().build_model(path)
    model = onnx.load_model(str(path))
    keep = [p for p in model.metadata_props if p.key != "classes"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save_model(model, str(path))
    return path


def _annotate_bad(tmp: Path, model: Path) -> dict:
    """name -> () -> (model, query, extra argv, message). None is in test_annotate.py verbatim."""
    ta = _ta()
    MODEL_GENES, write_query = ta.MODEL_GENES, ta.write_query  # noqa: N806
    counts = ta.make_counts(40, len(MODEL_GENES), seed=3)
    good = lambda: write_query(tmp / "q.h5ad", counts, MODEL_GENES)  # noqa: E731
    inf = counts.copy()
    inf[7, 4] = np.inf
    return {
        "query missing": lambda: (model, tmp / "nope.h5ad", [], "does not exist"),
        "query is a folder": lambda: (model, tmp.joinpath("q.h5ad").mkdir() or tmp / "q.h5ad", [], "q.h5ad"),
        "query truncated": lambda: (model, _truncate(good()), [], "q.h5ad"),
        "query hdf5 but not anndata": lambda: (model, _hdf5_not_anndata(tmp / "q.h5ad"), [], "no X matrix"),
        "infinite values": lambda: (model, write_query(tmp / "q.h5ad", inf, MODEL_GENES), [], "NaN or infinite"),
        "no .raw": lambda: (model, good(), ["--layer", "raw"], "raw"),
        "label key missing": lambda: (model, good(), ["--label-key", "cell_type"], "--label-key 'cell_type'"),
        "partial overlap below --min-overlap": lambda: (
            model, write_query(tmp / "q.h5ad", counts[:, :10], MODEL_GENES[:10]), [],
            "only 10 of 30 model genes (33.3%)"),
        "case-only overlap": lambda: (
            model, write_query(tmp / "q.h5ad", counts, [g.lower() for g in MODEL_GENES]), [], "--case-insensitive"),
        "out is the query": lambda: (model, good(), ["--out", tmp / "q.h5ad"], "the query file itself"),
        "batch size 0": lambda: (model, good(), ["--batch-size", "0"], "--batch-size"),
        "min-confidence above 1": lambda: (model, good(), ["--min-confidence", "2"], "--min-confidence"),
        "flag-unseen without an energy output": lambda: (model, good(), ["--flag-unseen"],
                                                          "--flag-unseen energy needs a model exported with its energy"),
        "model empty file": lambda: (_text(tmp / "empty.onnx", ""), good(), [], "not a readable ONNX model"),
        "model is a folder": lambda: (tmp.joinpath("m.onnx").mkdir() or tmp / "m.onnx", good(), [], "not a file"),
        "model is a pickle": lambda: (_malicious_pickle(tmp / "m.pt", tmp / "PWNED"), good(), [],
                                      "not a readable ONNX model"),
        "model metadata partial": lambda: (_partial_metadata_model(tmp / "m.onnx"), good(), [],
                                           "without cellcontrast metadata ('classes' missing)"),
    }


ANNOTATE_CASES = list(_annotate_bad(Path("/nonexistent"), Path("/nonexistent")))


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("case", ANNOTATE_CASES)
def test_annotate_refuses(case, model_path, tmp_path, capsys):
    model, query, extra, message = _annotate_bad(tmp_path, model_path)[case]()
    out = tmp_path / "out" / "annotated.h5ad"
    query_bytes = Path(query).read_bytes() if Path(query).is_file() else None
    argv = ["annotate", model, query, "--out", out, "--csv", tmp_path / "out" / "annotated.csv", *extra]
    code, _, err = _call(argv, capsys)
    _assert_refused(code, err, message)
    _nothing_at(out)
    _nothing_at(tmp_path / "out" / "annotated.csv")
    if query_bytes is not None:
        assert Path(query).read_bytes() == query_bytes  # the input is untouched
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


@pytest.mark.parametrize("kind", ["int-dense", "int-sparse", "float-dense", "float-sparse", "uint16-dense"])
def test_annotate_accepts_any_count_matrix(kind, model_path, tmp_path, capsys):
    ta = _ta()
    MODEL_GENES = ta.MODEL_GENES  # noqa: N806
    counts = ta.make_counts(25, len(MODEL_GENES), seed=4)
    query = tmp_path / "q.h5ad"
    adata = ad.AnnData(X=_matrix(kind, counts), var=pd.DataFrame(index=MODEL_GENES),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(25)]))
    adata.write_h5ad(query)
    out = tmp_path / "out.h5ad"
    code, _, err = _call(["annotate", model_path, query, "--out", out], capsys)
    assert code == 0, err
    got = ad.read_h5ad(out).obs["cellcontrast_confidence"].to_numpy()
    np.testing.assert_allclose(got, ta.reference_proba(counts).max(1), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_annotate_duplicate_cells_numeric_labels_partial_overlap_work(model_path, tmp_path, capsys):
    ta = _ta()
    MODEL_GENES = ta.MODEL_GENES  # noqa: N806
    counts = ta.make_counts(20, len(MODEL_GENES), seed=7)
    keep = slice(0, 24)  # 24 of 30 genes: above --min-overlap 0.5
    obs = pd.DataFrame({"cell_type": np.arange(20) % 4}, index=["dup"] * 10 + [f"c{i}" for i in range(10)])
    query = ta.write_query(tmp_path / "q.h5ad", counts[:, keep], MODEL_GENES[keep], obs=obs)
    out = tmp_path / "out.h5ad"
    code, stdout, err = _call(["annotate", model_path, query, "--out", out, "--label-key", "cell_type"], capsys)
    assert code == 0, err
    assert "found 24 of 30 model genes" in stdout
    assert "no cell's obs['cell_type'] label is among the model's classes" in stdout
    res = ad.read_h5ad(out)
    assert res.n_obs == 20 and res.obs["cellcontrast_label"].notna().all()


# ------------------------------------------------------------------ export

def _real_chain_dir(path: Path) -> Path:
    """A real (untrained) LR chain saved by cellcontrast.chain.save_chain."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from cellcontrast.nn.bases import LogisticRegression
    from cellcontrast.nn.chain import ChainModule, save_chain
    from cellcontrast.nn.preprocessing import fit_preprocess

    counts = _ta().make_counts(50, 40, seed=1)
    torch.manual_seed(0)
    lr = LogisticRegression(fit_preprocess("lr", counts, n_hvg=20), 3)
    chain = ChainModule(lr.preprocess, lr.encoder, None, lr.head)
    return save_chain(chain, {"genes": [f"g{i}" for i in range(40)], "class_names": ["a", "b", "c"]}, path)


def _torch_save(obj, path: Path) -> None:
    import torch

    torch.save({k: torch.tensor(v) for k, v in obj.items()}, path)


def _edit_config(d: Path, change) -> Path:
    config = json.loads((d / "config.json").read_text())
    change(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


EXPORT_DIR_DAMAGE = {
    "chain.pt truncated": (lambda d: _truncate(d / "chain.pt") and d, "cannot load the chain"),
    "chain.pt not torch": (lambda d: _text(d / "chain.pt", "weights\n") and d, "cannot load the chain"),
    "chain.pt a pickle": (lambda d: _malicious_pickle(d / "chain.pt", d.parent / "PWNED") and d, "cannot load the chain"),
    "chain.pt other shapes": (
        lambda d: _torch_save({"x": [0.0, 1.0]}, d / "chain.pt") or d, "cannot load the chain"),
    "config.json not JSON": (lambda d: _text(d / "config.json", "{oops") and d, "cannot load the chain"),
    "config.json without modules": (lambda d: _edit_config(d, lambda c: c.pop("modules")), "cannot load the chain"),
    "config.json unknown module": (
        lambda d: _edit_config(d, lambda c: c["modules"]["head"].update({"class": "os.system"})),
        "unknown module class"),
    "config.json wrong gene count": (
        lambda d: _edit_config(d, lambda c: c.update(genes=c["genes"][:5])), "genes"),
    "chain.pt missing": (lambda d: (d / "chain.pt").unlink() or d, "chain.pt"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", list(EXPORT_DIR_DAMAGE))
def test_export_refuses_damaged_model_dir(case, tmp_path, capsys):
    damage, message = EXPORT_DIR_DAMAGE[case]
    model_dir = damage(_real_chain_dir(tmp_path / "chain"))
    out = tmp_path / "out" / "m.onnx"
    code, _, err = _call(["export", "--model-dir", model_dir, "--out", out, "--no-register"], capsys)
    _assert_refused(code, err, message)
    _nothing_at(out)
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled


def test_export_works_on_the_undamaged_dir(tmp_path, capsys):
    model_dir = _real_chain_dir(tmp_path / "chain")
    out = tmp_path / "out" / "m.onnx"
    code, stdout, err = _call(["export", "--model-dir", model_dir, "--out", out, "--no-register"], capsys)
    assert code == 0, err
    assert out.exists() and f"exported {out}" in stdout


@pytest.fixture
def chain_run(tmp_path, mlflow_store):
    """An MLflow experiment 'exp' with one FINISHED run (setting=default) holding a chain."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("exp")
    model_dir = _real_chain_dir(tmp_path / "chain")
    with mlflow.start_run(tags={"setting": "default", "seed": "0"}) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="chain")
        mlflow.log_metric("val_macro_f1", 0.5)
    with mlflow.start_run() as bare:  # a run without a chain
        mlflow.log_metric("val_macro_f1", 0.1)
    return run.info.run_id, bare.info.run_id


EXPORT_SOURCE = {
    "out not .onnx": (lambda ids: ["--run-id", ids[0]], "m.h5ad", "should end in .onnx"),
    "unknown run id": (lambda ids: ["--run-id", "0" * 32], "m.onnx", "unknown MLflow run id"),
    "run without chain": (lambda ids: ["--run-id", ids[1]], "m.onnx", "no 'chain' artifact"),
    "--best filter matches nothing": (lambda ids: ["--best", "--experiment", "exp", "--setting", "nosuch"], "m.onnx",
                                      "no FINISHED run"),
}


@pytest.mark.parametrize("case", list(EXPORT_SOURCE))
def test_export_refuses_bad_source(case, chain_run, tmp_path, capsys):
    source, name, message = EXPORT_SOURCE[case]
    out = tmp_path / "out" / name
    code, _, err = _call(["export", *source(chain_run), "--out", out, "--no-register"], capsys)
    _assert_refused(code, err, message)
    _nothing_at(out)

"""`annotate model 'shards/*.h5ad' --out-dir out/`: one output per input, a summary, workers."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("onnxruntime")

from cellcontrast.annotation import annotate_file  # noqa: E402
from cellcontrast.annotation.batch import annotate_files  # noqa: E402
from cellcontrast.cli.entry import main  # noqa: E402
from cellcontrast.core.errors import InputError  # noqa: E402
from tiny_onnx import CLASSES, MODEL_GENES, build_model, make_counts, reference_proba, write_query  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    counts = {}
    for i, n in enumerate((40, 25, 33)):
        counts[f"s{i}"] = make_counts(n, len(MODEL_GENES), seed=i)
        write_query(folder / f"s{i}.h5ad", counts[f"s{i}"], MODEL_GENES)
    return folder, counts


def test_every_shard_gets_its_output_and_a_summary_row(model_path, shards, tmp_path, capsys):
    folder, counts = shards
    out = tmp_path / "out"
    assert main(["annotate", str(model_path), str(folder / "*.h5ad"), "--out-dir", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["query"]) == [str(folder / f"s{i}.h5ad") for i in range(3)]
    assert list(summary["n_cells"]) == [40, 25, 33] and summary["error"].isna().all()
    for name, x in counts.items():
        got = ad.read_h5ad(out / f"{name}.h5ad")
        assert list(got.obs["cellcontrast_top1"]) == [CLASSES[i] for i in reference_proba(x).argmax(1)]
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # one line per input


def test_two_workers_give_the_same_outputs_as_one(model_path, shards, tmp_path):
    folder, _ = shards
    one = annotate_files(model_path, [str(folder / "*.h5ad")], tmp_path / "one", log=lambda m: None)
    two = annotate_files(model_path, [str(folder / "*.h5ad")], tmp_path / "two", workers=2, log=lambda m: None)
    pd.testing.assert_frame_equal(one[["query", "n_cells", "genes_found"]], two[["query", "n_cells", "genes_found"]])
    for name in ("s0", "s1", "s2"):
        a, b = ad.read_h5ad(tmp_path / "one" / f"{name}.h5ad"), ad.read_h5ad(tmp_path / "two" / f"{name}.h5ad")
        pd.testing.assert_frame_equal(a.obs, b.obs)
    single = tmp_path / "single.h5ad"
    annotate_file(model_path, folder / "s1.h5ad", single, log=lambda m: None)
    pd.testing.assert_frame_equal(ad.read_h5ad(single).obs, ad.read_h5ad(tmp_path / "one" / "s1.h5ad").obs)


def test_a_bad_shard_is_reported_and_the_others_are_written(model_path, shards, tmp_path, capsys):
    folder, _ = shards
    write_query(folder / "s3.h5ad", make_counts(10, 5), [f"Other{i}" for i in range(5)])  # no model gene
    out = tmp_path / "out"
    assert main(["annotate", str(model_path), str(folder / "*.h5ad"), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 4 queries failed" in err and "s3.h5ad" in err
    summary = pd.read_csv(out / "summary.csv")
    assert summary.set_index("query")["error"].notna().to_dict() == {
        str(folder / f"s{i}.h5ad"): i == 3 for i in range(4)}
    assert sorted(p.name for p in out.iterdir()) == ["s0.h5ad", "s1.h5ad", "s2.h5ad", "summary.csv"]


@pytest.mark.parametrize("argv, message", [
    (["{folder}/*.h5ad", "--out", "{tmp}/a.h5ad"], "need --out-dir"),
    (["{folder}/*.h5ad", "--out-dir", "{tmp}/o", "--csv", "{tmp}/a.csv"], "--csv and --plots take one query"),
    (["{folder}/s0.h5ad", "--out", "{tmp}/a.h5ad", "--workers", "0"], "at least 1"),
    (["{folder}/none*.h5ad", "--out-dir", "{tmp}/o"], "no query file matches"),
    (["{folder}/s0.h5ad", "--out-dir", "{tmp}/o", "--workers", "0"], "at least 1"),
])
def test_bad_batch_options_are_one_line(model_path, shards, tmp_path, capsys, argv, message):
    folder, _ = shards
    argv = [a.format(folder=folder, tmp=tmp_path) for a in argv]
    assert main(["annotate", str(model_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "a.h5ad").exists() and not (tmp_path / "o" / "summary.csv").exists()


def test_one_query_shared_among_workers_gives_the_same_output(model_path, tmp_path):
    """`--workers 2` with one query: its rows split into ranges, the parts joined in order."""
    from cellcontrast.annotation.row_ranges import row_ranges

    assert row_ranges(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)] and row_ranges(2, 8) == [(0, 1), (1, 2)]
    x = make_counts(203, len(MODEL_GENES), seed=5)
    query = write_query(tmp_path / "big.h5ad", x, MODEL_GENES, compression="gzip")
    kw = {"batch_size": 16, "probabilities": True, "log": lambda m: None}
    annotate_file(model_path, query, tmp_path / "one.h5ad", **kw)
    assert main(["annotate", str(model_path), str(query), "--out", str(tmp_path / "two.h5ad"), "--workers", "2",
                 "--batch-size", "16", "--probabilities"]) == 0
    one, two = ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "two.h5ad")
    pd.testing.assert_frame_equal(one.obs, two.obs)
    np.testing.assert_array_equal(one.obsm["cellcontrast_probabilities"], two.obsm["cellcontrast_probabilities"])


def test_a_bad_row_range_fails_the_whole_query_and_writes_nothing(model_path, tmp_path):
    x = make_counts(120, len(MODEL_GENES), seed=6).astype(np.float32)
    x[110, 3] = 0.5  # not a count, in the last range only
    query = write_query(tmp_path / "bad.h5ad", x, MODEL_GENES)
    with pytest.raises(InputError, match="not"):
        annotate_file(model_path, query, tmp_path / "out.h5ad", workers=2, batch_size=16, log=lambda m: None)
    assert not (tmp_path / "out.h5ad").exists()

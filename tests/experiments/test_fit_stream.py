"""`fit` on a backed reference larger than ``max_cells_in_memory``: choices on a sample, the
linear chain refitted on every cell read in chunks, checkpoints that a killed fit resumes from."""

import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from cellcontrast.annotation.query import open_query
from cellcontrast.core.errors import InputError
from cellcontrast.data.simulate import simulate_atlas
from cellcontrast.experiments import fit_stream
from cellcontrast.experiments.fit_annotator import fit_annotator
from cellcontrast.train import linear_stream

OPTIONS = {"chains": "lr", "experiment": None, "max_cells_in_memory": 2000, "sample_cells": 1200,
           "params": {"lr": {"n_hvg": 100, "standardize": True, "max_iter": 30, "path_max_iter": 10}}}


@pytest.fixture(scope="module")
def big_reference(tmp_path_factory):
    """4,000 cells sorted by type (so that file order alone would give one-type batches), a few unlabelled."""
    atlas = simulate_atlas(n_cells=4000, n_types=10, n_genes=200, n_individuals=2, seed=3)
    atlas = atlas[np.argsort(atlas.obs["cell_type"].astype(str).to_numpy(), kind="stable")].copy()
    atlas.obs["cell_type"] = atlas.obs["cell_type"].astype(object)
    atlas.obs.iloc[:5, atlas.obs.columns.get_loc("cell_type")] = np.nan
    path = tmp_path_factory.mktemp("stream") / "reference.h5ad"
    atlas.write_h5ad(path)
    return path


def _fit(path, out=None, **kw):
    backed = ad.read_h5ad(path, backed="r")
    try:
        return fit_annotator(backed, out=out, **{**OPTIONS, **kw})
    finally:
        backed.file.close()


def _weights(result) -> dict:
    return {k: v.clone() for k, v in result.chain.module.state_dict().items()}


def test_the_chain_is_chosen_on_the_sample_and_refitted_on_every_training_cell(big_reference, tmp_path):
    result = _fit(big_reference, tmp_path / "a.onnx")
    streamed = result.chain.config["fit"]["streamed"]
    labelled = 4000 - 5
    assert 1200 <= streamed["sample_cells"] < 1500  # each type at least MIN_SAMPLE_PER_TYPE
    # every labelled cell but the sample's validation part (the temperature's cells) trains
    assert streamed["cells"] == labelled - result.n_cells["val"] and result.n_cells["reference"] == labelled
    assert streamed["losses"][-1] < streamed["losses"][0]
    assert (tmp_path / "a.onnx").exists() and "Read in chunks" in (tmp_path / "a.card.md").read_text()
    assert not (tmp_path / "a.fit-checkpoint").exists()  # removed once written
    # as good on cells it never saw as the same chain fitted in memory on every cell
    query = simulate_atlas(n_cells=4000, n_types=10, n_genes=200, n_individuals=2, seed=3)[::7]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    whole = fit_annotator(ad.read_h5ad(big_reference), **{**OPTIONS, "max_cells_in_memory": 10**9})
    for fitted in (result, whole):
        fitted.accuracy = (np.asarray(fitted.chain.classes)[fitted.chain.predict_proba(query).argmax(1)] == truth).mean()
    assert result.accuracy >= whole.accuracy - 0.02, (result.accuracy, whole.accuracy)


def test_same_seed_same_annotator(big_reference):
    a, b = _fit(big_reference), _fit(big_reference)
    assert all(torch.equal(v, _weights(b)[k]) for k, v in _weights(a).items())


def test_blocks_visit_every_training_cell_once_an_epoch_in_mixed_batches(big_reference):
    with h5py.File(big_reference, "r") as f:
        matrix = open_query(f, None)
        labels = pd.Categorical(ad.read_h5ad(big_reference, backed="r").obs["cell_type"]).codes.astype(np.int64)
        labels[::3] = -1  # left out
        blocks = fit_stream.row_blocks(matrix, labels, np.arange(200), 200)
        seen = [(x.shape[0], y) for x, y in blocks(np.random.default_rng(0))]
    ys = np.concatenate([y for _, y in seen])
    assert sorted(ys.tolist()) == sorted(labels[labels >= 0].tolist())
    assert sum(n for n, _ in seen) == (labels >= 0).sum()
    assert all(len(np.unique(y)) > 1 for _, y in seen)  # the file is sorted by type; blocks are not


def test_a_fit_killed_mid_epoch_resumes_to_the_same_annotator(big_reference, tmp_path, monkeypatch):
    whole = _fit(big_reference, tmp_path / "whole.onnx")
    real, calls = linear_stream.linear_loss, {"n": 0}

    def killed(*args, **kw):  # the process dies inside the second epoch
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(linear_stream, "linear_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        _fit(big_reference, tmp_path / "b.onnx")
    monkeypatch.setattr(linear_stream, "linear_loss", real)
    state = torch.load(tmp_path / "b.fit-checkpoint" / "lr.pt", weights_only=True)
    assert state["epoch"] == 1 and not (tmp_path / "b.onnx").exists()
    resumed = _fit(big_reference, tmp_path / "b.onnx", resume=True)
    assert resumed.chosen == whole.chosen
    assert all(torch.equal(v, _weights(resumed)[k]) for k, v in _weights(whole).items())
    assert not (tmp_path / "b.fit-checkpoint").exists()


def test_bad_streaming_options_are_refused_in_one_line(big_reference, small_atlas_path, tmp_path):
    with pytest.raises(InputError, match="--sample-cells 10"):
        _fit(big_reference, sample_cells=10)
    with pytest.raises(InputError, match="--resume needs --out"):
        _fit(big_reference, resume=True)
    with pytest.raises(InputError, match="--resume"):
        fit_annotator(ad.read_h5ad(small_atlas_path), resume=True, **{**OPTIONS, "max_cells_in_memory": 10**9})
    cli = [sys.executable, "-m", "cellcontrast", "fit", "--reference", str(small_atlas_path), "--out",
           str(tmp_path / "x.onnx"), "--chains", "lr", "--resume"]
    run = subprocess.run(cli, capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr and "--resume" in run.stderr.strip().splitlines()[-1]


def test_the_gene_statistics_by_shards_on_two_workers_give_the_same_annotator(big_reference, monkeypatch):
    """`fit --workers 2` on a reference read in chunks: a shard of rows per task (here 1,000)."""
    torch.set_num_threads(1)  # the tasks take the submitting process's threads
    monkeypatch.setattr(fit_stream, "SHARD_ROWS", 1000)
    one, two = _fit(big_reference), _fit(big_reference, workers=2)
    assert two.chosen == one.chosen
    for key, value in _weights(one).items():
        assert torch.allclose(value.float(), _weights(two)[key].float(), atol=1e-5), key


def test_a_path_with_counts_in_a_layer_streams_that_layer(big_reference, tmp_path):
    """anndata's backed mode would load every layer: a path is read by its cell table first."""
    atlas = ad.read_h5ad(big_reference)
    atlas.layers["counts"] = atlas.X.copy()
    atlas.X = atlas.X.log1p() if hasattr(atlas.X, "log1p") else np.log1p(atlas.X)
    path = tmp_path / "layered.h5ad"
    atlas.write_h5ad(path)
    result = fit_annotator(str(path), layer="counts", **OPTIONS)
    assert result.chain.config["fit"]["streamed"]["cells"] > 3000
    with pytest.raises(InputError, match="log-normalised"):
        fit_annotator(str(path), **OPTIONS)


@pytest.mark.parametrize(("chains", "streamed", "expected"), [
    (None, True, ["lr", "svm"]),  # a deep chain would see only the sample
    (None, False, ["lr", "svm", "scdae"]),
    ("lr,scdae", True, ["lr", "scdae"]),  # asked for: trained on the sample, as the card says
])
def test_default_chains_of_a_streamed_reference_are_those_refitted_on_every_cell(big_reference, monkeypatch, chains,
                                                                                 streamed, expected):
    import cellcontrast.experiments.fit_annotator as module

    class Trained(Exception):
        pass

    def capture(prepared, names, stream, *args, **kwargs):
        raise Trained(names, stream is not None)

    monkeypatch.setattr(module, "_fit_prepared", capture)
    reference = big_reference if streamed else ad.read_h5ad(big_reference)
    with pytest.raises(Trained) as trained:
        fit_annotator(reference, **{**OPTIONS, "chains": chains})
    assert trained.value.args == (expected, streamed)


def test_a_streamed_grouped_fit_carries_the_sample_folds_models_for_flag_unseen(big_reference, tmp_path):
    out = tmp_path / "a.onnx"
    result = _fit(big_reference, out=out, batch_key="individual")
    calibration = result.chain.config["energy_calibration"]
    assert result.chain.module.n_fold_members == len(calibration["folds"]) == 2
    # the sample's held-out cells (its stratified draw rounds each type up), not every cell's
    assert sum(map(len, calibration["folds"])) <= 1.1 * OPTIONS["sample_cells"]
    query = ad.read_h5ad(big_reference)[:300].copy()
    from cellcontrast.annotation.api import annotate

    annotate(query, str(out), flag_unseen=True)
    p = query.obs["cellcontrast_energy_p"].to_numpy()
    assert ((p > 0) & (p <= 1)).all()
    assert (query.obs["cellcontrast_unfamiliar"].to_numpy() == (p <= np.float32(0.05))).all()

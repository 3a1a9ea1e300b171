"""Export of a chain to one ONNX file: single file, dynamic batch, metadata, ONNX == torch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cellcontrast.cli.entry import main  # noqa: E402
from cellcontrast.core.version import __version__  # noqa: E402
from cellcontrast.experiments.registry import REGISTERED_MODEL_NAME  # noqa: E402
from cellcontrast.export.onnx import export_chain_to_onnx, read_onnx_metadata  # noqa: E402

N_GENES, N_CLASSES = 40, 5


class TinyChain(torch.nn.Module):
    """Obeys the chain contract: counts [B, G] -> probabilities [B, C], with an embed()."""

    def __init__(self, n_genes: int = N_GENES, n_classes: int = N_CLASSES, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(n_genes, 16), torch.nn.ReLU())
        self.component = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, n_classes)

    def embed(self, counts):
        x = torch.log1p(counts / counts.sum(1, keepdim=True).clamp_min(1.0) * 1e4)
        return torch.nn.functional.normalize(self.component(self.encoder(x)), dim=-1)

    def forward(self, counts):
        return torch.softmax(self.head(self.embed(counts)), dim=-1)


def tiny_config(**extra) -> dict:
    config = {
        "genes": [f"gene{i}" for i in range(N_GENES)],
        "classes": [f"type_{c}" for c in "ABCDE"],
        "base": "lr",
        "component": "mlp",
        "preprocessing": "normalise to 1e4; log1p",
        "run_id": "abc123",
        "metrics": {"val_macro_f1": 0.8, "test_top1": 0.75},
    }
    config.update(extra)
    return config


def _counts(n: int, n_genes: int = N_GENES, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(rng.uniform(0.2, 4.0, size=(n, 1)), size=(n, n_genes)).astype(np.float32)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("onnx")
    chain = TinyChain().eval()
    path = export_chain_to_onnx(chain, tiny_config(), out_dir / "annotator.onnx")
    return chain, path


def test_single_file_and_checker(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["annotator.onnx"]  # no side data, no temp
    model = onnx.load_model(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["counts"]
    assert model.graph.output[0].name == "probabilities"


def test_metadata(exported):
    _, path = exported
    meta = read_onnx_metadata(path)
    assert meta["genes"] == tiny_config()["genes"]
    assert meta["classes"] == tiny_config()["classes"]
    assert meta["base"] == "lr" and meta["component"] == "mlp"
    assert meta["preprocessing"].startswith("normalise")
    assert meta["run_id"] == "abc123"
    assert meta["metrics"] == {"val_macro_f1": 0.8, "test_top1": 0.75}
    assert meta["cellcontrast_version"] == __version__
    assert meta["input_name"] == "counts"


@pytest.mark.parametrize("batch", [1, 37])
def test_dynamic_batch_matches_torch(exported, batch):
    chain, path = exported
    counts = _counts(batch, seed=batch)
    counts[0] = 0.0  # an empty cell must not give NaN
    (probs, *rest) = _session(path).run(None, {"counts": counts})
    with torch.no_grad():
        expected = chain(torch.from_numpy(counts)).numpy()
    assert probs.shape == (batch, N_CLASSES)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert len(rest) == 1  # TinyChain has embed(): the embedding is exported too
    with torch.no_grad():
        np.testing.assert_allclose(rest[0], chain.embed(torch.from_numpy(counts)).numpy(), atol=1e-5)


def test_config_mismatch_is_input_error(tmp_path):
    from cellcontrast.core.errors import InputError

    with pytest.raises(InputError, match="classes"):
        export_chain_to_onnx(TinyChain().eval(), tiny_config(classes=["a", "b"]), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ trained chains

# Small recipes: every chain trains in a second or two, and still learns (checked below).
TRAIN_PARAMS = {
    "lr": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]},
    "svm": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]},
    "actinn": {"hidden_dims": [32, 16], "epochs": 15, "min_steps": 0, "lr": 3e-3},
    "scdae": {"n_hvg": 60, "encoder_dims": [48, 24, 12], "classifier_dims": [12, 12], "ae_epochs": 1,
              "classifier_epochs": 12, "finetune_epochs": 1, "min_steps": 0},
    "mlp": {"max_epochs": 4},
    "mls": {"max_epochs": 4},
}
CHAINS = [(b, c) for b in ("lr", "actinn", "scdae") for c in ("none", "mlp", "mls")] + [("svm", "none")]


@pytest.fixture(scope="module")
def trained_data():
    """Simulated counts of 6 types: train, validation, and a query none of them saw."""
    from cellcontrast.data.simulate import simulate_atlas

    atlas = simulate_atlas(n_cells=1500, n_types=6, n_genes=120, n_individuals=2, seed=5)
    y = atlas.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    X = atlas.X.tocsr()
    return {"train": (X[:900], y[:900]), "val": (X[900:1100], y[900:1100]), "query": (X[1100:], y[1100:]),
            "genes": atlas.var_names.tolist(), "classes": atlas.obs["cell_type"].cat.categories.tolist()}


@pytest.mark.parametrize(("base", "component"), CHAINS, ids=[f"{b}-{c}" for b, c in CHAINS])
def test_trained_chains_onnx_equals_torch(base, component, trained_data, tmp_path):
    """Every base x component, trained and calibrated as `train` does, saved, reloaded and
    exported: ONNX gives torch's probabilities on held-out counts, and through `annotate`
    with the query's genes in another order."""
    import anndata as ad

    import cellcontrast as cc
    from cellcontrast.nn.chain import load_chain, predict_proba, save_chain
    from cellcontrast.train.chain import fit_chain
    from cellcontrast.train.evaluation import calibrate

    torch.manual_seed(0)
    (xt, yt), (xv, yv), (xq, yq) = trained_data["train"], trained_data["val"], trained_data["query"]
    n_classes = len(trained_data["classes"])
    chain = fit_chain(xt, yt, xv, yv, n_classes, base, component, TRAIN_PARAMS, seed=0)
    calibrate(chain, {"val": xv}, {"val": yv})
    torch.set_grad_enabled(True)
    model_dir = save_chain(chain, {"genes": trained_data["genes"], "class_names": trained_data["classes"]},
                           tmp_path / "chain")
    loaded, config = load_chain(model_dir)
    want = predict_proba(loaded, xq)
    # Trained, not the uniform output of a zero-initialised head: well above chance.
    assert (want.argmax(1) == yq).mean() > 2 / n_classes, f"{base}+{component} did not learn"
    assert float(loaded.temperature) != 1.0 or base == "lr"
    path = export_chain_to_onnx(loaded, config, tmp_path / "m.onnx")
    got, energy = _session(path).run(["probabilities", "energy"], {"counts": xq.toarray()})
    np.testing.assert_allclose(got, want, atol=1e-5)
    from cellcontrast.nn.chain import predict_logits
    from cellcontrast.train.open_set import energy as energy_score
    np.testing.assert_allclose(energy, energy_score(predict_logits(loaded, xq), float(loaded.temperature)),
                               atol=1e-4, rtol=1e-5)
    order = np.random.default_rng(1).permutation(len(trained_data["genes"]))
    query = ad.AnnData(X=xq[:, order], var=pd.DataFrame(index=np.asarray(trained_data["genes"])[order]))
    cc.annotate(query, path, probabilities=True)
    np.testing.assert_allclose(query.obsm["cellcontrast_probabilities"], want, atol=1e-5)


def test_flag_unseen_marks_cells_above_the_validation_energy_threshold(trained_data, tmp_path):
    """`flag_unseen` calls Unassigned exactly the cells whose energy exceeds the threshold that
    flags 5% of validation; a model without the energy output is refused."""
    import anndata as ad

    import cellcontrast as cc
    from cellcontrast.train.chain import fit_chain
    from cellcontrast.train.evaluation import evaluate

    (xt, yt), (xv, yv), (xq, _) = trained_data["train"], trained_data["val"], trained_data["query"]
    n_classes = len(trained_data["classes"])
    chain = fit_chain(xt, yt, xv, yv, n_classes, "lr", "none", {"lr": {"l2_path": [1e-2]}}, seed=0)
    metrics, _ = evaluate(chain, {"val": xv}, {"val": yv}, n_classes)
    config = {"genes": trained_data["genes"], "classes": trained_data["classes"], "metrics": metrics}
    path = export_chain_to_onnx(chain, config, tmp_path / "m.onnx")
    threshold = metrics["val_energy_q95"]
    val = ad.AnnData(X=xv, var=pd.DataFrame(index=trained_data["genes"]))
    cc.annotate(val, path, min_confidence=0.0, flag_unseen=True)
    assert val.obs["cellcontrast_unfamiliar"].mean() == pytest.approx(0.05, abs=0.01)
    query = ad.AnnData(X=xq, var=pd.DataFrame(index=trained_data["genes"]))
    cc.annotate(query, path, min_confidence=0.0, flag_unseen=True)
    unfamiliar = query.obs["cellcontrast_energy"].to_numpy() > threshold
    assert np.array_equal(query.obs["cellcontrast_unfamiliar"].to_numpy(), unfamiliar)
    assert np.array_equal((query.obs["cellcontrast_label"] == "Unassigned").to_numpy(), unfamiliar)
    assert query.uns["cellcontrast"]["unseen_threshold"] == pytest.approx(threshold)
    assert query.uns["cellcontrast"]["flag_unseen"] == "energy"
    plain = export_chain_to_onnx(TinyChain(len(trained_data["genes"]), n_classes).eval(),
                                 {**config, "metrics": {}}, tmp_path / "plain.onnx")
    with pytest.raises(cc.InputError, match="--flag-unseen energy needs a model exported with its energy output"):
        cc.annotate(query, plain, flag_unseen=True)
    with pytest.raises(cc.InputError, match="--flag-unseen expression needs a model exported with its expression"):
        cc.annotate(query, path, flag_unseen="expression")  # this chain carries no expression score
    with pytest.raises(cc.InputError, match="must be one of energy, expression"):
        cc.annotate(query, path, flag_unseen="distance")


def _deviance_reference(x: np.ndarray, mu: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """The expression score written out in numpy: the largest NB deviance where x > mu."""
    size = 1.0 / phi
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(x > 0, x * np.log(x / mu), 0.0)
    deviance = 2.0 * (ratio - (x + size) * np.log((1.0 + phi * x) / (1.0 + phi * mu)))
    return np.where(x > mu, deviance, 0.0).max(axis=1)


def test_flag_unseen_expression_scores_the_unexplained_gene_and_exports(trained_data, tmp_path):
    """The expression score: fitted on training cells, saved and reloaded with the chain,
    exported as the `expression` output equal to torch and to the numpy formula; a cell given
    a burst of a gene its predicted class barely expresses scores far above validation and
    comes out Unassigned with flag_unseen="expression", at 1% of validation flagged."""
    import anndata as ad

    import cellcontrast as cc
    from cellcontrast.nn.chain import load_chain, predict_logits, save_chain
    from cellcontrast.train.chain import fit_chain
    from cellcontrast.train.evaluation import evaluate
    from cellcontrast.train.open_set import attach_unexplained_expression, unexplained_expression

    (xt, yt), (xv, yv), (xq, _) = trained_data["train"], trained_data["val"], trained_data["query"]
    n_classes, genes = len(trained_data["classes"]), trained_data["genes"]
    chain = fit_chain(xt, yt, xv, yv, n_classes, "lr", "none", {"lr": {"l2_path": [1e-2]}}, seed=0)
    attach_unexplained_expression(chain, xt, yt)
    metrics, _ = evaluate(chain, {"val": xv}, {"val": yv}, n_classes)
    novelty = chain.novelty
    assert 0 < novelty.n_kept <= len(genes) and (novelty.profile > 0).all()
    kept = novelty.gene_index.numpy()
    dense = xq.toarray().astype(np.float64)
    classes = predict_logits(chain, xq).argmax(axis=1)
    mu = dense.sum(axis=1, keepdims=True) * novelty.profile.double().numpy()[classes]
    want = _deviance_reference(dense[:, kept], mu, novelty.dispersion.double().numpy())
    np.testing.assert_allclose(unexplained_expression(chain, xq), want, rtol=1e-4, atol=1e-3)

    loaded, config = load_chain(save_chain(chain, {"genes": genes, "class_names": trained_data["classes"],
                                                   "metrics": metrics}, tmp_path / "chain"))
    assert loaded.novelty is not None
    np.testing.assert_allclose(unexplained_expression(loaded, xq), want, rtol=1e-4, atol=1e-3)
    path = export_chain_to_onnx(loaded, {**config, "classes": trained_data["classes"]}, tmp_path / "m.onnx")
    (got,) = _session(path).run(["expression"], {"counts": xq.toarray()})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)

    val = ad.AnnData(X=xv, var=pd.DataFrame(index=genes))
    cc.annotate(val, path, min_confidence=0.0, flag_unseen="expression")
    assert val.obs["cellcontrast_unfamiliar"].mean() == pytest.approx(0.01, abs=0.01)
    # the least expressed kept gene of each cell's class, raised to a tenth of its counts
    burst = dense.copy()
    low = novelty.profile.numpy()[classes].argmin(axis=1)
    burst[np.arange(len(burst)), kept[low]] += np.rint(0.1 * dense.sum(axis=1))
    query = ad.AnnData(X=np.vstack([dense, burst]).astype(np.float32), var=pd.DataFrame(index=genes))
    cc.annotate(query, path, min_confidence=0.0, flag_unseen="expression")
    unfamiliar = query.obs["cellcontrast_unfamiliar"].to_numpy()
    assert unfamiliar[len(dense):].mean() > 0.9 > 0.1 > unfamiliar[:len(dense)].mean()
    assert np.array_equal((query.obs["cellcontrast_label"] == "Unassigned").to_numpy(), unfamiliar)
    assert query.uns["cellcontrast"]["flag_unseen"] == "expression"
    assert "cellcontrast_expression" in query.obs and "cellcontrast_energy" not in query.obs


@pytest.mark.parametrize("base", ["lr", "scdae"])
def test_every_gene_through_export_and_annotation(base, trained_data, tmp_path):
    """``n_hvg: all`` keeps every gene of the reference, and the exported chain annotates a
    query (its genes shuffled) as torch predicts it."""
    import anndata as ad

    import cellcontrast as cc
    from cellcontrast.nn.chain import predict_proba
    from cellcontrast.train.chain import fit_chain

    (xt, yt), (xv, yv), (xq, _) = trained_data["train"], trained_data["val"], trained_data["query"]
    params = {base: {"n_hvg": "all", **({"l2_path": [1e-2]} if base == "lr" else {"epochs": 2})}}
    chain = fit_chain(xt, yt, xv, yv, len(trained_data["classes"]), base, "none", params, seed=0)
    assert chain.preprocess.n_selected == chain.preprocess.n_genes == len(trained_data["genes"])
    config = {"genes": trained_data["genes"], "classes": trained_data["classes"]}
    path = export_chain_to_onnx(chain, config, tmp_path / "all.onnx")
    order = np.random.default_rng(2).permutation(len(trained_data["genes"]))
    query = ad.AnnData(X=xq[:, order], var=pd.DataFrame(index=np.asarray(trained_data["genes"])[order]))
    cc.annotate(query, path, probabilities=True)
    np.testing.assert_allclose(query.obsm["cellcontrast_probabilities"], predict_proba(chain, xq), atol=1e-5)


@pytest.mark.parametrize("value", ["some", 0, -5, 2.5])
def test_a_gene_count_that_is_not_a_count_or_all_is_refused(value):
    from cellcontrast.core.errors import InputError
    from cellcontrast.train.recipes import check_params

    with pytest.raises(InputError, match="n_hvg"):
        check_params({"lr": {"n_hvg": value}})
    check_params({"lr": {"n_hvg": "all"}, "scdae": {"n_hvg": 500}})


def test_graph_of_an_unscaled_all_gene_lr_skips_gather_and_standardisation(trained_data, tmp_path):
    from cellcontrast.train.chain import fit_chain

    (xt, yt), (xv, yv) = trained_data["train"], trained_data["val"]
    params = {"lr": {"n_hvg": 10_000, "standardize": False, "l2_path": [1e-2]}}
    chain = fit_chain(xt, yt, xv, yv, len(trained_data["classes"]), "lr", "none", params, seed=0)
    config = {"genes": trained_data["genes"], "classes": trained_data["classes"]}
    ops = {node.op_type for node in onnx.load(str(export_chain_to_onnx(chain, config, tmp_path / "a.onnx"))).graph.node}
    assert "Gather" not in ops and "Sub" not in ops
    chain = fit_chain(xt, yt, xv, yv, len(trained_data["classes"]), "lr", "none",
                      {"lr": {"n_hvg": 50, "standardize": True, "l2_path": [1e-2]}}, seed=0)
    ops = {node.op_type for node in onnx.load(str(export_chain_to_onnx(chain, config, tmp_path / "b.onnx"))).graph.node}
    assert "Gather" in ops


# ------------------------------------------------------------------ the CLI and MLflow


@pytest.fixture
def fake_chain_module(monkeypatch):
    """Chain folders of TinyChain, which the export command loads through a stand-in loader."""

    def save(model_dir, seed=0, **extra):
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.save(TinyChain(seed=seed).state_dict(), model_dir / "chain.pt")
        (model_dir / "config.json").write_text(json.dumps(tiny_config(**extra)))
        return model_dir

    def load_chain(model_dir):
        chain = TinyChain()
        chain.load_state_dict(torch.load(f"{model_dir}/chain.pt", weights_only=True))
        return chain.eval(), json.loads(open(f"{model_dir}/config.json").read())

    import cellcontrast.nn.chain as chain_module

    monkeypatch.setattr(chain_module, "load_chain", load_chain)  # what load_chain_folder calls
    return save


def test_cli_model_dir_no_register(tmp_path, fake_chain_module, capsys):
    model_dir = fake_chain_module(tmp_path / "chain")
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", "--model-dir", str(model_dir), "--out", str(out), "--no-register"]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and str(out) in line and "val_macro_f1=0.8000" in line
    assert read_onnx_metadata(out)["genes"] == tiny_config()["genes"]


def test_cli_bad_sources_exit_2(tmp_path, fake_chain_module, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model-dir", str(tmp_path / "nope"), "--out", str(out), "--no-register"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a folder" in err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--model-dir", str(tmp_path / "empty"), "--out", str(out), "--no-register"]) == 2
    assert "chain.pt" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts land in ./mlruns under tmp_path
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_cli_mlflow_best_run_id_and_register(tmp_path, fake_chain_module, mlflow_store, capsys):
    mlflow = mlflow_store
    out = tmp_path / "best.onnx"
    # No experiment yet: a clear error.
    assert main(["export", "--best", "--experiment", "exp", "--out", str(out)]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err

    mlflow.set_experiment("exp")
    run_ids = {}
    # The best validation F1 wins even though another run has the better TEST score.
    for seed, (val, test) in enumerate([(0.70, 0.99), (0.90, 0.50), (0.80, 0.80)]):
        with mlflow.start_run() as run:
            model_dir = fake_chain_module(tmp_path / f"c{seed}", seed=seed)
            mlflow.log_artifacts(str(model_dir), artifact_path="chain")
            mlflow.log_metrics({"val_macro_f1": val, "test_top1": test})
            run_ids[seed] = run.info.run_id
    with mlflow.start_run():  # a better-scoring run without a chain is skipped
        mlflow.log_metric("val_macro_f1", 0.99)
    capsys.readouterr()

    assert main(["export", "--best", "--experiment", "exp", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert run_ids[1] in line and "val_macro_f1=0.9000" in line and REGISTERED_MODEL_NAME in line
    meta = read_onnx_metadata(out)
    assert meta["run_id"] == run_ids[1]
    assert meta["metrics"]["val_macro_f1"] == pytest.approx(0.9)
    # ONNX from the downloaded chain equals the seed-1 chain.
    counts = _counts(4)
    with torch.no_grad():
        want = TinyChain(seed=1)(torch.from_numpy(counts)).numpy()
    np.testing.assert_allclose(_session(out).run(["probabilities"], {"counts": counts})[0], want, atol=1e-5)

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
    assert len(versions) == 1
    export_run = client.get_run(versions[0].run_id)
    assert export_run.data.tags["source_run_id"] == run_ids[1]

    # --run-id, and the export run itself is never picked as "best".
    out2 = tmp_path / "r0.onnx"
    assert main(["export", "--run-id", run_ids[0], "--out", str(out2), "--no-register"]) == 0
    assert read_onnx_metadata(out2)["run_id"] == run_ids[0]
    capsys.readouterr()
    assert main(["export", "--run-id", "0123456789abcdef", "--out", str(out2), "--no-register"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown MLflow run id" in err


def test_export_annotator_rejects_non_onnx_suffix(tmp_path):
    from cellcontrast.core.errors import InputError
    from cellcontrast.experiments.registry import export_annotator

    with pytest.raises(InputError, match=r"\.onnx"):
        export_annotator(tmp_path / "m.txt", model_dir="x", experiment="e", register=False)


def test_exported_model_annotates_like_torch(exported, tmp_path):
    """End to end: the exported file through `annotate` gives torch's probabilities."""
    ad = pytest.importorskip("anndata")
    import pandas as pd
    import scipy.sparse as sp

    from cellcontrast.annotation import annotate_file as annotate

    chain, path = exported
    counts = _counts(25, seed=11)
    genes = tiny_config()["genes"]
    query = tmp_path / "q.h5ad"
    # The query's genes are reversed: annotate must reorder them to the model's order.
    query_counts = counts[:, ::-1].copy()
    ad.AnnData(X=sp.csr_matrix(query_counts), var=pd.DataFrame(index=genes[::-1])).write_h5ad(query)
    annotate(path, query, tmp_path / "out.h5ad", probabilities=True, batch_size=10, log=lambda *_: None)
    got = ad.read_h5ad(tmp_path / "out.h5ad").obsm["cellcontrast_probabilities"]
    with torch.no_grad():
        want = chain(torch.from_numpy(counts)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_registers_under_an_mlflow_project_run(tmp_path, fake_chain_module, mlflow_store, monkeypatch, capsys):
    """`mlflow run` sets MLFLOW_RUN_ID to the project's run, in another experiment: the export
    run is nested under it instead of failing (it did, in the pipeline's export stage)."""
    import mlflow

    mlflow.set_experiment("project")
    with mlflow.start_run() as project:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", project.info.run_id)
    # tracking.setup moves the run id to CELLCONTRAST_PARENT_RUN_ID; setenv first so that
    # monkeypatch removes it after the test (it would nest every later test's runs).
    monkeypatch.setenv("CELLCONTRAST_PARENT_RUN_ID", "")
    monkeypatch.delenv("CELLCONTRAST_PARENT_RUN_ID")
    model_dir = fake_chain_module(tmp_path / "c0", seed=0)
    out = tmp_path / "a.onnx"
    assert main(["export", "--model-dir", str(model_dir), "--out", str(out), "--experiment", "exp"]) == 0
    capsys.readouterr()
    client = mlflow.MlflowClient()
    export_run = client.get_run(client.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")[0].run_id)
    assert export_run.data.tags["mlflow.parentRunId"] == project.info.run_id
    assert client.get_experiment(export_run.info.experiment_id).name == "exp"


def test_cli_model_dir_takes_the_out_dir_of_one_train(tmp_path, fake_chain_module, capsys):
    """`train --out-dir m` saves m/<base>-<component>/: export finds the one chain inside, and
    lists them when there are several."""
    fake_chain_module(tmp_path / "m" / "lr-none")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model-dir", str(tmp_path / "m"), "--out", str(out), "--no-register"]) == 0
    assert out.exists()
    fake_chain_module(tmp_path / "m" / "lr-mlp")
    other = tmp_path / "other.onnx"
    assert main(["export", "--model-dir", str(tmp_path / "m"), "--out", str(other), "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 chains" in err and "lr-mlp" in err and "lr-none" in err and not other.exists()


@pytest.mark.parametrize(("base", "component"), [("scdae", "mlp"), ("lr", "mls")])
def test_a_centroid_head_is_the_nearest_class_centroid_and_exports(base, component, trained_data, tmp_path):
    """``head_solver: centroid``: the head scores each class by the cosine to the unit-norm mean
    of its training cells' component outputs (times 1/tau), and ONNX gives torch's probabilities."""
    import torch.nn.functional as F

    from cellcontrast.nn.chain import predict_proba
    from cellcontrast.train.chain import fit_chain
    from cellcontrast.train.evaluation import calibrate

    (xt, yt), (xv, yv), (xq, _) = trained_data["train"], trained_data["val"], trained_data["query"]
    n_classes = len(trained_data["classes"])
    params = {**TRAIN_PARAMS, component: {**TRAIN_PARAMS[component], "head_solver": "centroid"}}
    chain = fit_chain(xt, yt, xv, yv, n_classes, base, component, params, seed=0)
    with torch.no_grad():
        e_train = chain.embed(torch.as_tensor(xt.toarray()))
        e_query = chain.embed(torch.as_tensor(xq.toarray()))
    centroids = F.normalize(torch.stack([e_train[torch.as_tensor(yt) == k].mean(0) for k in range(n_classes)]), dim=1)
    nearest = (e_query @ centroids.T).argmax(1).numpy()
    calibrate(chain, {"val": xv}, {"val": yv})
    torch.set_grad_enabled(True)
    want = predict_proba(chain, xq)
    assert np.array_equal(want.argmax(1), nearest)
    path = export_chain_to_onnx(chain, {"genes": trained_data["genes"], "class_names": trained_data["classes"]},
                                tmp_path / "m.onnx")
    got = _session(path).run(["probabilities"], {"counts": xq.toarray()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)

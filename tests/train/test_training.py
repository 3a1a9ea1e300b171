"""The four-step procedure on a tiny simulated problem (6 types x 60 cells x 200 genes)."""

import time

import numpy as np
import pytest
import torch

from cellcontrast.nn.chain import predict_proba
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.chain import build_chain, fit_chain
from cellcontrast.train.component import (
    embed_frozen,
    fit_component,
    train_component,
    train_head_on_component,
)
from cellcontrast.train.metrics import classification_metrics
from cellcontrast.train.recipes import DEFAULT_PARAMS
from conftest import marker_counts

torch.set_num_threads(1)
N_CLASSES = 6
# Small budgets; lr raised because the tiny train split gives only 2-8 steps per epoch.
BASE_PARAMS = {
    "lr": {"lr": 1e-2, "epochs": 30},
    "actinn": {"lr": 3e-3, "epochs": 40},
    "scdae": {"n_hvg": 100, "ae_epochs": 3, "classifier_epochs": 20, "finetune_epochs": 5},
}
COMPONENT_PARAMS = {"max_epochs": 15, "patience": 5, "head": {"lr": 1e-2, "epochs": 40}}


@pytest.fixture(scope="module")
def splits():
    x, y = marker_counts(n_classes=N_CLASSES)
    tr, va, te = slice(0, 240), slice(240, 300), slice(300, 360)
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


@pytest.fixture(scope="module")
def bases(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    out = {}
    for base, params in BASE_PARAMS.items():
        start = time.perf_counter()
        # for_component: the bases are shared with the component tests (LR keeps z-scores).
        out[base] = fit_base(xt, yt, xv, yv, N_CLASSES, base, params, seed=0, for_component=True)
        out[base].fit_seconds = time.perf_counter() - start
    return out


def top1_on_test(chain, splits):
    x, y = splits["test"]
    return classification_metrics(y, predict_proba(chain, x), N_CLASSES)["top1"]


@pytest.mark.parametrize("base", sorted(BASE_PARAMS))
def test_each_base_learns_the_problem(base, bases, splits):
    top1 = top1_on_test(build_chain(bases[base]), splits)
    print(f"{base}: top1 {top1:.3f} in {bases[base].fit_seconds:.2f}s")
    assert top1 > 0.8  # chance is 1/6


@pytest.mark.parametrize("base", sorted(BASE_PARAMS))
@pytest.mark.parametrize("component", ["mlp", "mls"])
def test_component_leaves_base_untouched_and_learns(base, component, bases, splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = bases[base]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h, head = fit_component(model, xt, yt, xv, yv, N_CLASSES, component, COMPONENT_PARAMS, seed=0)
    for k, v in model.state_dict().items():  # preprocess, encoder, old head, decoder, BN stats
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in h.parameters())
    assert head is not model.head
    chain = build_chain(model, h, head)
    assert top1_on_test(chain, splits) > 0.5  # chance is 1/6; components may lose to the base


@pytest.mark.parametrize("component", ["mlp", "mls"])
def test_step4_does_not_change_h(component, bases, splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = bases["scdae"]
    z_train, z_val = embed_frozen(model, xt), embed_frozen(model, xv)
    h = train_component(z_train, yt, z_val, yv, N_CLASSES, component, COMPONENT_PARAMS, seed=0)
    snapshot = {k: v.clone() for k, v in h.state_dict().items()}
    train_head_on_component(model, h, z_train, yt, z_val, yv, N_CLASSES, {"epochs": 5}, seed=0)
    for k, v in h.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_same_seed_same_model_different_seed_different_weights(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    x_test = splits["test"][0]
    params = {"actinn": {"lr": 3e-3, "epochs": 3}, "mls": {"max_epochs": 3, "head": {"epochs": 3}}}

    def run(seed):
        return fit_chain(xt, yt, xv, yv, N_CLASSES, "actinn", "mls", params, seed=seed)

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(predict_proba(a, x_test), predict_proba(b, x_test))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.state_dict()["encoder.layers.0.weight"], c.state_dict()["encoder.layers.0.weight"])
    assert not torch.equal(a.state_dict()["component.latent.weight"], c.state_dict()["component.latent.weight"])


def test_scdae_is_seeded(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    params = {"n_hvg": 50, "encoder_dims": [32, 16, 8], "classifier_dims": [8, 8],
              "ae_epochs": 1, "classifier_epochs": 2, "finetune_epochs": 1}
    a = fit_base(xt, yt, xv, yv, N_CLASSES, "scdae", params, seed=3)
    b = fit_base(xt, yt, xv, yv, N_CLASSES, "scdae", params, seed=3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_log_reports_every_stage_and_selection_uses_validation(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    records = []
    chain = fit_chain(xt, yt, xv, yv, N_CLASSES, "lr", "mlp",
                      {"lr": {"epochs": 3}, "mlp": {"max_epochs": 2, "head": {"epochs": 2}}},
                      seed=0, log=lambda stage, epoch, m: records.append((stage, epoch, m)))
    stages = {r[0] for r in records}
    assert stages == {"lr", "mlp_component", "mlp_head"}
    assert all("loss" in m for _, _, m in records)
    assert all("val_macro_f1" in m for s, _, m in records if s != "mlp_component")
    assert chain.has_component


def test_fit_chain_without_component_uses_the_base_head(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    chain = fit_chain(xt, yt, xv, yv, N_CLASSES, "lr", "none", {"lr": {"epochs": 2}}, seed=0)
    assert not chain.has_component
    assert chain.head.in_dim == chain.preprocess.out_dim


def test_params_are_validated():
    assert {"lr", "actinn", "scdae", "mlp", "mls"} <= set(DEFAULT_PARAMS)
    assert DEFAULT_PARAMS["mlp"]["temperature"] == 0.1
    x, y = marker_counts(per_class=5)
    with pytest.raises(ValueError):
        fit_base(x, y, x, y, N_CLASSES, "lr", {"epoch": 3})
    with pytest.raises(ValueError):
        fit_base(x, y, x, y, N_CLASSES, "rf", {})
    with pytest.raises(ValueError, match="svm.solver must be lbfgs"):
        fit_base(x, y, x, y, N_CLASSES, "svm", {"solver": "adam"})


def test_squared_hinge_is_linearsvc_loss():
    import torch

    from cellcontrast.train.loops import squared_hinge

    logits = torch.tensor([[2.0, -0.5, 0.3], [0.1, 0.4, -2.0]])
    y = torch.tensor([0, 2])
    # cell 0: true class margin 2 (no loss), others -0.5 -> 0.25, 0.3 -> 1.69
    # cell 1: true class -2 -> 9; others 0.1 -> 1.21, 0.4 -> 1.96
    assert float(squared_hinge(logits, y)) == pytest.approx(0.25 + 1.69 + 9 + 1.21 + 1.96)


def test_the_margin_base_learns_and_differs_from_lr():
    x, y = marker_counts(per_class=30)
    recipe = {"n_hvg": "all", "l2_path": [1e-2, 1e-3], "standardize": True}
    svm, lr = (fit_base(x, y, x, y, N_CLASSES, base, recipe) for base in ("svm", "lr"))
    assert svm.name == "svm" and svm.train_params["loss"] == "squared_hinge"
    import torch

    with torch.no_grad():
        margins = svm(torch.as_tensor(x.toarray() if hasattr(x, "toarray") else x, dtype=torch.float32))
        logits = lr(torch.as_tensor(x.toarray() if hasattr(x, "toarray") else x, dtype=torch.float32))
    assert (margins.argmax(1).numpy() == y).mean() > 0.95
    assert not torch.allclose(margins, logits)


def test_min_steps_lengthens_small_recipes_within_a_cap():
    from cellcontrast.train.loops import MAX_EPOCH_FACTOR
    from cellcontrast.train.loops import n_epochs as _n_epochs

    recipe = {"epochs": 50, "batch_size": 128, "min_steps": 3000}
    assert _n_epochs(recipe, 10_000) == 50  # 78 steps/epoch: already >= 3000 steps
    assert _n_epochs(recipe, 2_400) == 167  # 18 steps/epoch -> ceil(3000 / 18)
    assert _n_epochs(recipe, 100) == MAX_EPOCH_FACTOR * 50  # capped
    assert _n_epochs({**recipe, "min_steps": 0}, 100) == 50


def test_centroid_probe_scores_separable_embeddings():
    from cellcontrast.train.component import centroid_f1 as _centroid_f1
    from cellcontrast.train.component import centroid_subset as _centroid_subset

    y = np.repeat(np.arange(3), 4)
    e = torch.nn.functional.one_hot(torch.as_tensor(y), 3).float() + 0.01
    assert _centroid_f1(e, y, e, y, 3) == 1.0
    assert _centroid_f1(e, y, e, np.roll(y, 4), 3) == 0.0
    subset = _centroid_subset(np.repeat(np.arange(2), 300), 2, seed=0)
    assert len(subset) == 200 and torch.equal(subset, _centroid_subset(np.repeat(np.arange(2), 300), 2, 0))


@pytest.mark.parametrize("select", ["centroid", "loss"])
def test_component_selection_criteria(select, bases, splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = bases["actinn"]
    z_train, z_val = embed_frozen(model, xt), embed_frozen(model, xv)
    records = []
    h = train_component(z_train, yt, z_val, yv, N_CLASSES, "mls",
                        {"max_epochs": 3, "select": select}, seed=0,
                        log=lambda stage, epoch, m: records.append(m))
    assert len(records) == 3 and not any(p.requires_grad for p in h.parameters())
    assert all(("val_centroid_f1" in m) == (select == "centroid") for m in records)
    with pytest.raises(ValueError):
        train_component(z_train, yt, z_val, yv, N_CLASSES, "mlp", {"select": "knn"}, seed=0)


def test_actinn_component_head_uses_its_own_learning_rate(bases, splits, monkeypatch):
    import cellcontrast.train.component as training

    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = bases["actinn"]
    seen = []
    real = training.train_classifier
    monkeypatch.setattr(training, "train_classifier",
                        lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    z_train, z_val = embed_frozen(model, xt), embed_frozen(model, xv)
    h = train_component(z_train, yt, z_val, yv, N_CLASSES, "mlp", {"max_epochs": 1}, seed=0)
    train_head_on_component(model, h, z_train, yt, z_val, yv, N_CLASSES, {"epochs": 1}, seed=0, solver="adam")
    assert seen[-1]["lr"] == DEFAULT_PARAMS["actinn"]["component_head_lr"]
    train_head_on_component(model, h, z_train, yt, z_val, yv, N_CLASSES, {"epochs": 1, "lr": 0.5}, solver="adam")
    assert seen[-1]["lr"] == 0.5  # an explicit head override wins


@pytest.mark.parametrize("base", ["lr", "actinn"])
def test_linear_component_head_is_fitted_to_its_optimum_along_the_l2_path(base, bases, splits, monkeypatch):
    import torch.nn.functional as F

    import cellcontrast.train.component as training

    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = bases[base]
    monkeypatch.setattr(training, "train_classifier", lambda *a, **k: pytest.fail("Adam recipe used"))
    z_train, z_val = embed_frozen(model, xt), embed_frozen(model, xv)
    h = train_component(z_train, yt, z_val, yv, N_CLASSES, "mlp", {"max_epochs": 2}, seed=0)
    path = [1e-1, 1e-3, 1e-2]  # given out of order: fitted strongest first
    records = []
    head = train_head_on_component(model, h, z_train, yt, z_val, yv, N_CLASSES, seed=0, l2_path=path,
                                   log=lambda stage, step, m: records.append((stage, m)))
    assert [m["l2"] for _, m in records] == sorted(path, reverse=True)[:len(records)]
    assert {stage for stage, _ in records} == {"component_head"}
    best = max(records, key=lambda r: (r[1]["val_macro_f1"], r[1]["val_accuracy"], -r[1]["val_loss"]))[1]
    # The kept head is the optimum of mean CE + l2/2 |W|^2 at the val-best l2: gradient ~ 0.
    with torch.no_grad():
        e_train = h(z_train)
    head.requires_grad_(True)
    weight = head.linear.weight
    loss = F.cross_entropy(head(e_train), torch.as_tensor(yt)) + 0.5 * best["l2"] * weight.pow(2).sum()
    grads = torch.autograd.grad(loss, [weight, head.linear.bias])
    assert max(float(g.abs().max()) for g in grads) < 1e-4


def test_scdae_component_head_keeps_its_recipe(bases, splits, monkeypatch):
    import cellcontrast.train.component as training

    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    model = bases["scdae"]
    seen = []
    real = training.train_classifier
    monkeypatch.setattr(training, "train_classifier", lambda *a, **k: seen.append(a[6]) or real(*a, **k))
    monkeypatch.setattr(training, "fit_linear_lbfgs", lambda *a, **k: pytest.fail("L-BFGS on an MLP head"))
    z_train, z_val = embed_frozen(model, xt), embed_frozen(model, xv)
    h = train_component(z_train, yt, z_val, yv, N_CLASSES, "mlp", {"max_epochs": 1}, seed=0)
    train_head_on_component(model, h, z_train, yt, z_val, yv, N_CLASSES, {"epochs": 1}, seed=0)
    assert len(seen) == 1 and seen[0]["epochs"] == 1


@pytest.mark.parametrize("bad", [{"head_solver": "sgd"}, {"head_l2_path": []}, {"head_l2_path": [1e-3, -1.0]}])
def test_bad_component_head_recipe_is_refused(bad):
    from cellcontrast.train.recipes import resolve_params

    with pytest.raises(ValueError, match="head_"):
        resolve_params("mlp", bad)


def test_lr_auto_scaling_keeps_the_variant_better_on_validation(splits):
    """standardize "auto" fits both variants with the same seed and keeps the better on val
    (macro F1, then accuracy, then lower loss; exact ties go to the z-scored one): it equals
    the better forced fit."""
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    params = {"lr": 1e-2, "epochs": 8}
    forced = {flag: fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {**params, "standardize": flag}, seed=0)
              for flag in (True, False)}

    def score(model):
        proba = predict_proba(build_chain(model), xv)
        metrics = classification_metrics(yv, proba, N_CLASSES)
        loss = -np.log(np.clip(proba[np.arange(len(yv)), yv], 1e-30, None)).mean()
        return metrics["macro_f1"], metrics["top1"], -round(float(loss), 4)

    scores = {flag: score(m) for flag, m in forced.items()}
    auto = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", params, seed=0)
    expected = False if scores[False] > scores[True] else True
    assert auto.preprocess.standardize is expected
    assert auto.train_params["standardize"] is expected
    np.testing.assert_allclose(predict_proba(build_chain(auto), xv),
                               predict_proba(build_chain(forced[expected]), xv), atol=1e-6)


def test_lr_standardize_must_be_a_flag_or_auto(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    with pytest.raises(ValueError, match="standardize"):
        fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"standardize": "sometimes"}, seed=0)


def test_components_on_lr_get_the_z_scored_base(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    assert fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"epochs": 3}, seed=0, for_component=True).preprocess.standardize
    chain = fit_chain(xt, yt, xv, yv, N_CLASSES, "lr", "mlp", {"lr": {"epochs": 3}, "mlp": {"max_epochs": 2}}, seed=0)
    assert chain.preprocess.standardize


def test_lbfgs_reaches_the_convex_optimum(splits):
    """One l2: the fit equals scikit-learn's multinomial L-BFGS logistic regression on the same
    features (C = 1 / (l2 * n): sklearn sums the loss, we average it)."""
    from sklearn.linear_model import LogisticRegression

    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    l2 = 1e-2
    model = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"standardize": True, "l2_path": [l2], "max_iter": 500}, seed=0)
    with torch.no_grad():
        z_train = model.preprocess(torch.as_tensor(xt.toarray())).numpy()
        z_val = model.preprocess(torch.as_tensor(xv.toarray())).numpy()
    reference = LogisticRegression(C=1.0 / (l2 * len(yt)), tol=1e-10, max_iter=5000).fit(z_train, yt)
    with torch.no_grad():
        ours = torch.softmax(model.head(torch.as_tensor(z_val)), dim=1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(z_val), atol=2e-3)
    assert model.train_params["chosen_l2"] == l2


def test_lbfgs_path_keeps_the_best_l2_on_validation_and_stops_early(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    records = []
    path = [1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4]
    model = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"standardize": True, "l2_path": path, "path_patience": 1},
                     seed=0, log=lambda stage, step, m: records.append(m))
    assert [m["l2"] for m in records] == path[:len(records)]  # strongest first
    scores = [(m["val_macro_f1"], m["val_accuracy"], -m["val_loss"]) for m in records]
    best = int(np.argmax([s == max(scores) for s in scores]))  # first of the best: ties to the stronger
    assert model.train_params["chosen_l2"] == records[best]["l2"]
    # it stopped one value after the last improvement, or ran the whole path
    improved = [i for i in range(len(scores)) if scores[i] > max(scores[:i], default=(-1,))]
    assert len(records) == min(len(path), improved[-1] + 2)
    np.testing.assert_allclose(classification_metrics(yv, predict_proba(build_chain(model), xv), N_CLASSES)["macro_f1"],
                               records[best]["val_macro_f1"], atol=1e-9)


def test_lbfgs_path_keep_last_follows_the_whole_path_and_keeps_its_end(splits):
    # a refit with its l2 already chosen: no validation choice, no early stop
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    path = [1e2, 1e1, 1.0, 1e-1, 1e-2]
    records = []
    model = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"standardize": True, "l2_path": path, "path_patience": 1,
                                                       "path_keep": "last"},
                     seed=0, log=lambda stage, step, m: records.append(m))
    assert [m["l2"] for m in records] == path and model.train_params["chosen_l2"] == path[-1]
    np.testing.assert_allclose(classification_metrics(yv, predict_proba(build_chain(model), xv), N_CLASSES)["macro_f1"],
                               records[-1]["val_macro_f1"], atol=1e-9)


def test_lbfgs_warm_path_gets_closer_to_the_optimum_than_one_fit_from_zero(splits):
    # why the grouped refit goes down the path: the same l2, the same iterations a step
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    losses = {}
    for name, path in (("from zero", [1e-4]), ("down the path", [1e-1, 1e-2, 1e-3, 1e-4])):
        records = []
        fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"standardize": True, "l2_path": path, "max_iter": 5,
                                                    "path_keep": "last"},
                 seed=0, log=lambda stage, step, m, records=records: records.append(m))
        losses[name] = records[-1]["loss"]
    assert losses["down the path"] < losses["from zero"]


def test_lbfgs_is_deterministic_and_adam_still_available(splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    a = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"l2_path": [1e-2, 1e-3]}, seed=0)
    b = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"l2_path": [1e-2, 1e-3]}, seed=5)  # no randomness in it
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    adam = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"solver": "adam", "epochs": 3}, seed=0)
    assert adam.train_params["chosen_l2"] == DEFAULT_PARAMS["lr"]["l2"]
    assert not torch.equal(adam.head.linear.weight, a.head.linear.weight)


@pytest.mark.parametrize("params, match", [
    ({"solver": "sgd"}, "solver"),
    ({"l2_path": []}, "l2_path"),
    ({"l2_path": [1e-2, -1.0]}, "l2_path"),
    ({"l2_path": 0.01}, "l2_path"),
    ({"l2_path": ["a"]}, "l2_path"),
    ({"path_keep": "first"}, "path_keep"),
])
def test_lbfgs_settings_are_validated(splits, params, match):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    with pytest.raises(ValueError, match=match):
        fit_base(xt, yt, xv, yv, N_CLASSES, "lr", params, seed=0)


def test_large_references_search_the_l2_path_on_a_sample_then_refit_every_cell(splits):
    """Above ``path_max_cells`` the path runs on a stratified sample; the kept fit is refitted
    on every training cell at the same total penalty (l2 x n_sample / n)."""
    from cellcontrast.train.base_model import path_sample

    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    assert path_sample(yt, None, 0) is None and path_sample(yt, len(yt), 0) is None
    rows = path_sample(yt, len(yt) // 3, 0)
    assert abs(len(rows) - len(yt) // 3) <= N_CLASSES and set(np.unique(yt[rows])) == set(np.unique(yt))
    np.testing.assert_array_equal(rows, path_sample(yt, len(yt) // 3, 0))  # same seed, same sample
    logged = []
    model = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"standardize": True, "l2_path": [1e-1, 1e-2],
                     "path_max_cells": len(yt) // 3, "path_max_iter": 5}, seed=0,
                     log=lambda stage, step, m: logged.append((stage, m)))
    path = [m for stage, m in logged if stage == "lr"]
    assert [m["l2"] for m in path] == [1e-1, 1e-2]
    (refit,) = [m for stage, m in logged if stage == "lr_refit"]
    best = max(path, key=lambda m: (m["val_macro_f1"], m["val_accuracy"], -m["val_loss"]))
    assert refit["l2"] == pytest.approx(best["l2"] * len(rows) / len(yt))
    assert model.train_params["chosen_l2"] in (refit["l2"], best["l2"])


def test_lr_auto_genes_keeps_hvgs_or_every_gene_by_validation(splits):
    """n_hvg "auto" fits on auto_hvg HVGs and on every gene and keeps the better on validation:
    the same model as the better forced choice; a reference with no more genes than auto_hvg
    has one choice; under a component it takes the HVGs."""
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    params = {"standardize": True, "l2_path": [1e-2], "auto_hvg": 20}
    forced = {g: fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {**params, "n_hvg": g}, seed=0) for g in (20, "all")}
    scores = {g: classification_metrics(yv, predict_proba(build_chain(m), xv), N_CLASSES)["macro_f1"]
              for g, m in forced.items()}
    auto = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {**params, "n_hvg": "auto"}, seed=0)
    expected = "all" if scores["all"] > scores[20] else 20
    assert auto.train_params["n_hvg"] == expected
    assert auto.preprocess.n_selected == (xt.shape[1] if expected == "all" else 20)
    np.testing.assert_allclose(predict_proba(build_chain(auto), xv),
                               predict_proba(build_chain(forced[expected]), xv), atol=1e-6)
    few = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {**params, "n_hvg": "auto", "auto_hvg": 500}, seed=0)
    assert few.preprocess.n_selected == xt.shape[1]
    under = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {**params, "n_hvg": "auto"}, seed=0, for_component=True)
    assert under.preprocess.n_selected == 20


@pytest.mark.parametrize("bad", [0, -5, "many", 2.5, True])
def test_n_hvg_must_be_a_gene_count_all_or_auto(bad, splits):
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    with pytest.raises(ValueError, match="n_hvg"):
        fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {"n_hvg": bad}, seed=0)
    with pytest.raises(ValueError, match="n_hvg"):  # auto is LR's
        fit_base(xt, yt, xv, yv, N_CLASSES, "scdae", {"n_hvg": "auto"}, seed=0)


def test_lr_auto_genes_above_auto_max_cells_chooses_on_a_sample(splits):
    """Above auto_max_cells training cells the (genes, scaling) variant is chosen on a
    stratified sample (stages choice_*), then only the chosen one is fitted on every cell:
    the same model as forcing that choice."""
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    params = {"n_hvg": "auto", "auto_hvg": 20, "auto_max_cells": 100, "l2_path": [1e-2, 1e-3]}
    logged = []
    auto = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", params, seed=0,
                    log=lambda stage, step, values: logged.append(stage))
    stages = set(logged)
    assert {"choice_lr", "choice_lr_unscaled", "choice_lr_allgenes", "choice_lr_unscaled_allgenes"} <= stages
    assert stages - {s for s in stages if s.startswith("choice_")} == {"lr"}  # one variant fitted after
    chosen = {"n_hvg": auto.train_params["n_hvg"], "standardize": auto.train_params["standardize"]}
    forced = fit_base(xt, yt, xv, yv, N_CLASSES, "lr", {**params, **chosen}, seed=0)
    np.testing.assert_allclose(predict_proba(build_chain(auto), xv),
                               predict_proba(build_chain(forced), xv), atol=1e-6)


@pytest.mark.parametrize("base, component", [("actinn", "none"), ("scdae", "none"), ("actinn", "mlp")])
def test_stochastic_chains_are_identical_for_one_seed_and_differ_across_seeds(base, component, splits):
    """ACTINN and scDAE train with Adam, dropout, noise and shuffling: the seed fixes all of it,
    so two fits of one seed are bit-identical (benchmark rows must not move between runs of one
    revision) and another seed gives other weights."""
    (xt, yt), (xv, yv) = splits["train"], splits["val"]
    params = {base: {**BASE_PARAMS[base], "epochs": 5} if base == "actinn" else BASE_PARAMS[base],
              "mlp": {**COMPONENT_PARAMS, "max_epochs": 3, "head": {"lr": 1e-2, "epochs": 5}}}
    a, b, c = (fit_chain(xt, yt, xv, yv, N_CLASSES, base, component, params, seed=s) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)

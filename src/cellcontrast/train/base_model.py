"""Step 1 of the paper: fit a base model (preprocessing on train, then its own recipe).

Logistic regression (L-BFGS along a validation-picked L2 path, z-scored or plain log1p genes
chosen on validation), ACTINN (Adam, best epoch on validation) and scDAE (denoising
autoencoder, classifier, joint fine-tuning). Only the train and validation parts are seen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellcontrast.core.names import ALL_GENES, AUTO_GENES, LINEAR_BASES
from cellcontrast.nn.bases import BASE_MODELS, BaseModel, ScDAE
from cellcontrast.nn.preprocessing import ActinnPreprocess, LRPreprocess, ScdaePreprocess
from cellcontrast.train.contrastive_tuning import tuned_net
from cellcontrast.train.loops import (
    EncoderHead,
    FeatureSource,
    Log,
    apply_module,
    fit_linear_lbfgs,
    linear_features,
    n_epochs,
    rank_scores,
    refit_linear_lbfgs,
    shuffled_batches,
    train_classifier,
    val_scores,
)
from cellcontrast.train.recipes import resolve_params


def fit_base(train_counts, train_y: np.ndarray, val_counts, val_y: np.ndarray, n_classes: int,
             base: str, params: dict | None = None, seed: int = 0, log: Log | None = None,
             for_component: bool = False, fit_head: bool = True, train_groups: np.ndarray | None = None) -> BaseModel:
    """Step 1: fit the preprocessing on train, then train the base model by its recipe.

    Returns the model in eval mode, with ``train_params`` (the resolved params) attached so
    that ``fit_component`` can retrain a head with the same recipe. ``for_component``: the
    base will be frozen under a contrastive component; LR's ``standardize`` "auto" then keeps
    the paper's z-scored genes (see ``needs_component_base``). ``fit_head=False`` (LR under a
    component only): LR's encoder is its preprocessing alone and the component trains a fresh
    head, so only the preprocessing is fitted (on 81k atlas cells the weights cost ~150 s).
    """
    p = resolve_params(base, params)
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    if isinstance(p.get("contrastive_weight"), list):  # the weight chosen on validation
        return _best_contrastive_weight(train_counts, train_y, val_counts, val_y, n_classes, base, p, seed, log,
                                        train_groups)
    if base in LINEAR_BASES:
        if for_component:  # the components' recipes were set on z-scored HVGs
            p = {**p, "standardize": True if p["standardize"] == "auto" else p["standardize"],
                 "n_hvg": lr_gene_choices(p, train_counts.shape[1])[0]}
        if not fit_head:
            return _lr_preprocessing_only(train_counts, n_classes, p, base)
        return _fit_lr(train_counts, train_y, val_counts, val_y, n_classes, p, seed, log, base)
    torch.manual_seed(seed)
    if base == "actinn":
        preprocess = ActinnPreprocess.fit(train_counts, p["low_percentile"], p["high_percentile"])
        model = BASE_MODELS[base](preprocess, n_classes, p["hidden_dims"])
    else:
        preprocess = ScdaePreprocess.fit(train_counts, n_hvg=p["n_hvg"])
        model = ScDAE(preprocess, n_classes, p["encoder_dims"], p["classifier_dims"],
                      p["noise_sd"], p["dropout"])
    model.preprocess.eval()
    train = FeatureSource(train_counts, model.preprocess)
    val = FeatureSource(val_counts, model.preprocess)
    if base == "scdae":
        _fit_scdae(model, train, train_y, val, val_y, n_classes, p, seed, log, train_groups)
    else:
        net, extra = tuned_net(model.encoder, model.head, model.embed_dim, train_y, p, train_groups)
        train_classifier(net, train, train_y, val, val_y, n_classes, p, seed, log, stage=base, extra_loss=extra)
    model.train_params = p
    model.eval()
    return model


def _best_contrastive_weight(train_counts, train_y, val_counts, val_y, n_classes: int, base: str, p: dict,
                             seed: int, log: Log | None, train_groups) -> BaseModel:
    """One fit per ``contrastive_weight`` of the list (same seed), the best on validation kept
    (macro F1, then accuracy, then loss; the first on a tie, so list 0 first to prefer the
    plain recipe); its weight is recorded as the one chosen."""
    best = None
    for weight in p["contrastive_weight"]:
        model = fit_base(train_counts, train_y, val_counts, val_y, n_classes, base, {**p, "contrastive_weight": weight},
                         seed, log, train_groups=train_groups)
        score = rank_scores(val_scores(val_y, apply_module(model, FeatureSource(val_counts)), n_classes))
        if best is None or score > best[0]:
            best = (score, model)
    return best[1]


def _fit_lr(train_counts, train_y, val_counts, val_y, n_classes: int, p: dict, seed: int,
            log: Log | None, base: str = "lr") -> BaseModel:
    """Logistic regression; with ``standardize`` "auto", one model on z-scored and one on plain
    log1p genes (same seed), and with ``n_hvg`` "auto" each on ``auto_hvg`` HVGs and on every
    gene: the better on val macro F1 (then accuracy) kept, the first on a tie. The other
    variants log under their own stages (``lr_unscaled``, ``lr_allgenes``, ...), so the pruner
    (which watches ``lr``) judges a tuning trial by the paper's variant. Above
    ``path_max_cells`` training cells (L-BFGS), the search runs on a stratified sample and the
    kept fit is refitted on every cell. With "auto" genes above ``auto_max_cells`` training
    cells, the variant (genes and scaling) is first chosen on a stratified sample of that many
    (stages ``choice_lr...``), and only the chosen one is fitted on the rest."""
    scalings = [True, False] if p["standardize"] == "auto" else [bool(p["standardize"])]
    gene_choices = lr_gene_choices(p, train_counts.shape[1])
    variants = [(genes, flag) for genes in gene_choices for flag in scalings]
    lbfgs = p["solver"] == "lbfgs"
    if lbfgs and len(gene_choices) > 1:
        rows = path_sample(train_y, p.get("auto_max_cells"), seed)
        if rows is not None:
            search = {**p, "max_iter": p["path_max_iter"]}
            chosen = _best_lr_variant(variants, train_counts, train_y, rows, val_counts, val_y, n_classes,
                                      search, seed, log, stage_prefix="choice_", base=base)
            variants = [variants[chosen[0]]]
    rows = path_sample(train_y, p.get("path_max_cells"), seed) if lbfgs else None
    search = p if rows is None else {**p, "max_iter": p["path_max_iter"]}
    index, best_model, best_score, best_l2 = _best_lr_variant(variants, train_counts, train_y, rows, val_counts,
                                                              val_y, n_classes, search, seed, log,
                                                              first_genes=gene_choices[0], base=base)
    if rows is not None:  # the same total penalty on every training cell
        net = EncoderHead(best_model.encoder, best_model.head)
        best_l2 = refit_linear_lbfgs(net, linear_features(train_counts, best_model.preprocess), train_y,
                                     linear_features(val_counts, best_model.preprocess), val_y, n_classes,
                                     best_l2 * len(rows) / len(train_y), best_l2, best_score, p, log)
    # chosen_l2: the penalty of the kept fit (L-BFGS: picked on val along l2_path).
    best_model.train_params = {**p, "standardize": best_model.preprocess.standardize, "chosen_l2": best_l2,
                               "n_hvg": variants[index][0]}
    best_model.eval()
    return best_model


def _best_lr_variant(variants: list, train_counts, train_y, rows, val_counts, val_y, n_classes: int, p: dict,
                     seed: int, log: Log | None, stage_prefix: str = "", first_genes=None, base: str = "lr") -> tuple:
    """Fit each (genes, scaling) variant on the training ``rows`` (None: all) and return the
    best on validation: (its index, model, score, l2). Preprocessing is fitted on every
    training cell either way."""
    lbfgs = p["solver"] == "lbfgs"
    fit = fit_linear_lbfgs if lbfgs else train_classifier
    features = linear_features if lbfgs else FeatureSource
    counts, y = (train_counts, train_y) if rows is None else (train_counts[rows], np.asarray(train_y)[rows])
    first_genes = variants[0][0] if first_genes is None else first_genes
    best = None
    for i, (n_hvg, standardize) in enumerate(variants):
        torch.manual_seed(seed)
        preprocess = LRPreprocess.fit(train_counts, n_hvg=n_hvg, clip=p["clip"], standardize=standardize)
        model = BASE_MODELS[base](preprocess, n_classes)
        model.preprocess.eval()
        net = EncoderHead(model.encoder, model.head)
        stage = stage_prefix + _lr_stage(i, n_hvg, standardize, first_genes)
        score = fit(net, features(counts, preprocess), y, features(val_counts, preprocess), val_y, n_classes, p,
                    seed, log, stage=stage)
        if best is None or score > best[2]:
            best = (i, model, score, getattr(net, "l2", p["l2"]))
    return best


def lr_gene_choices(p: dict, n_genes: int) -> list:
    """The gene selections LR tries: with ``n_hvg`` "auto", its ``auto_hvg`` most dispersed
    genes and every gene (only every gene when the reference has no more); else the one asked."""
    if p["n_hvg"] != AUTO_GENES:
        return [p["n_hvg"]]
    return [int(p["auto_hvg"]), ALL_GENES] if n_genes > int(p["auto_hvg"]) else [ALL_GENES]


def _lr_stage(i: int, n_hvg, standardize: bool, first_genes) -> str:
    if i == 0:
        return "lr"
    return ("lr" if standardize else "lr_unscaled") + ("" if n_hvg == first_genes else "_allgenes")


def _lr_preprocessing_only(train_counts, n_classes: int, p: dict, base: str = "lr") -> BaseModel:
    """Under a component: its recipes were set on z-scored HVGs, so "auto" takes the HVGs."""
    standardize = p["standardize"] in (True, "auto")
    n_hvg = lr_gene_choices(p, train_counts.shape[1])[0]
    preprocess = LRPreprocess.fit(train_counts, n_hvg=n_hvg, clip=p["clip"], standardize=standardize)
    model = BASE_MODELS[base](preprocess, n_classes)
    model.train_params = {**p, "standardize": standardize, "chosen_l2": None, "n_hvg": n_hvg}
    model.head_fitted = False
    return model.eval()


def path_sample(train_y: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray | None:
    """Sorted rows of a stratified sample of ``max_cells`` training cells (each type's share
    kept, at least one cell a type), or None when every cell fits."""
    y = np.asarray(train_y)
    if not max_cells or len(y) <= max_cells:
        return None
    rng = np.random.default_rng(seed)
    fraction = max_cells / len(y)
    rows = [rng.choice(members, max(1, round(len(members) * fraction)), replace=False)
            for members in (np.flatnonzero(y == k) for k in np.unique(y))]
    return np.sort(np.concatenate(rows))


def needs_component_base(model: BaseModel, params: dict | None) -> bool:
    """Whether a base fitted for its own chain must be refitted (``for_component=True``) before
    a component is trained on it: an LR whose "auto" scaling chose plain log1p. The components'
    recipes (weight decay, learning rates, temperature ranges) were set on z-scored genes, and
    on plain log1p a linear MLS map learned nothing in the test problem's budget (top-1 0.32)."""
    p = resolve_params(model.name, params)
    return model.name in LINEAR_BASES and p["standardize"] == "auto" and not model.preprocess.standardize


def _phase_epochs(p: dict, key: str) -> int:
    return int(p[key]) if p.get("epochs") is None else min(int(p[key]), int(p["epochs"]))


def _fit_scdae(model: ScDAE, train: FeatureSource, train_y, val: FeatureSource, val_y,
               n_classes: int, p: dict, seed: int, log: Log | None, train_groups: np.ndarray | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    autoencoder = nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder})

    def reconstruction_loss(x: torch.Tensor) -> torch.Tensor:
        # The encoder adds the input noise itself in training mode; the target is clean x.
        return F.mse_loss(model.decoder(model.encoder(x)), x)

    # Phase 1: denoising autoencoder (unsupervised; fixed budget as in the original).
    model.set_dropout(0.0)
    optimizer = torch.optim.RMSprop(autoencoder.parameters(), lr=p["ae_lr"])
    ae_epochs = n_epochs({"epochs": _phase_epochs(p, "ae_epochs"), "batch_size": p["batch_size"],
                          "max_steps": p.get("max_steps")}, len(train))
    for epoch in range(ae_epochs):
        autoencoder.train()
        total, seen = 0.0, 0
        for index in shuffled_batches(len(train), p["batch_size"], generator):
            loss = reconstruction_loss(train.rows(index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            seen += len(index)
        if log is not None:
            autoencoder.eval()
            with torch.no_grad():
                val_mse = float(np.mean([float(reconstruction_loss(b)) for b in val.batches()]))
            log("scdae_autoencoder", epoch, {"loss": total / max(seen, 1), "val_mse": val_mse})

    # Phase 2: the classifier. With ``classifier_trains_encoder`` (the original's behaviour)
    # the encoder is updated too (cross-entropy only, on noisy inputs); otherwise the head is
    # trained on the frozen encoder's (noise-free, eval-mode) codes. Either way this phase's
    # recipe is the head recipe that step 4 reuses.
    classifier_recipe = head_recipe("scdae", p)
    if p.get("classifier_trains_encoder"):  # with contrastive_weight > 0, CE + the contrastive term
        net, extra = tuned_net(model.encoder, model.head, model.embed_dim, train_y, p, train_groups)
        best = train_classifier(net, train, train_y, val, val_y, n_classes, classifier_recipe, seed, log,
                                stage="scdae_classifier", extra_loss=extra)
    else:
        codes_train = FeatureSource(apply_module(model.encoder, train))
        codes_val = FeatureSource(apply_module(model.encoder, val))
        best = train_classifier(model.head, codes_train, train_y, codes_val, val_y, n_classes,
                                classifier_recipe, seed, log, stage="scdae_classifier")

    # Phase 3: joint fine-tuning, CE + reconstruction, starting from (and never worse on val
    # than) the phase-2 model.
    finetune_epochs = _phase_epochs(p, "finetune_epochs")
    if finetune_epochs > 0:
        model.set_dropout(p["finetune_ae_dropout"])
        whole = _FineTuned(model)
        recipe = {"lr": p["finetune_lr"], "batch_size": p["batch_size"], "epochs": finetune_epochs,
                  "patience": p["patience"], "l2": p["l2"], "max_steps": p.get("max_steps")}
        train_classifier(whole, train, train_y, val, val_y, n_classes, recipe, seed + 1, log,
                         stage="scdae_finetune", extra_loss=lambda x, index: whole.reconstruction_loss,
                         best_score=best)
        model.set_dropout(0.0)


class _FineTuned(nn.Module):
    """scDAE fine-tuning: logits from the code, and (in training) the reconstruction loss of
    the same noisy forward pass, kept for the combined loss, so the encoder runs once."""

    def __init__(self, model: ScDAE):
        super().__init__()
        self.encoder, self.decoder, self.head = model.encoder, model.decoder, model.head
        self.reconstruction_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encoder(x)
        if self.training:
            self.reconstruction_loss = F.mse_loss(self.decoder(code), x)
        return self.head(code)


def head_recipe(base: str, p: dict) -> dict:
    """How a base model trains its head (step 1 for LR/ACTINN, the classifier phase for scDAE)."""
    if base == "scdae":
        recipe = {"lr": p["lr"], "l2": p["l2"], "batch_size": p["batch_size"],
                  "epochs": _phase_epochs(p, "classifier_epochs"), "patience": p["patience"],
                  "min_steps": p.get("min_steps") or 0, "max_steps": p.get("max_steps")}
    else:
        keys = ("lr", "l2", "lr_decay", "lr_decay_steps", "batch_size", "epochs", "patience",
                "min_steps")
        recipe = {k: p[k] for k in keys if k in p}
    recipe.update(p.get("head") or {})
    return recipe

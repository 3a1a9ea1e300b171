"""Training recipes: each model's default hyperparameters (with the measurements behind
them) and the public checks of user-given parameters.

``params`` arguments everywhere override ``DEFAULT_PARAMS[name]``; a chain's parameters are
keyed by model name (``{"actinn": {...}, "mls": {...}}``).
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

from cellcontrast.core.errors import InputError
from cellcontrast.core.names import ALL_GENES, AUTO_GENES, LINEAR_BASES

# Step 4's L2 path for a linear head on h(z) (see head_solver below); one list for both components.
COMPONENT_HEAD_L2_PATH = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6]
# Noisy views of each training cell for the contrastive component (train/views.py): off by
# default; views > 0 adds that many binomially thinned copies (each read kept with p ~
# U(view_keep, 1)), with view_dropout of the detected genes zeroed.
NO_VIEWS = {"views": 0, "view_keep": 0.5, "view_dropout": 0.1, "view_positives": "labels",
            # every type drawn equally often in the contrastive batches (train/sampler.py)
            "balanced_batches": False,
            # "cross_batch" (with `fit --batch-key`): positives are cells of the anchor's type from
            # other batches only, minibatches from train/cross_batch.py
            "positives": "labels"}


# The encoder fine-tuned under CE + contrastive_weight x eq. 1 (train/contrastive_tuning.py) while
# ACTINN trains, or scDAE's classifier phase trains its encoder; 0: the base's own recipe.
# positives "cross_batch" (`fit --batch-key`): a type's cells from other batches only.
ENCODER_CONTRASTIVE = {"contrastive_weight": 0.0, "contrastive_temperature": 0.1, "positives": "labels"}

DEFAULT_PARAMS: dict[str, dict] = {
    # Logistic regression: one linear layer on standardised HVG expression; cross-entropy plus
    # l2 * sum(W^2) / 2 on the weights (not the bias), Adam, epoch picked on val macro F1.
    # Adam at 1e-2 converges in ~40 epochs even on 2,400 cells (Data Scarce); at 1e-3 it had
    # not (val top-1 0.61 vs 0.80 on scarce seed 0). l2 1e-3 was the better of 1e-2/1e-3 on val.
    # standardize "auto" (beyond the paper's recipe, which z-scores): fit the model on z-scored
    # and on plain log1p genes and keep the better on val macro F1 (ties: z-scored). On the
    # simulated atlas z-scoring cost ~0.03 (Default seed 0 val F1 0.909 vs 0.936, scikit-learn
    # LR): it gives noisy low-expressed genes the weight of markers. true/false force one.
    # solver "lbfgs" (beyond the paper's recipe; "adam" keeps it): full-batch L-BFGS on the
    # same loss, along l2_path from the strongest penalty down, each fit warm-started from the
    # last; the l2 with the best val macro F1 is kept, and the path stops after
    # ``path_patience`` values without improvement. Adam's epoch-picked fit stopped short of
    # the optimum: on the atlas it trailed scikit-learn's L-BFGS LR on the same genes (Default
    # seed 0 val F1 0.931 vs 0.944; natural 0.905 vs 0.944 with this path).
    # path_keep "last" (what a refit with no validation cells uses): the whole path is followed
    # and its last fit kept. A fit at one l2 from zero stops short of the optimum the path
    # reaches by warm starts: on an atlas fold (15k cells, svm, l2 9.7e-4) 100 L-BFGS steps
    # from zero gave val 0.493 / new individual 0.522 against 0.512 / 0.544 after 1,000.
    # path_max_cells (large references): above it, the path (and the scaling) is searched on
    # a stratified sample of that many training cells, path_max_iter L-BFGS iterations a
    # step, and the chosen fit is refitted once on every training cell with the same total
    # penalty (l2 x n_sample / n), kept if no worse on val. One L-BFGS pass costs ~1 s at 81k
    # cells x 2,000 genes x 97 types here, and the full path there took 700 s a scaling; on
    # a 20k sample, 30 iterations a step reached val F1 0.489 against 0.496 with 100.
    # n_hvg "auto": 2,000 HVGs (auto_hvg) and every gene (CellTypist's choice), the better on
    # validation. On a 20,000-gene simulated atlas validation and test both preferred the HVGs
    # (0.71 against 0.60 val macro F1); on a real 10,000-gene reference every gene scored 0.972
    # against 0.859 for 1,000 HVGs (issue 15). The all-gene fits train on the sparse form of
    # the features (train.loops.SparseAffineSource) and, above auto_max_cells training cells,
    # the variant (genes and scaling) is chosen on a stratified sample of that many, then only
    # it is fitted on every cell: see the peers page for the cost at 20,000 genes. The grid's
    # tuning still draws n_hvg from {500, 1000, 2000} (search_space.py says why).
    "lr": {"n_hvg": "auto", "auto_hvg": 2000, "clip": 10.0, "lr": 1e-2, "l2": 1e-3, "batch_size": 128,
           "epochs": 40, "patience": 10, "standardize": "auto", "solver": "lbfgs",
           "l2_path": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4], "max_iter": 100,
           "path_patience": 2, "path_max_cells": 20000, "path_max_iter": 30, "auto_max_cells": 5000,
           "path_keep": "best"},
    # ACTINN (mafeiyang/ACTINN): Adam 1e-4 decayed x0.95 every 1,000 steps, batch 128,
    # cost = mean CE + 0.005 * sum_W tf.nn.l2_loss(W) (= sum(W^2) / 2, weights only).
    # The original trains 50 epochs and keeps the last; we keep the best epoch on val.
    # min_steps 3000 (deviation for small sets): 50 epochs are ~3,100 steps on Default but only
    # ~950 on Data Scarce, where Adam 1e-4 has not converged; guaranteeing 3,000 steps raised
    # scarce seed-0 val macro F1 0.512 -> 0.646 (paper top-1 0.63); Default is unchanged.
    # component_head_lr 1e-3 (deviation): the head of step 4 sees unit-norm h(z) (|x| = 1 or
    # sqrt(C)) instead of ReLU codes, and at 1e-4 it stays far from converged even after 3,000
    # steps (scarce s0 val F1 MLP 0.30 / MLS 0.35 at 1e-4, 0.52 / 0.44 at 1e-3).
    "actinn": {"hidden_dims": [100, 50, 25], "low_percentile": 1.0, "high_percentile": 99.0,
               "lr": 1e-4, "l2": 0.005, "lr_decay": 0.95, "lr_decay_steps": 1000,
               "batch_size": 128, "epochs": 50, "patience": None, "min_steps": 3000,
               "component_head_lr": 1e-3, **ENCODER_CONTRASTIVE},
    # scDAE (cbi-bioinfo/scDAE): RMSProp 1e-3 for the autoencoder, Adam 1e-3 for the classifier
    # and fine-tuning, noise sd 0.4. The original runs 3000/3000/1000 epochs with ~1,300-cell
    # batches, drops 70% (keep_prob 0.3) and picks on TEST; our budgets are ~100x smaller, at
    # which 70% dropout has not converged (0.70 vs 0.93 val accuracy on a 20-type simulation),
    # so the default drop rate is 0.3 (tunable). The classifier phases stop early on val.
    # ``epochs`` (if set) caps all three phases.
    # classifier_trains_encoder True (as the original): a head on the frozen 3-epoch
    # autoencoder codes reached only val F1 0.20 (scarce s0); updating the encoder in the
    # classifier phase gives 0.67 scarce / 0.90 default. Budgets keep Default under ~40 s on
    # one thread: classifier 25 epochs (lr 3e-3 with 20 epochs was worse, 0.873 vs 0.905) and
    # fine-tuning 2 (8 epochs added <0.01); min_steps 500 lets Data Scarce (9 steps per
    # epoch) train ~55 epochs (0.688). max_steps 1200 caps each phase for large references
    # (above every phase of Default and Data Scarce): on 81k atlas cells one epoch is 316
    # steps and ~38 s here, so 3 + 25 + 2 epochs would take ~20 minutes.
    "scdae": {"n_hvg": 2000, "encoder_dims": [1000, 500, 125], "classifier_dims": [125, 125],
              "noise_sd": 0.4, "dropout": 0.3, "finetune_ae_dropout": 0.0,
              "ae_lr": 1e-3, "lr": 1e-3, "finetune_lr": 1e-3, "l2": 0.0, "batch_size": 256,
              "ae_epochs": 3, "classifier_epochs": 25, "finetune_epochs": 2, "patience": 10,
              "epochs": None, "min_steps": 500, "max_steps": 1200, "classifier_trains_encoder": True,
              **ENCODER_CONTRASTIVE},
    # Contrastive components. hidden_dim/out_dim None: d (the paper's R^d -> R^d), capped at
    # 256/128 when d > 256 (LR). samples_per_class: cells of one class per batch block.
    # select "centroid": keep the epoch with the best val nearest-centroid macro F1 of h(z)
    # (ties: lower val contrastive loss). The val contrastive loss ("loss") kept falling while
    # the classes got no more separable, and picked bad epochs (LR+MLP scarce s0 0.749 vs
    # 0.786). weight_decay 0.1 (Adam, coupled L2): on LR, z is 2,000 standardised genes and h
    # overfits 2,400 cells (train probe F1 0.98, val 0.34); 0.1 was best of 0/1e-3/1e-2/1e-1
    # for LR+MLP scarce (0.574 -> 0.749 before the selection change). temperature 0.1: 0.05 and
    # 0.2/0.5 were worse or equal for MLS. MLS patience 30: its val F1 dips during the first
    # epochs and recovers later (ACTINN+MLS default s0 0.709 -> 0.789 with patience 30).
    # MLS hidden_dim -1: each h_k is a linear map R^d -> R^2 (the paper does not give h_k's
    # architecture). A shared ReLU hidden layer (256, or 1024) overfitted: LR+MLS scarce s0
    # 0.44 with hidden 256 vs 0.58 linear; ACTINN and scDAE+MLS were also better linear.
    # class_hidden_dim > 0 gives each class its own hidden layer (einsum); 16 did not help.
    # head_solver "centroid": no head is trained; the nearest class centroid on h(z) (cosine,
    # train/component.py centroid_head), for any base. head_solver "lbfgs": step 4's linear head (LR, ACTINN; scDAE's head is an MLP and keeps
    # its recipe) is fitted to its optimum by L-BFGS along head_l2_path, the l2 picked on val,
    # as LR's own fit. h(z) is unit-norm, so the logits need large weights: the path goes down
    # to 1e-6. With the base's Adam recipe ("adam") that head stayed far from converged and gave
    # up the rare types: natural atlas seed 0, default recipe, val macro F1 ACTINN + MLP 0.41 ->
    # 0.81 and LR + MLP 0.59 -> 0.79 (its rarest ten types 0.06 -> 0.66).
    "mlp": {"hidden_dim": None, "out_dim": None, "temperature": 0.1, "lr": 1e-3,
            "weight_decay": 0.1, "batch_size": 256, "samples_per_class": 4, "max_epochs": 100,
            "patience": 10, "select": "centroid", "head_solver": "lbfgs",
            "head_l2_path": COMPONENT_HEAD_L2_PATH, **NO_VIEWS},
    "mls": {"hidden_dim": -1, "class_hidden_dim": 0, "temperature": 0.1, "lr": 1e-3,
            "weight_decay": 0.1, "batch_size": 256, "samples_per_class": 4, "max_epochs": 100,
            "patience": 30, "select": "centroid", "head_solver": "lbfgs",
            "head_l2_path": COMPONENT_HEAD_L2_PATH, **NO_VIEWS},
}

# The margin base (svm): LR's recipe (genes and scaling "auto", L-BFGS along an L2 path
# picked on validation) on the one-vs-rest squared hinge, LinearSVC's loss: mean over cells
# of sum_k max(0, 1 - s_k f_k)^2 (s_k = +1 for the cell's type, -1 otherwise) plus
# l2 * sum(W^2) / 2. LinearSVC's C = 1 is l2 = 1 / n_train (2e-4 on 5,000 cells): the path
# spans it. Across donors a calibrated linear SVM led every held-out-donor table of the
# project (docs/results/heldout.md); here its margins are calibrated by the chain's
# temperature on validation instead of Platt scaling on internal folds.
DEFAULT_PARAMS["svm"] = {**DEFAULT_PARAMS["lr"], "loss": "squared_hinge",
                         "l2_path": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]}


def resolve_params(name: str, params: dict | None) -> dict:
    if name not in DEFAULT_PARAMS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(DEFAULT_PARAMS)}")
    unknown = set(params or {}) - set(DEFAULT_PARAMS[name]) - {"head", "chosen_l2"}
    if unknown:
        raise ValueError(f"unknown parameters for {name}: {sorted(unknown)}")
    for key, value in (params or {}).items():
        if key == "n_hvg":
            _check_n_hvg(name, value)
            continue
        if key in DEFAULT_PARAMS[name]:
            _check_value(name, key, DEFAULT_PARAMS[name][key], value)
    if name in LINEAR_BASES:
        p = params or {}
        if p.get("standardize", "auto") not in (True, False, "auto"):
            raise ValueError(f"{name}.standardize must be true, false or auto, not {p['standardize']!r}")
        if p.get("solver", "lbfgs") not in ("lbfgs", "adam") or (name == "svm" and p.get("solver") == "adam"):
            raise ValueError(f"{name}.solver must be lbfgs{' or adam' if name == 'lr' else ''}, not {p['solver']!r}")
        _check_l2_path(f"{name}.l2_path", p.get("l2_path", DEFAULT_PARAMS[name]["l2_path"]))
        if p.get("path_keep", "best") not in ("best", "last"):
            raise ValueError(f"{name}.path_keep must be best or last, not {p['path_keep']!r}")
    if name in ("actinn", "scdae"):
        p = params or {}
        if p.get("positives", "labels") not in ("labels", "cross_batch"):
            raise ValueError(f"{name}.positives must be labels or cross_batch, not {p['positives']!r}")
        weights = p.get("contrastive_weight", 0.0)
        weights = weights if isinstance(weights, list) else [weights]
        if not weights or any(not isinstance(w, numbers.Real) or isinstance(w, bool) or w < 0 for w in weights) \
                or p.get("contrastive_temperature", 0.1) <= 0:
            raise ValueError(f"{name}.contrastive_weight must be a number >= 0 or a list of them (chosen on "
                             "validation), and contrastive_temperature > 0")
    if name in ("mlp", "mls"):
        p = params or {}
        if p.get("head_solver", "lbfgs") not in ("lbfgs", "adam", "centroid"):
            raise ValueError(f"{name}.head_solver must be lbfgs, adam or centroid, not {p['head_solver']!r}")
        _check_l2_path(f"{name}.head_l2_path", p.get("head_l2_path", DEFAULT_PARAMS[name]["head_l2_path"]))
        if p.get("positives", "labels") not in ("labels", "cross_batch"):
            raise ValueError(f"{name}.positives must be labels or cross_batch, not {p['positives']!r}")
        if p.get("view_positives", "labels") not in ("labels", "self"):
            raise ValueError(f"{name}.view_positives must be labels or self, not {p['view_positives']!r}")
        if not 0 < p.get("view_keep", 0.5) <= 1 or not 0 <= p.get("view_dropout", 0.1) < 1:
            raise ValueError(f"{name}.view_keep must be in (0, 1] and view_dropout in [0, 1)")
    return {**DEFAULT_PARAMS[name], **(params or {})}


def _check_l2_path(where: str, path) -> None:
    if (not isinstance(path, list | tuple) or not path
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in path)):
        raise ValueError(f"{where} must be a list of positive numbers, not {path!r}")


def _check_n_hvg(name: str, value) -> None:
    """A positive whole number of genes, ``all``, or (LR) ``auto``."""
    if value == ALL_GENES or (value == AUTO_GENES and name in LINEAR_BASES):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        choices = f"{ALL_GENES!r}" + (f" or {AUTO_GENES!r}" if name in LINEAR_BASES else "")
        raise ValueError(f"{name}.n_hvg must be a positive number of genes or {choices}, not {value!r}")


def _check_value(name: str, key: str, default, value) -> None:
    """A value of the default's kind: a number for a number (whole for a whole number, not
    negative unless the default is), true/false for a flag. None and lists are not checked."""
    if value is None or isinstance(value, list) or default is None or not isinstance(default, bool | numbers.Real):
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name}.{key} must be true or false, not {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}.{key} must be a number, not {value!r}")
    if isinstance(default, numbers.Integral) and value != int(value):
        raise ValueError(f"{name}.{key} must be a whole number, not {value!r}")
    if value < 0 <= default:
        raise ValueError(f"{name}.{key} must not be negative, not {value!r}")


def check_params(params: dict) -> None:
    """Refuse unknown models, unknown keys and values of the wrong kind, as an InputError."""
    for name, values in params.items():
        try:
            resolve_params(name, values)
        except ValueError as err:
            raise InputError(f"bad parameters: {err}") from None


def read_params_file(path: str | None) -> dict:
    """Hyperparameters keyed by model name ({"lr": {...}, "mls": {...}}) from a JSON file."""
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such params file: {p}")
    try:
        params = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{p} is not valid JSON: {err}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise InputError(f'{p} must map model names to parameters, e.g. {{"mls": {{"temperature": 0.1}}}}')
    return params

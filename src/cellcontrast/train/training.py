"""The paper's four-step procedure.

1. ``fit_base``: train ``f(g(x))`` with the base model's own recipe (epoch picked on val).
2-4. ``fit_component``: embed every cell with the frozen encoder (once), train the
   contrastive component h on the training embeddings, freeze it, and train a fresh head
   on h(z) with the base model's head recipe (epoch picked on val).

The functions only ever receive the train and validation splits: no test data can leak into
fitting, model selection or early stopping. Every fit is seeded (``torch.manual_seed`` for
initialisation, dropout and noise; a seeded ``torch.Generator`` for shuffling), so the same
seed gives the same model.

``params`` arguments override the defaults of ``DEFAULT_PARAMS[name]``; ``fit_chain`` takes
them keyed by name like ``DEFAULT_PARAMS`` (``{"actinn": {...}, "mls": {...}}``).

Component early stopping (``select``): by default the epoch with the best VALIDATION macro
F1 of a nearest-class-centroid probe on h(z) (centroids from up to 100 training cells per
class; ties broken by the lower val contrastive loss), which measures what step 4 needs, class
separability, and is deterministic. ``select="loss"`` uses the val contrastive loss alone
(over a fixed set of class-aware batches): it kept decreasing while the classes got no more
separable and picked worse epochs.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from cellcontrast.nn.chain import Chain
from cellcontrast.nn.components import MLPComponent, MLSComponent
from cellcontrast.nn.bases import BASE_MODELS, BaseModel, LinearHead, ScDAE, ScdaeHead
from cellcontrast.nn.preprocessing import ActinnPreprocess, LRPreprocess, ScdaePreprocess

Log = Callable[[str, int, dict], None]

# Step 4's L2 path for a linear head on h(z) (see head_solver below); one list for both components.
COMPONENT_HEAD_L2_PATH = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6]

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
    "lr": {"n_hvg": 2000, "clip": 10.0, "lr": 1e-2, "l2": 1e-3, "batch_size": 128,
           "epochs": 40, "patience": 10, "standardize": "auto", "solver": "lbfgs",
           "l2_path": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4], "max_iter": 100,
           "path_patience": 2},
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
               "component_head_lr": 1e-3},
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
    # epoch) train ~55 epochs (0.688).
    "scdae": {"n_hvg": 2000, "encoder_dims": [1000, 500, 125], "classifier_dims": [125, 125],
              "noise_sd": 0.4, "dropout": 0.3, "finetune_ae_dropout": 0.0,
              "ae_lr": 1e-3, "lr": 1e-3, "finetune_lr": 1e-3, "l2": 0.0, "batch_size": 256,
              "ae_epochs": 3, "classifier_epochs": 25, "finetune_epochs": 2, "patience": 10,
              "epochs": None, "min_steps": 500, "classifier_trains_encoder": True},
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
    # head_solver "lbfgs": step 4's linear head (LR, ACTINN; scDAE's head is an MLP and keeps
    # its recipe) is fitted to its optimum by L-BFGS along head_l2_path, the l2 picked on val,
    # as LR's own fit. h(z) is unit-norm, so the logits need large weights: the path goes down
    # to 1e-6. With the base's Adam recipe ("adam") that head stayed far from converged and gave
    # up the rare types: natural atlas seed 0, default recipe, val macro F1 ACTINN + MLP 0.41 ->
    # 0.81 and LR + MLP 0.59 -> 0.79 (its rarest ten types 0.06 -> 0.66).
    "mlp": {"hidden_dim": None, "out_dim": None, "temperature": 0.1, "lr": 1e-3,
            "weight_decay": 0.1, "batch_size": 256, "samples_per_class": 4, "max_epochs": 100,
            "patience": 10, "select": "centroid", "head_solver": "lbfgs",
            "head_l2_path": COMPONENT_HEAD_L2_PATH},
    "mls": {"hidden_dim": -1, "class_hidden_dim": 0, "temperature": 0.1, "lr": 1e-3,
            "weight_decay": 0.1, "batch_size": 256, "samples_per_class": 4, "max_epochs": 100,
            "patience": 30, "select": "centroid", "head_solver": "lbfgs",
            "head_l2_path": COMPONENT_HEAD_L2_PATH},
}

EVAL_BATCH = 4096
# ``min_steps`` may lengthen a recipe to at most this many times its ``epochs``.
MAX_EPOCH_FACTOR = 4
# Above this size the preprocessed training matrix is not cached but recomputed per batch.
CACHE_LIMIT_BYTES = 2 * 1024**3


# ---------------------------------------------------------------- data plumbing


def _to_csr(counts) -> sp.csr_matrix:
    if sp.issparse(counts):
        return sp.csr_matrix(counts, dtype=np.float32)
    return sp.csr_matrix(np.asarray(counts, dtype=np.float32))


class FeatureSource:
    """Rows of ``transform(counts)``, cached as one dense tensor when it fits in memory."""

    def __init__(self, counts, transform: nn.Module | None = None):
        if isinstance(counts, torch.Tensor):
            self.counts, self.transform, self.cache = None, None, counts
            return
        self.counts = _to_csr(counts)
        self.transform = transform if transform is not None else nn.Identity()
        self.cache = None
        out_dim = getattr(transform, "out_dim", self.counts.shape[1])
        if self.counts.shape[0] * out_dim * 4 <= CACHE_LIMIT_BYTES:
            self.cache = torch.cat([b for b in self._computed_batches()]) if len(self) else \
                torch.zeros(0, out_dim)

    def __len__(self) -> int:
        return self.cache.shape[0] if self.counts is None else self.counts.shape[0]

    @torch.no_grad()
    def _compute(self, rows) -> torch.Tensor:
        dense = torch.as_tensor(self.counts[rows].toarray(), dtype=torch.float32)
        return self.transform(dense)

    def _computed_batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.counts.shape[0], EVAL_BATCH):
            yield self._compute(slice(start, start + EVAL_BATCH))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index]
        return self._compute(index.numpy())

    def batches(self) -> Iterator[torch.Tensor]:
        if self.cache is not None:
            yield from self.cache.split(EVAL_BATCH)
        else:
            yield from self._computed_batches()


@torch.no_grad()
def _apply(module: nn.Module, source: FeatureSource) -> torch.Tensor:
    """``module`` over every row of ``source`` in eval mode, as one tensor."""
    module.eval()
    return torch.cat([module(b) for b in source.batches()])


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    # A lone trailing cell would break batch norm in training mode and adds only noise.
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches = batches[:-1]
    return batches


def _val_scores(y_true: np.ndarray, logits: torch.Tensor, n_classes: int) -> dict:
    pred = logits.argmax(dim=1).numpy()
    return {
        "val_macro_f1": float(f1_score(y_true, pred, labels=np.arange(n_classes), average="macro",
                                       zero_division=0)),
        "val_accuracy": float((pred == y_true).mean()),
        "val_loss": float(F.cross_entropy(logits, torch.as_tensor(y_true, dtype=torch.long))),
    }


def _weight_penalty(module: nn.Module) -> torch.Tensor:
    """sum(W^2) / 2 over Linear weight matrices (TensorFlow's l2_loss; biases exempt)."""
    terms = [0.5 * m.weight.pow(2).sum() for m in module.modules() if isinstance(m, nn.Linear)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _state(module: nn.Module) -> dict:
    return copy.deepcopy(module.state_dict())


# ---------------------------------------------------------------- supervised training loop


def train_classifier(net: nn.Module, train: FeatureSource, train_y: np.ndarray, val: FeatureSource,
                     val_y: np.ndarray, n_classes: int, recipe: dict, seed: int,
                     log: Log | None = None, stage: str = "classifier",
                     extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     best_score: tuple | None = None) -> tuple:
    """Cross-entropy training of ``net`` (features -> logits); keeps the best epoch on val.

    Selection: highest (val macro F1, val accuracy, -val loss); exact ties keep the earlier epoch. Training
    stops after ``patience`` epochs without improvement (``None``: run every epoch).
    ``best_score`` seeds the comparison (the state ``net`` already has, for fine-tuning).
    Returns the best (macro F1, accuracy); ``net`` is left holding the best state, eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    y_train = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    val_y = np.asarray(val_y)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=recipe["lr"])
    scheduler = None
    if recipe.get("lr_decay") and recipe.get("lr_decay_steps"):
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, recipe["lr_decay_steps"], recipe["lr_decay"])
    l2 = float(recipe.get("l2") or 0.0)
    patience = recipe.get("patience")
    best_state = _state(net) if best_score is not None else None
    stale = 0
    for epoch in range(_n_epochs(recipe, len(train))):
        net.train()
        total, seen = 0.0, 0
        for index in _shuffled_batches(len(train), recipe["batch_size"], generator):
            x = train.rows(index)
            loss = F.cross_entropy(net(x), y_train[index])
            if extra_loss is not None:
                loss = loss + extra_loss(x)
            if l2:
                loss = loss + l2 * _weight_penalty(net)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(index)
            seen += len(index)
        scores = _val_scores(val_y, _apply(net, val), n_classes)
        if log is not None:
            log(stage, epoch, {"loss": total / max(seen, 1), **scores})
        # Ties in F1 and accuracy go to the lower val loss: on easy data F1 reaches 1.0 in the
        # first epoch, whose barely trained model gives near-uniform confidences.
        score = (scores["val_macro_f1"], scores["val_accuracy"], -scores["val_loss"])
        if best_score is None or score > best_score:
            best_score, best_state, stale = score, _state(net), 0
        else:
            stale += 1
            if patience is not None and stale >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return best_score


def _n_epochs(recipe: dict, n_train: int) -> int:
    """``epochs``, raised so that at least ``min_steps`` optimiser steps are taken: a recipe
    written for tens of thousands of cells (ACTINN: 50 epochs) otherwise takes only ~1,000
    steps on the 2,400 training cells of Data Scarce and stops far from convergence. The
    extension is capped at ``MAX_EPOCH_FACTOR`` x ``epochs`` so that an explicitly small
    budget (smoke runs, tests) stays small."""
    epochs = int(recipe["epochs"])
    min_steps = int(recipe.get("min_steps") or 0)
    if min_steps and n_train:
        steps_per_epoch = max(1, n_train // int(recipe["batch_size"]))
        epochs = max(epochs, min(-(-min_steps // steps_per_epoch), MAX_EPOCH_FACTOR * epochs))
    return epochs


class _EncoderHead(nn.Module):
    """Encoder then head, on preprocessed features: what the base recipes train."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


# ---------------------------------------------------------------- step 1: base models


def resolve_params(name: str, params: dict | None) -> dict:
    if name not in DEFAULT_PARAMS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(DEFAULT_PARAMS)}")
    unknown = set(params or {}) - set(DEFAULT_PARAMS[name]) - {"head", "chosen_l2"}
    if unknown:
        raise ValueError(f"unknown parameters for {name}: {sorted(unknown)}")
    for key, value in (params or {}).items():
        if key in DEFAULT_PARAMS[name]:
            _check_value(name, key, DEFAULT_PARAMS[name][key], value)
    if name == "lr":
        p = params or {}
        if p.get("standardize", "auto") not in (True, False, "auto"):
            raise ValueError(f"lr.standardize must be true, false or auto, not {p['standardize']!r}")
        if p.get("solver", "lbfgs") not in ("lbfgs", "adam"):
            raise ValueError(f"lr.solver must be lbfgs or adam, not {p['solver']!r}")
        _check_l2_path("lr.l2_path", p.get("l2_path", DEFAULT_PARAMS["lr"]["l2_path"]))
    if name in ("mlp", "mls"):
        p = params or {}
        if p.get("head_solver", "lbfgs") not in ("lbfgs", "adam"):
            raise ValueError(f"{name}.head_solver must be lbfgs or adam, not {p['head_solver']!r}")
        _check_l2_path(f"{name}.head_l2_path", p.get("head_l2_path", DEFAULT_PARAMS[name]["head_l2_path"]))
    return {**DEFAULT_PARAMS[name], **(params or {})}


def _check_l2_path(where: str, path) -> None:
    if (not isinstance(path, list | tuple) or not path
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in path)):
        raise ValueError(f"{where} must be a list of positive numbers, not {path!r}")


def _check_value(name: str, key: str, default, value) -> None:
    """A value of the default's kind: a number for a number (whole for a whole number, not
    negative unless the default is), true/false for a flag. None and lists are not checked."""
    if value is None or default is None or not isinstance(default, bool | numbers.Real):
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


def fit_base(train_counts, train_y: np.ndarray, val_counts, val_y: np.ndarray, n_classes: int,
             base: str, params: dict | None = None, seed: int = 0, log: Log | None = None,
             for_component: bool = False) -> BaseModel:
    """Step 1: fit the preprocessing on train, then train the base model by its recipe.

    Returns the model in eval mode, with ``train_params`` (the resolved params) attached so
    that ``fit_component`` can retrain a head with the same recipe. ``for_component``: the
    base will be frozen under a contrastive component; LR's ``standardize`` "auto" then keeps
    the paper's z-scored genes (see ``needs_component_base``).
    """
    p = resolve_params(base, params)
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    if base == "lr":
        if for_component and p["standardize"] == "auto":
            p = {**p, "standardize": True}
        return _fit_lr(train_counts, train_y, val_counts, val_y, n_classes, p, seed, log)
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
        _fit_scdae(model, train, train_y, val, val_y, n_classes, p, seed, log)
    else:
        train_classifier(_EncoderHead(model.encoder, model.head), train, train_y, val, val_y,
                         n_classes, p, seed, log, stage=base)
    model.train_params = p
    model.eval()
    return model


def _fit_lr(train_counts, train_y, val_counts, val_y, n_classes: int, p: dict, seed: int,
            log: Log | None) -> BaseModel:
    """Logistic regression; with ``standardize`` "auto", one model on z-scored and one on plain
    log1p genes (same seed), the better on val macro F1 (then accuracy) kept. The second
    variant logs under stage ``lr_unscaled``, so the pruner (which watches ``lr``) judges a
    tuning trial by the paper's variant."""
    variants = [True, False] if p["standardize"] == "auto" else [bool(p["standardize"])]
    best_model, best_score = None, None
    for i, standardize in enumerate(variants):
        torch.manual_seed(seed)
        preprocess = LRPreprocess.fit(train_counts, n_hvg=p["n_hvg"], clip=p["clip"], standardize=standardize)
        model = BASE_MODELS["lr"](preprocess, n_classes)
        model.preprocess.eval()
        fit = _fit_linear_lbfgs if p["solver"] == "lbfgs" else train_classifier
        net = _EncoderHead(model.encoder, model.head)
        score = fit(net, FeatureSource(train_counts, preprocess), train_y, FeatureSource(val_counts, preprocess),
                    val_y, n_classes, p, seed, log, stage="lr" if i == 0 else "lr_unscaled")
        if best_score is None or score > best_score:
            best_model, best_score, best_l2 = model, score, getattr(net, "l2", p["l2"])
    # chosen_l2: the penalty of the kept fit (L-BFGS: picked on val along l2_path).
    best_model.train_params = {**p, "standardize": best_model.preprocess.standardize, "chosen_l2": best_l2}
    best_model.eval()
    return best_model


def _fit_linear_lbfgs(net: _EncoderHead, train: FeatureSource, train_y, val: FeatureSource, val_y,
                      n_classes: int, p: dict, seed: int, log: Log | None = None, stage: str = "lr") -> tuple:
    """Full-batch L-BFGS of a linear head on mean cross-entropy + l2 * sum(W^2) / 2, along
    ``l2_path`` (strongest first, each fit warm-started from the previous one); keeps the l2
    with the best (val macro F1, val accuracy, -val loss), exact ties to the stronger penalty.

    The loss is deterministic (no batches to shuffle), so ``seed`` plays no part. The gradient
    is summed over row blocks, so a training matrix too large to cache works too. Returns the
    best score; ``net`` is left holding the best weights, in eval mode, and ``net.l2`` the l2.
    """
    head = net.head.linear if hasattr(net.head, "linear") else net.head
    weight, bias = head.weight, head.bias
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    n = max(len(train), 1)
    with torch.no_grad():  # start from zero: the path's first (strongest) fit is then cheap
        weight.zero_()
        bias.zero_()
    best_score, best_state, best_l2, stale = None, None, None, 0
    for step, l2 in enumerate(sorted({float(v) for v in p["l2_path"]}, reverse=True)):
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=int(p["max_iter"]), history_size=20,
                                      tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure(l2=l2, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            total, start = torch.zeros(()), 0
            for block in train.batches():  # the full batch, a block of rows at a time
                loss = F.cross_entropy(net(block), y[start:start + len(block)], reduction="sum") / n
                loss.backward()
                total, start = total + loss.detach(), start + len(block)
            penalty = 0.5 * l2 * weight.pow(2).sum()
            penalty.backward()
            return total + penalty.detach()

        net.train()
        train_loss = float(optimizer.step(closure))
        scores = _val_scores(np.asarray(val_y), _apply(net, val), n_classes)
        if log is not None:
            log(stage, step, {"loss": train_loss, "l2": l2, **scores})
        score = (scores["val_macro_f1"], scores["val_accuracy"], -scores["val_loss"])
        if best_score is None or score > best_score:
            best_score, best_state, best_l2, stale = score, _state(net), l2, 0
        else:
            stale += 1
            if stale >= int(p["path_patience"]):
                break
    net.load_state_dict(best_state)
    net.l2 = best_l2
    net.eval()
    return best_score


def needs_component_base(model: BaseModel, params: dict | None) -> bool:
    """Whether a base fitted for its own chain must be refitted (``for_component=True``) before
    a component is trained on it: an LR whose "auto" scaling chose plain log1p. The components'
    recipes (weight decay, learning rates, temperature ranges) were set on z-scored genes, and
    on plain log1p a linear MLS map learned nothing in the test problem's budget (top-1 0.32)."""
    p = resolve_params(model.name, params)
    return model.name == "lr" and p["standardize"] == "auto" and not model.preprocess.standardize


def _phase_epochs(p: dict, key: str) -> int:
    return int(p[key]) if p.get("epochs") is None else min(int(p[key]), int(p["epochs"]))


def _fit_scdae(model: ScDAE, train: FeatureSource, train_y, val: FeatureSource, val_y,
               n_classes: int, p: dict, seed: int, log: Log | None) -> None:
    generator = torch.Generator().manual_seed(seed)
    autoencoder = nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder})

    def reconstruction_loss(x: torch.Tensor) -> torch.Tensor:
        # The encoder adds the input noise itself in training mode; the target is clean x.
        return F.mse_loss(model.decoder(model.encoder(x)), x)

    # Phase 1: denoising autoencoder (unsupervised; fixed budget as in the original).
    model.set_dropout(0.0)
    optimizer = torch.optim.RMSprop(autoencoder.parameters(), lr=p["ae_lr"])
    for epoch in range(_phase_epochs(p, "ae_epochs")):
        autoencoder.train()
        total, seen = 0.0, 0
        for index in _shuffled_batches(len(train), p["batch_size"], generator):
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
    head_recipe = _head_recipe("scdae", p)
    if p.get("classifier_trains_encoder"):
        best = train_classifier(_EncoderHead(model.encoder, model.head), train, train_y, val,
                                val_y, n_classes, head_recipe, seed, log, stage="scdae_classifier")
    else:
        codes_train = FeatureSource(_apply(model.encoder, train))
        codes_val = FeatureSource(_apply(model.encoder, val))
        best = train_classifier(model.head, codes_train, train_y, codes_val, val_y, n_classes,
                                head_recipe, seed, log, stage="scdae_classifier")

    # Phase 3: joint fine-tuning, CE + reconstruction, starting from (and never worse on val
    # than) the phase-2 model.
    finetune_epochs = _phase_epochs(p, "finetune_epochs")
    if finetune_epochs > 0:
        model.set_dropout(p["finetune_ae_dropout"])
        whole = _FineTuned(model)
        recipe = {"lr": p["finetune_lr"], "batch_size": p["batch_size"], "epochs": finetune_epochs,
                  "patience": p["patience"], "l2": p["l2"]}
        train_classifier(whole, train, train_y, val, val_y, n_classes, recipe, seed + 1, log,
                         stage="scdae_finetune", extra_loss=lambda x: whole.reconstruction_loss,
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


def _head_recipe(base: str, p: dict) -> dict:
    """How a base model trains its head (step 1 for LR/ACTINN, the classifier phase for scDAE)."""
    if base == "scdae":
        recipe = {"lr": p["lr"], "l2": p["l2"], "batch_size": p["batch_size"],
                  "epochs": _phase_epochs(p, "classifier_epochs"), "patience": p["patience"],
                  "min_steps": p.get("min_steps") or 0}
    else:
        keys = ("lr", "l2", "lr_decay", "lr_decay_steps", "batch_size", "epochs", "patience",
                "min_steps")
        recipe = {k: p[k] for k in keys if k in p}
    recipe.update(p.get("head") or {})
    return recipe


def _fresh_head(base_model: BaseModel, in_dim: int, n_classes: int) -> nn.Module:
    old = base_model.head
    if isinstance(old, ScdaeHead):
        return ScdaeHead(in_dim, n_classes, old.hidden_dims, old.dropout_p)
    if isinstance(old, LinearHead):
        return LinearHead(in_dim, n_classes, xavier=old.xavier)
    raise TypeError(f"no head recipe for {type(old).__name__}")


# ---------------------------------------------------------------- steps 2-4: component


def fit_component(base_model: BaseModel, train_counts, train_y: np.ndarray, val_counts,
                  val_y: np.ndarray, n_classes: int, component: str, params: dict | None = None,
                  seed: int = 0, log: Log | None = None) -> tuple[nn.Module, nn.Module]:
    """Steps 2-4. Returns ``(h, head)``: the frozen component and the freshly trained head.

    The base model is not modified: the encoder (and preprocessing) run in eval mode under
    no_grad, once, to produce z. ``params["head"]`` may override the head recipe, which is
    otherwise the base model's own (``base_model.train_params``).
    """
    p = resolve_params(component, params)
    z_train = embed_frozen(base_model, train_counts)
    z_val = embed_frozen(base_model, val_counts)
    h = train_component(z_train, train_y, z_val, val_y, n_classes, component, p, seed, log)
    head = train_head_on_component(base_model, h, z_train, train_y, z_val, val_y, n_classes,
                                   p.get("head"), seed, log, stage=f"{component}_head",
                                   solver=p["head_solver"], l2_path=p["head_l2_path"])
    return h, head


@torch.no_grad()
def embed_frozen(base_model: BaseModel, counts) -> torch.Tensor:
    """Step 2: z = g(x) for every cell, base model in eval mode, no gradients."""
    base_model.eval()
    return _apply(_Embedder(base_model), FeatureSource(counts))


def train_component(z_train: torch.Tensor, train_y: np.ndarray, z_val: torch.Tensor,
                    val_y: np.ndarray, n_classes: int, component: str, params: dict | None = None,
                    seed: int = 0, log: Log | None = None) -> nn.Module:
    """Step 3: train h on the training embeddings; keep the best epoch on val (``select``).

    Returns h frozen (eval mode, ``requires_grad`` off).
    """
    from cellcontrast.nn.losses import mls_loss, supcon_loss
    from cellcontrast.train.sampler import ClassAwareBatchSampler

    p = resolve_params(component, params)
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    torch.manual_seed(seed)
    if component == "mlp":
        h = MLPComponent(z_train.shape[1], p["hidden_dim"], p["out_dim"])
        loss_fn = supcon_loss
    else:
        h = MLSComponent(z_train.shape[1], n_classes, p["hidden_dim"], p.get("class_hidden_dim", 0))
        loss_fn = mls_loss
    tau = p["temperature"]
    y_train_t = torch.as_tensor(train_y, dtype=torch.long)
    y_val_t = torch.as_tensor(val_y, dtype=torch.long)
    sampler = ClassAwareBatchSampler(train_y, p["batch_size"], p["samples_per_class"], seed=seed)
    val_sampler = ClassAwareBatchSampler(val_y, p["batch_size"], p["samples_per_class"], seed=seed)
    val_sampler.set_epoch(0)
    val_batches = [torch.as_tensor(list(b), dtype=torch.long) for b in val_sampler]
    optimizer = torch.optim.Adam(h.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])

    def val_loss() -> float:
        h.eval()
        with torch.no_grad():
            losses = [float(loss_fn(h.contrastive_features(z_val[b]), y_val_t[b], tau)) for b in val_batches]
        return float(np.mean(losses)) if losses else float("nan")

    select = p.get("select", "centroid")
    if select not in ("centroid", "loss"):
        raise ValueError(f"select must be 'centroid' or 'loss', got {select!r}")
    probe = _centroid_subset(train_y, n_classes, seed)

    def criterion() -> tuple[float, ...]:
        """Higher is better: (val nearest-centroid macro F1, -val loss) or (-val loss,)."""
        loss = val_loss()
        if select == "loss":
            return (-loss,), loss
        with torch.no_grad():
            f1 = _centroid_f1(h(z_train[probe]), train_y[probe.numpy()], h(z_val), val_y, n_classes)
        return (f1, -loss), loss

    best_score, _ = criterion()
    best_state, stale = _state(h), 0
    for epoch in range(int(p["max_epochs"])):
        h.train()
        sampler.set_epoch(epoch)
        total, n_batches = 0.0, 0
        for batch in sampler:
            index = torch.as_tensor(list(batch), dtype=torch.long)
            loss = loss_fn(h.contrastive_features(z_train[index]), y_train_t[index], tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            n_batches += 1
        score, current = criterion()
        if log is not None:
            values = {"loss": total / max(n_batches, 1), "val_loss": current}
            if select == "centroid":
                values["val_centroid_f1"] = score[0]
            log(f"{component}_component", epoch, values)
        if score > best_score:
            best_score, best_state, stale = score, _state(h), 0
        else:
            stale += 1
            if p["patience"] is not None and stale >= p["patience"]:
                break
    h.load_state_dict(best_state)
    h.eval()
    h.requires_grad_(False)
    return h


CENTROID_CELLS_PER_CLASS = 100


def _centroid_subset(y: np.ndarray, n_classes: int, seed: int) -> torch.Tensor:
    """Up to ``CENTROID_CELLS_PER_CLASS`` training cells per class (seeded): enough for
    stable class centroids while keeping the per-epoch selection cheap."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) > CENTROID_CELLS_PER_CLASS:
            idx = rng.choice(idx, CENTROID_CELLS_PER_CLASS, replace=False)
        keep.append(np.sort(idx))
    return torch.as_tensor(np.concatenate(keep) if keep else np.zeros(0, int), dtype=torch.long)


def _centroid_f1(e_train: torch.Tensor, y_train: np.ndarray, e_val: torch.Tensor,
                 y_val: np.ndarray, n_classes: int) -> float:
    """Val macro F1 of nearest class centroid (cosine) on the component's output: a cheap,
    deterministic probe of how well h separates the classes."""
    y = torch.as_tensor(y_train, dtype=torch.long)
    sums = torch.zeros(n_classes, e_train.shape[1]).index_add_(0, y, e_train)
    centroids = F.normalize(sums, dim=1)
    pred = (F.normalize(e_val, dim=1) @ centroids.T).argmax(dim=1).numpy()
    return float(f1_score(y_val, pred, labels=np.arange(n_classes), average="macro",
                          zero_division=0))


def train_head_on_component(base_model: BaseModel, h: nn.Module, z_train: torch.Tensor,
                            train_y: np.ndarray, z_val: torch.Tensor, val_y: np.ndarray,
                            n_classes: int, head_params: dict | None = None, seed: int = 0,
                            log: Log | None = None, stage: str = "component_head",
                            solver: str = "lbfgs", l2_path: list[float] | None = None) -> nn.Module:
    """Step 4: a fresh head on the frozen h(z); h itself only runs in eval mode under no_grad.

    A linear head (LR, ACTINN) is fitted by L-BFGS along ``l2_path`` (the mlp recipe's
    ``COMPONENT_HEAD_L2_PATH`` by default) when ``solver`` is "lbfgs"; otherwise, and always for scDAE's
    MLP head, it is trained with the base model's head recipe (``head_params`` overrides it).
    """
    if solver not in ("lbfgs", "adam"):
        raise ValueError(f"head solver must be lbfgs or adam, not {solver!r}")
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    e_train, e_val = _apply(h, FeatureSource(z_train)), _apply(h, FeatureSource(z_val))
    if solver == "lbfgs" and isinstance(base_model.head, LinearHead):
        head = _fresh_head(base_model, h.out_dim, n_classes)
        path = list(l2_path or COMPONENT_HEAD_L2_PATH)
        recipe = {**DEFAULT_PARAMS["lr"], "l2_path": path}  # max_iter, path_patience as LR's
        _fit_linear_lbfgs(_EncoderHead(nn.Identity(), head), FeatureSource(e_train), train_y,
                          FeatureSource(e_val), val_y, n_classes, recipe, seed, log, stage=stage)
        return head
    base_params = getattr(base_model, "train_params", None) or DEFAULT_PARAMS[base_model.name]
    own = {"lr": base_params["component_head_lr"]} if base_params.get("component_head_lr") else {}
    recipe = _head_recipe(base_model.name, {
        **base_params, "head": {**own, **(base_params.get("head") or {}), **(head_params or {})}})
    torch.manual_seed(seed)
    head = _fresh_head(base_model, h.out_dim, n_classes)
    train_classifier(head, FeatureSource(e_train), train_y, FeatureSource(e_val), val_y, n_classes,
                     recipe, seed, log, stage=stage)
    return head


class _Embedder(nn.Module):
    def __init__(self, model: BaseModel):
        super().__init__()
        self.model = model

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.model.embed(counts)


# ---------------------------------------------------------------- assembling


def build_chain(base_model: BaseModel, component: nn.Module | None = None,
                head: nn.Module | None = None) -> Chain:
    """preprocess -> encoder -> component -> head; without a component, the base's own head."""
    if component is not None and head is None:
        raise ValueError("a chain with a component needs the head trained on its output")
    chain = Chain(base_model.preprocess, base_model.encoder, component,
                  head if head is not None else base_model.head)
    chain.eval()
    return chain


def fit_chain(train_counts, train_y: np.ndarray, val_counts, val_y: np.ndarray, n_classes: int,
              base: str, component: str = "none", params: dict | None = None, seed: int = 0,
              log: Log | None = None) -> Chain:
    """Steps 1-4 in one call. ``params`` is keyed by model name like ``DEFAULT_PARAMS``."""
    params = params or {}
    model = fit_base(train_counts, train_y, val_counts, val_y, n_classes, base,
                     params.get(base), seed, log, for_component=component not in (None, "none"))
    if component in (None, "none"):
        return build_chain(model)
    h, head = fit_component(model, train_counts, train_y, val_counts, val_y, n_classes,
                            component, params.get(component), seed, log)
    return build_chain(model, h, head)

"""The training loops every step shares: feature sources, mini-batch cross-entropy training
with the epoch picked on validation, and full-batch L-BFGS for linear heads.

Every loop receives the train and validation parts only, and is seeded (``torch.manual_seed``
for initialisation, dropout and noise; a seeded ``torch.Generator`` for shuffling), so the
same seed gives the same model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

Log = Callable[[str, int, dict], None]


EVAL_BATCH = 4096


# ``min_steps`` may lengthen a recipe to at most this many times its ``epochs``.
MAX_EPOCH_FACTOR = 4


# Above this size the preprocessed training matrix is not cached but recomputed per batch.
CACHE_LIMIT_BYTES = 2 * 1024**3


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


    def logit_blocks(self, net: nn.Module) -> Iterator[torch.Tensor]:
        """``net`` over the rows, a block at a time (L-BFGS sums its loss over them)."""
        for block in self.batches():
            yield net(block)


class _SparseTimesWeightT(torch.autograd.Function):
    """``matrix @ weight.T`` for a scipy CSR ``matrix`` (constant) and a torch ``weight``
    ``[K, d]``; the gradient is ``grad.T @ matrix``. scipy's products run in C on the CSR
    directly: at 5% detected genes, 4,000 cells x 20,000 genes x 25 classes, the forward and
    backward pass took 63 ms against 143 ms for torch's dense product on 2 cores, and torch's
    own sparse product 363 ms."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, matrix) -> torch.Tensor:
        ctx.matrix = matrix
        return torch.from_numpy(np.asarray(matrix @ weight.detach().numpy().T, dtype=np.float32))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.from_numpy(np.asarray(ctx.matrix.T @ grad.numpy(), dtype=np.float32)).T, None


class SparseAffineSource:
    """The features of a linear model held as ``offset + S`` (``LRPreprocess.sparse_features``):
    the logits ``S @ W.T + (offset @ W.T + b)`` never need the dense matrix. For LR on every
    gene: memory and time follow the detected values rather than cells x genes."""

    def __init__(self, counts, preprocess: nn.Module):
        self.matrix, offset = preprocess.sparse_features(counts)
        self.offset = torch.as_tensor(offset, dtype=torch.float32)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    @property
    def density(self) -> float:
        return self.matrix.nnz / max(1, self.matrix.shape[0] * self.matrix.shape[1])

    def logit_blocks(self, net: nn.Module) -> Iterator[torch.Tensor]:
        yield sparse_logits(net, self.matrix, self.offset)


def sparse_logits(net: nn.Module, matrix: sp.csr_matrix, offset: torch.Tensor) -> torch.Tensor:
    """A linear ``net``'s logits on the features ``offset + matrix`` (differentiable in its weights)."""
    weight, bias = linear_weights(net)
    return _SparseTimesWeightT.apply(weight, matrix) + (weight @ offset + bias)


# Below this share of detected values (of the selected genes) LR's L-BFGS trains on the sparse
# form; above it the dense product is faster. Measured here (2 cores, 20,000 genes, 25
# classes): sparse 63 ms against dense 143 ms at 5%, 421 against 179 ms at 30%, even near 11%.
# A dense matrix over the cache limit is recomputed on every pass, so it goes sparse too.
SPARSE_MAX_DENSITY = 0.1


def linear_features(counts, preprocess: nn.Module) -> FeatureSource | SparseAffineSource:
    """The training features of a linear model on ``preprocess(counts)``: sparse when the
    selected genes are sparse enough (``SPARSE_MAX_DENSITY``) or too many to cache dense."""
    if not hasattr(preprocess, "sparse_features"):
        return FeatureSource(counts, preprocess)
    source = SparseAffineSource(counts, preprocess)
    n, d = source.matrix.shape
    if source.density <= SPARSE_MAX_DENSITY or n * d * 4 > CACHE_LIMIT_BYTES:
        return source
    return FeatureSource(counts, preprocess)


@torch.no_grad()
def linear_logits(net: nn.Module, source: FeatureSource | SparseAffineSource) -> torch.Tensor:
    """Every row's logits (eval mode): what validation scores a linear fit by."""
    net.eval()
    return torch.cat(list(source.logit_blocks(net)))


@torch.no_grad()
def apply_module(module: nn.Module, source: FeatureSource) -> torch.Tensor:
    """``module`` over every row of ``source`` in eval mode, as one tensor."""
    module.eval()
    return torch.cat([module(b) for b in source.batches()])


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    # A lone trailing cell would break batch norm in training mode and adds only noise.
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches = batches[:-1]
    return batches


def val_scores(y_true: np.ndarray, logits: torch.Tensor, n_classes: int) -> dict:
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


def state_copy(module: nn.Module) -> dict:
    return copy.deepcopy(module.state_dict())


def train_classifier(net: nn.Module, train: FeatureSource, train_y: np.ndarray, val: FeatureSource,
                     val_y: np.ndarray, n_classes: int, recipe: dict, seed: int,
                     log: Log | None = None, stage: str = "classifier",
                     extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     best_score: tuple | None = None) -> tuple:
    """Cross-entropy training of ``net`` (features -> logits); keeps the best epoch on val.

    Selection: highest (val macro F1, val accuracy, -val loss); exact ties keep the earlier epoch. Training
    stops after ``patience`` epochs without improvement (``None``: run every epoch).
    ``best_score`` seeds the comparison (the state ``net`` already has, for fine-tuning).
    ``extra_loss(x, index)`` is added to each minibatch's loss (``index``: its training rows).
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
    best_state = state_copy(net) if best_score is not None else None
    stale = 0
    for epoch in range(n_epochs(recipe, len(train))):
        net.train()
        total, seen = 0.0, 0
        for index in shuffled_batches(len(train), recipe["batch_size"], generator):
            x = train.rows(index)
            loss = F.cross_entropy(net(x), y_train[index])
            if extra_loss is not None:
                loss = loss + extra_loss(x, index)
            if l2:
                loss = loss + l2 * _weight_penalty(net)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(index)
            seen += len(index)
        scores = val_scores(val_y, apply_module(net, val), n_classes)
        if log is not None:
            log(stage, epoch, {"loss": total / max(seen, 1), **scores})
        # Ties in F1 and accuracy go to the lower val loss: on easy data F1 reaches 1.0 in the
        # first epoch, whose barely trained model gives near-uniform confidences.
        score = rank_scores(scores)
        if best_score is None or score > best_score:
            best_score, best_state, stale = score, state_copy(net), 0
        else:
            stale += 1
            if patience is not None and stale >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return best_score


def n_epochs(recipe: dict, n_train: int) -> int:
    """``epochs``, raised so that at least ``min_steps`` optimiser steps are taken: a recipe
    written for tens of thousands of cells (ACTINN: 50 epochs) otherwise takes only ~1,000
    steps on the 2,400 training cells of Data Scarce and stops far from convergence. The
    extension is capped at ``MAX_EPOCH_FACTOR`` x ``epochs`` so that an explicitly small
    budget (smoke runs, tests) stays small. ``max_steps`` caps it the other way, for large
    references: 25 epochs of scDAE's classifier are ~1,000 steps on Default's 10k cells but
    ~8,000 (about 13 minutes here) on 81k atlas cells."""
    epochs = int(recipe["epochs"])
    min_steps, max_steps = int(recipe.get("min_steps") or 0), int(recipe.get("max_steps") or 0)
    steps_per_epoch = max(1, n_train // int(recipe["batch_size"]))
    if min_steps and n_train:
        epochs = max(epochs, min(-(-min_steps // steps_per_epoch), MAX_EPOCH_FACTOR * epochs))
    if max_steps and n_train:
        epochs = min(epochs, max(1, -(-max_steps // steps_per_epoch)))
    return epochs


class EncoderHead(nn.Module):
    """Encoder then head, on preprocessed features: what the base recipes train."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def fit_linear_lbfgs(net: EncoderHead, train: FeatureSource | SparseAffineSource, train_y,
                     val: FeatureSource | SparseAffineSource, val_y,
                     n_classes: int, p: dict, seed: int, log: Log | None = None, stage: str = "lr") -> tuple:
    """Full-batch L-BFGS of a linear head on mean cross-entropy + l2 * sum(W^2) / 2, along
    ``l2_path`` (strongest first, each fit warm-started from the previous one); keeps the l2
    with the best (val macro F1, val accuracy, -val loss), exact ties to the stronger penalty,
    or with ``path_keep`` "last" the whole path's last fit (a refit with its l2 already chosen).

    The loss is deterministic (no batches to shuffle), so ``seed`` plays no part. The gradient
    is summed over row blocks, so a training matrix too large to cache works too. Returns the
    best score; ``net`` is left holding the best weights, in eval mode, and ``net.l2`` the l2.
    """
    weight, bias = linear_weights(net)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    with torch.no_grad():  # start from zero: the path's first (strongest) fit is then cheap
        weight.zero_()
        bias.zero_()
    best_score, best_state, best_l2, stale = None, None, None, 0
    for step, l2 in enumerate(sorted({float(v) for v in p["l2_path"]}, reverse=True)):
        train_loss = _lbfgs(net, train, y, l2, int(p["max_iter"]), p.get("loss", "log"))
        scores = val_scores(np.asarray(val_y), linear_logits(net, val), n_classes)
        if log is not None:
            log(stage, step, {"loss": train_loss, "l2": l2, **scores})
        score = rank_scores(scores)
        if p.get("path_keep") == "last" or best_score is None or score > best_score:
            best_score, best_state, best_l2, stale = score, state_copy(net), l2, 0
        else:
            stale += 1
            if stale >= int(p["path_patience"]):
                break
    net.load_state_dict(best_state)
    net.l2 = best_l2
    net.eval()
    return best_score


def refit_linear_lbfgs(net: EncoderHead, train: FeatureSource | SparseAffineSource, train_y,
                       val: FeatureSource | SparseAffineSource, val_y, n_classes: int,
                       l2: float, kept_l2: float, kept_score: tuple, p: dict, log: Log | None = None) -> float:
    """One L-BFGS fit at ``l2`` warm-started from ``net``'s weights (a fit on a sample of
    ``train``); kept only if its validation score is no worse than ``kept_score``. Returns
    the l2 of the weights ``net`` is left holding."""
    kept = state_copy(net)
    train_loss = _lbfgs(net, train, torch.as_tensor(np.asarray(train_y), dtype=torch.long), l2, int(p["max_iter"]),
                        p.get("loss", "log"))
    scores = val_scores(np.asarray(val_y), linear_logits(net, val), n_classes)
    if log is not None:
        log("lr_refit", 0, {"loss": train_loss, "l2": l2, **scores})
    if rank_scores(scores) < kept_score:
        net.load_state_dict(kept)
        l2 = kept_l2
    net.eval()
    return l2


def rank_scores(scores: dict) -> tuple:
    """How the L-BFGS fits compare on validation: macro F1, then accuracy, then -loss."""
    return scores["val_macro_f1"], scores["val_accuracy"], -scores["val_loss"]


def linear_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "log") -> torch.Tensor:
    """The summed loss of a linear head: cross-entropy, or ``"squared_hinge"`` (the margin base)."""
    return squared_hinge(logits, y) if loss == "squared_hinge" else F.cross_entropy(logits, y, reduction="sum")


def linear_weights(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a linear model's head (LR, the margin base)."""
    head = net.head.linear if hasattr(net.head, "linear") else net.head
    return head.weight, head.bias


def squared_hinge(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The one-vs-rest squared hinge summed over cells and classes (LinearSVC's loss):
    ``max(0, 1 - s_k f_k)^2`` with ``s_k`` +1 for the cell's class and -1 for the others."""
    signs = torch.full_like(logits, -1.0).scatter_(1, y[:, None], 1.0)
    return torch.clamp(1.0 - signs * logits, min=0.0).pow(2).sum()


def _lbfgs(net: EncoderHead, train: FeatureSource | SparseAffineSource, y: torch.Tensor, l2: float,
           max_iter: int, loss: str = "log") -> float:
    """Minimise the mean loss (cross-entropy, or ``loss="squared_hinge"``) + l2 * sum(W^2) / 2
    from the current weights; returns the objective."""
    weight, bias = linear_weights(net)
    n = max(len(train), 1)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        total, start = torch.zeros(()), 0
        for logits in train.logit_blocks(net):  # the full batch, a block of rows at a time
            target = y[start:start + len(logits)]
            part = linear_loss(logits, target, loss) / n
            part.backward()
            total, start = total + part.detach(), start + len(logits)
        penalty = 0.5 * l2 * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    net.train()
    return float(optimizer.step(closure))

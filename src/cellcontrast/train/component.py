"""Steps 2-4 of the paper: embed every cell with the frozen encoder (once), train the
contrastive component h on the training embeddings, freeze it, and fit a fresh head on h(z).

Component early stopping (``select``): by default the epoch with the best VALIDATION macro
F1 of a nearest-class-centroid probe on h(z) (centroids from up to 100 training cells per
class; ties broken by the lower val contrastive loss), which measures what step 4 needs, class
separability, and is deterministic. ``select="loss"`` uses the val contrastive loss alone
(over a fixed set of class-aware batches): it kept decreasing while the classes got no more
separable and picked worse epochs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from cellcontrast.nn.bases import BaseModel, LinearHead, ScdaeHead
from cellcontrast.nn.components import MLPComponent, MLSComponent
from cellcontrast.nn.losses import mls_loss, supcon_loss
from cellcontrast.train.base_model import head_recipe
from cellcontrast.train.cross_batch import CrossBatchSampler
from cellcontrast.train.loops import (
    EncoderHead,
    FeatureSource,
    Log,
    apply_module,
    fit_linear_lbfgs,
    state_copy,
    train_classifier,
)
from cellcontrast.train.recipes import COMPONENT_HEAD_L2_PATH, DEFAULT_PARAMS, resolve_params
from cellcontrast.train.sampler import ClassAwareBatchSampler
from cellcontrast.train.views import thinned_views


def fit_component(base_model: BaseModel, train_counts, train_y: np.ndarray, val_counts,
                  val_y: np.ndarray, n_classes: int, component: str, params: dict | None = None,
                  seed: int = 0, log: Log | None = None,
                  train_groups: np.ndarray | None = None) -> tuple[nn.Module, nn.Module]:
    """Steps 2-4. Returns ``(h, head)``: the frozen component and the freshly trained head.
    ``train_groups``: the training cells' batches, for ``positives="cross_batch"``.

    The base model is not modified: the encoder (and preprocessing) run in eval mode under
    no_grad, once, to produce z. ``params["head"]`` may override the head recipe, which is
    otherwise the base model's own (``base_model.train_params``).
    """
    p = resolve_params(component, params)
    z_train = embed_frozen(base_model, train_counts)
    z_val = embed_frozen(base_model, val_counts)
    z_views = [embed_frozen(base_model, view) for view in
               thinned_views(train_counts, int(p["views"]), p["view_keep"], p["view_dropout"], seed)]
    h = train_component(z_train, train_y, z_val, val_y, n_classes, component, p, seed, log, z_views,
                        train_groups=train_groups)
    head = train_head_on_component(base_model, h, z_train, train_y, z_val, val_y, n_classes,
                                   p.get("head"), seed, log, stage=f"{component}_head",
                                   solver=p["head_solver"], l2_path=p["head_l2_path"], scale=1.0 / p["temperature"])
    return h, head


@torch.no_grad()
def embed_frozen(base_model: BaseModel, counts) -> torch.Tensor:
    """Step 2: z = g(x) for every cell, base model in eval mode, no gradients."""
    base_model.eval()
    return apply_module(_Embedder(base_model), FeatureSource(counts))


def train_component(z_train: torch.Tensor, train_y: np.ndarray, z_val: torch.Tensor,
                    val_y: np.ndarray, n_classes: int, component: str, params: dict | None = None,
                    seed: int = 0, log: Log | None = None, z_views: list[torch.Tensor] | None = None,
                    train_groups: np.ndarray | None = None) -> nn.Module:
    """Step 3: train h on the training embeddings; keep the best epoch on val (``select``).

    ``train_groups``: each training cell's batch; with ``positives="cross_batch"`` the
    positives of an anchor are the cells of its type from other batches only
    (`train.cross_batch`; without two batches, the type's cells as usual).

    ``z_views``: embeddings of noisy views of the training cells (``views.py``), row i a view
    of cell i; each batch then holds its cells' views too, positives of their cell (and, with
    ``view_positives="labels"``, of its whole type). Returns h frozen (no gradients, eval mode).
    """
    p = resolve_params(component, params)
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    torch.manual_seed(seed)
    h, loss_fn = ((MLPComponent(z_train.shape[1], p["hidden_dim"], p["out_dim"]), supcon_loss) if component == "mlp"
                  else (MLSComponent(z_train.shape[1], n_classes, p["hidden_dim"], p.get("class_hidden_dim", 0)),
                        mls_loss))
    tau = p["temperature"]
    y_train_t = torch.as_tensor(train_y, dtype=torch.long)
    y_val_t = torch.as_tensor(val_y, dtype=torch.long)
    sampler, groups_t = _training_sampler(p, train_y, train_groups, bool(z_views), seed)
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
    probe = centroid_subset(train_y, n_classes, seed)

    def criterion() -> tuple[float, ...]:
        """Higher is better: (val nearest-centroid macro F1, -val loss) or (-val loss,)."""
        loss = val_loss()
        if select == "loss":
            return (-loss,), loss
        with torch.no_grad():
            f1 = centroid_f1(h(z_train[probe]), train_y[probe.numpy()], h(z_val), val_y, n_classes)
        return (f1, -loss), loss

    best_score, _ = criterion()
    best_state, stale = state_copy(h), 0
    for epoch in range(int(p["max_epochs"])):
        h.train()
        sampler.set_epoch(epoch)
        total, n_batches = 0.0, 0
        for batch in sampler:
            index = torch.as_tensor(list(batch), dtype=torch.long)
            z, y = _batch(index, z_train, y_train_t, z_views, p["view_positives"])
            loss = loss_fn(h.contrastive_features(z), y, tau, None if groups_t is None else groups_t[index])
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
            best_score, best_state, stale = score, state_copy(h), 0
        else:
            stale += 1
            if p["patience"] is not None and stale >= p["patience"]:
                break
    h.load_state_dict(best_state)
    h.eval()
    h.requires_grad_(False)
    return h


def _training_sampler(p: dict, train_y: np.ndarray, train_groups, views: bool, seed: int):
    """The minibatches of step 3, and each cell's batch as a tensor where the positives are
    cross-batch (``positives="cross_batch"``, two batches or more, no views; else None)."""
    cross = p.get("positives") == "cross_batch" and train_groups is not None \
        and len(np.unique(train_groups)) >= 2 and not views
    if not cross:
        return ClassAwareBatchSampler(train_y, p["batch_size"], p["samples_per_class"], seed=seed,
                                      balanced=p["balanced_batches"]), None
    groups = np.unique(train_groups, return_inverse=True)[1]
    return CrossBatchSampler(train_y, groups, p["batch_size"], p["samples_per_class"], seed=seed), \
        torch.as_tensor(groups)


def _batch(index: torch.Tensor, z_train: torch.Tensor, y_train: torch.Tensor, z_views, positives: str):
    """A batch's embeddings and contrastive labels, with its cells' views when there are any
    (labelled by type, or by cell for ``positives="self"``)."""
    z, y = z_train[index], y_train[index]
    if not z_views:
        return z, y
    return (torch.cat([z, *(zv[index] for zv in z_views)]),
            (y if positives == "labels" else index).repeat(1 + len(z_views)))


CENTROID_CELLS_PER_CLASS = 100


def centroid_subset(y: np.ndarray, n_classes: int, seed: int) -> torch.Tensor:
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


def centroid_f1(e_train: torch.Tensor, y_train: np.ndarray, e_val: torch.Tensor,
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
                            solver: str = "lbfgs", l2_path: list[float] | None = None,
                            scale: float = 10.0) -> nn.Module:
    """Step 4: a fresh head on the frozen h(z); h itself only runs in eval mode under no_grad.

    A linear head (LR, ACTINN) is fitted by L-BFGS along ``l2_path`` (the mlp recipe's
    ``COMPONENT_HEAD_L2_PATH`` by default) when ``solver`` is "lbfgs"; otherwise, and always for scDAE's
    MLP head, it is trained with the base model's head recipe (``head_params`` overrides it).
    "centroid": nothing is trained (`centroid_head`), for any base.
    """
    if solver not in ("lbfgs", "adam", "centroid"):
        raise ValueError(f"head solver must be lbfgs, adam or centroid, not {solver!r}")
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    e_train, e_val = apply_module(h, FeatureSource(z_train)), apply_module(h, FeatureSource(z_val))
    if solver == "centroid":
        return centroid_head(e_train, train_y, n_classes, scale)
    if solver == "lbfgs" and isinstance(base_model.head, LinearHead):
        head = fresh_head(base_model, h.out_dim, n_classes)
        path = list(l2_path or COMPONENT_HEAD_L2_PATH)
        recipe = {**DEFAULT_PARAMS["lr"], "l2_path": path}  # max_iter, path_patience as LR's
        fit_linear_lbfgs(EncoderHead(nn.Identity(), head), FeatureSource(e_train), train_y,
                          FeatureSource(e_val), val_y, n_classes, recipe, seed, log, stage=stage)
        return head
    base_params = getattr(base_model, "train_params", None) or DEFAULT_PARAMS[base_model.name]
    own = {"lr": base_params["component_head_lr"]} if base_params.get("component_head_lr") else {}
    recipe = head_recipe(base_model.name, {
        **base_params, "head": {**own, **(base_params.get("head") or {}), **(head_params or {})}})
    torch.manual_seed(seed)
    head = fresh_head(base_model, h.out_dim, n_classes)
    train_classifier(head, FeatureSource(e_train), train_y, FeatureSource(e_val), val_y, n_classes,
                     recipe, seed, log, stage=stage)
    return head


def centroid_head(e_train: torch.Tensor, train_y: np.ndarray, n_classes: int, scale: float) -> LinearHead:
    """The nearest-class-centroid classifier on the component's output as a linear head:
    logit_k = scale * <h(z), c_k>, c_k the unit-norm mean of class k's training outputs (cosine
    similarity: h(z) is unit-norm per latent space). Only means are fitted, so a rare type's few
    cells set its centroid as surely as a frequent type's many (no softmax head to overfit);
    ``scale`` (1 / the contrastive temperature) puts the logits on the scale the component was
    trained at, and the chain's temperature calibrates them. A linear head: the exported graph
    needs nothing new."""
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    sums = torch.zeros(n_classes, e_train.shape[1]).index_add_(0, y, e_train.float())
    head = LinearHead(e_train.shape[1], n_classes)
    with torch.no_grad():
        head.linear.weight.copy_(F.normalize(sums, dim=1) * float(scale))
        head.linear.bias.zero_()
    head.requires_grad_(False)
    return head.eval()


def fresh_head(base_model: BaseModel, in_dim: int, n_classes: int) -> nn.Module:
    old = base_model.head
    if isinstance(old, ScdaeHead):
        return ScdaeHead(in_dim, n_classes, old.hidden_dims, old.dropout_p)
    if isinstance(old, LinearHead):
        return LinearHead(in_dim, n_classes, xavier=old.xavier)
    raise TypeError(f"no head recipe for {type(old).__name__}")


class _Embedder(nn.Module):
    def __init__(self, model: BaseModel):
        super().__init__()
        self.model = model

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.model.embed(counts)

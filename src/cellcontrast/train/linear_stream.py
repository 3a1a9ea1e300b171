"""A linear chain (LR, the margin base) refitted on every cell of a reference read in chunks.

`fit` on a reference too large to hold makes its choices on a sample and then calls this for
the chosen linear chain: one pass for the gene statistics (`GeneMoments`: the same HVGs, means
and sds `LRPreprocess.fit` would take from those cells), then epochs of mini-batch Adam on the
sample fit's loss, started from the sample fit's weights. The penalty keeps the same total
weight against the data as the sample fit's (``l2 x n_sample / n_cells``, as the in-memory
refit of a path sample does). A checkpoint after the statistics and after every epoch lets a
killed fit resume where it stopped, with the result it would have had.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from cellcontrast.core.files import atomic_path
from cellcontrast.nn.bases import IdentityEncoder, LinearHead
from cellcontrast.nn.chain import ChainModule
from cellcontrast.nn.preprocessing import GeneMoments, LRPreprocess
from cellcontrast.train.loops import linear_loss, linear_weights, sparse_logits

# blocks(rng): the training cells as (raw counts in the chain's genes, class codes) chunks;
# with a generator, in an order it shuffles (each epoch its own), without one in file order.
Blocks = Callable[[np.random.Generator | None], Iterator[tuple[sp.csr_matrix, np.ndarray]]]


def stream_moments(blocks: Blocks, n_genes: int, target_sum: float) -> GeneMoments:
    """The gene sums over every block (``n_cells`` counts the cells)."""
    moments = GeneMoments(n_genes, target_sum)
    for counts, _ in blocks(None):
        moments.add(counts)
    return moments


def carried_weights(weight: torch.Tensor, old_genes: np.ndarray, new_genes: np.ndarray) -> torch.Tensor:
    """The head's columns moved to a new gene selection: a gene kept by both keeps its weights,
    a newly selected one starts at zero."""
    out = torch.zeros(weight.shape[0], len(new_genes), dtype=weight.dtype)
    position = {int(g): i for i, g in enumerate(old_genes)}
    for j, gene in enumerate(new_genes):
        if int(gene) in position:
            out[:, j] = weight[:, position[int(gene)]]
    return out


def _save(state: dict, path: Path) -> None:
    """Atomically: a kill while writing leaves the previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path | None, key: str) -> dict | None:
    """The checkpoint at ``path`` if it was made by the same refit (``key``)."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("key") != key:
        print(f"note: {path} was made by another fit; refitting from the start", file=sys.stderr)
        return None
    return state


def refit_linear_stream(module: ChainModule, blocks: Blocks, *, n_hvg, l2: float, loss: str, epochs: int,
                        batch_size: int, lr: float, seed: int, checkpoint: Path | None = None,
                        validate: Callable[[ChainModule], tuple] | None = None,
                        moments: Callable[[], GeneMoments] | None = None, desc: str = "refit") -> dict:
    """Refit ``module``'s preprocessing and linear head on every cell ``blocks`` yields; returns
    what was done (cells, epochs, the mean training loss of each epoch).

    ``n_hvg``: the gene selection the sample fit chose (``"all"`` or a count). ``l2``: the
    penalty per cell of the full reference. ``validate(module)``: a score of held-out cells,
    recorded after each epoch (and of the sample fit's weights, epoch 0), not a choice: the
    last epoch is kept (why: `experiments.fit_stream`).
    ``moments()``: the gene statistics computed elsewhere (shards on a cluster) instead of a
    pass over ``blocks``. Same seed, same weights, resumed or not.
    """
    started = time.perf_counter()
    key = repr((str(n_hvg), float(l2), loss, epochs, batch_size, float(lr), seed, module.n_classes,
                module.preprocess.n_genes, validate is not None))
    state = _load(checkpoint, key) or _first_state(module, blocks, n_hvg, key, validate, moments)
    if checkpoint is not None:
        _save(state, checkpoint)
    old = module.preprocess
    new = LRPreprocess(old.n_genes, int(state["n_selected"]), old.target_sum, old.clip, old.standardize)
    new.load_state_dict(state["preprocess"])
    _replace_linear(module, new, state["weight"], state["bias"])
    weight, bias = linear_weights(module)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    n_cells = int(state["n_cells"])
    schedule = {"lr": lr, "total": max(1, epochs * -(-n_cells // batch_size)), "batch_size": batch_size}
    with tqdm(total=epochs * n_cells, initial=int(state["epoch"]) * n_cells, desc=desc, unit="cell", unit_scale=True,
              file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        for epoch in range(int(state["epoch"]), epochs):
            module.train()
            rng = np.random.default_rng([seed, epoch])  # draws the blocks' order, then each block's batches
            mean_loss, step = _epoch(module, optimizer, blocks(rng), rng, l2, loss, int(state["step"]), schedule, bar)
            state = {**state, "epoch": epoch + 1, "step": step, "losses": [*state["losses"], mean_loss],
                     "weight": weight.detach().clone(), "bias": bias.detach().clone(),
                     "optimizer": optimizer.state_dict()}
            if validate is not None:
                state["scores"] = [*state["scores"], list(validate(module.eval()))]
            if checkpoint is not None:
                _save(state, checkpoint)
    module.eval()
    return {"cells": n_cells, "epochs": epochs, "losses": [round(v, 5) for v in state["losses"]], "l2": l2,
            "n_selected": module.preprocess.n_selected, "seconds": round(time.perf_counter() - started, 1),
            **({"val_macro_f1": [round(s[0], 4) for s in state["scores"]]} if validate is not None else {})}


def _first_state(module: ChainModule, blocks: Blocks, n_hvg, key: str, validate, computed=None) -> dict:
    """The gene statistics' pass: the new preprocessing, the sample fit's weights moved onto it."""
    old = module.preprocess
    moments = stream_moments(blocks, old.n_genes, old.target_sum) if computed is None else computed()
    new = LRPreprocess.from_moments(moments, n_hvg, clip=old.clip, standardize=old.standardize)
    weight, bias = linear_weights(module)
    state = {"key": key, "preprocess": new.state_dict(), "n_selected": new.n_selected, "n_cells": moments.n_cells,
             "epoch": 0, "step": 0, "losses": [], "scores": [], "optimizer": None, "bias": bias.detach().clone(),
             "weight": carried_weights(weight.detach(), old.selected_genes(), new.selected_genes())}
    if validate is not None:
        _replace_linear(module, new, state["weight"], state["bias"])
        state["scores"] = [list(validate(module.eval()))]
    return state


def _epoch(module: ChainModule, optimizer, blocks, rng: np.random.Generator, l2: float, loss: str, step: int,
           schedule: dict, bar) -> tuple:
    """One pass of mini-batches over ``blocks``; the mean loss and the step count after it."""
    weight, _ = linear_weights(module)
    total, seen = 0.0, 0
    for counts, y in blocks:
        matrix, offset = module.preprocess.sparse_features(counts)
        offset = torch.as_tensor(offset, dtype=torch.float32)
        target = torch.as_tensor(np.asarray(y), dtype=torch.long)
        for rows in np.array_split(rng.permutation(len(target)), max(1, len(target) // schedule["batch_size"])):
            for group in optimizer.param_groups:  # linear decay to zero over the refit
                group["lr"] = schedule["lr"] * max(0.0, 1.0 - step / schedule["total"])
            value = linear_loss(sparse_logits(module, matrix[rows], offset), target[rows], loss) / len(rows)
            objective = value + 0.5 * l2 * weight.pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            step += 1
            total, seen = total + float(value.detach()) * len(rows), seen + len(rows)
        bar.update(len(target))
    return total / max(seen, 1), step


def _replace_linear(module: ChainModule, preprocess: LRPreprocess, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """The chain's preprocessing, identity encoder and head resized to a new gene selection."""
    module.preprocess = preprocess
    module.encoder = IdentityEncoder(preprocess.n_selected)
    module.head = LinearHead(preprocess.n_selected, weight.shape[0], xavier=module.head.xavier)
    with torch.no_grad():
        module.head.linear.weight.copy_(weight)
        module.head.linear.bias.copy_(bias)

"""`fit` on a reference larger than memory: every choice on a sample, the chosen linear chain
refitted on every cell read in chunks.

A reference given as an .h5ad path (as `cellcontrast fit` gives it: only its cell table is read
first) or as a backed AnnData, with more than ``max_cells_in_memory`` labelled cells, is never
read whole. A stratified sample of
``sample_cells`` (each type's share, at least ``MIN_SAMPLE_PER_TYPE`` cells or all it has) goes
through `fit_annotator` as any reference does: the candidates, the validation (grouped with a
batch key), the choice, the temperature and thresholds. Each linear chain whose probabilities it
exports (LR, the margin base, an ensemble's linear members) is then refitted on every training cell by
`train.linear_stream`: its gene statistics in one pass over the file, then ``REFIT_EPOCHS``
epochs of mini-batch Adam, with a checkpoint after each so that ``resume`` continues a killed
fit. A deep chain (scDAE, a component) is kept as the sample trained it, and the card says so.
Memory follows the sample and one block of rows, not the reference.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellcontrast.annotation.genes import align_genes
from cellcontrast.annotation.query import open_query
from cellcontrast.annotation.stream import read_ahead, to_model_columns
from cellcontrast.core.errors import InputError
from cellcontrast.core.names import LABEL, LINEAR_BASES
from cellcontrast.data.atlas import apply_filters, read_obs
from cellcontrast.model.chain import Chain
from cellcontrast.nn.chain import chain_config, predict_logits
from cellcontrast.nn.preprocessing import GeneMoments
from cellcontrast.train.linear_stream import refit_linear_stream
from cellcontrast.train.loops import rank_scores, val_scores

# A type keeps at least this many cells in the sample (all it has below): its validation and
# its choice of L2 see it. Above it, each type keeps its share.
MIN_SAMPLE_PER_TYPE = 100
# The refit's schedule: from the sample fit's weights, Adam at REFIT_LR decayed linearly to zero
# (``refit_epochs=0``: the sample fit's weights on the full reference's gene statistics). The
# last epoch is kept. The sample's validation cells are scored after each epoch (the card shows
# it) but do not choose one: MIN_SAMPLE_PER_TYPE gives them more rare cells than the reference
# the refit learns its class proportions from, and they prefer the sample fit. On 1M simulated
# cells (`--sample-cells 20000`, svm) they scored the sample fit 0.876 and the refit's epochs
# 0.78-0.85, while on the new individual the sample fit scored 0.733 and the 2-epoch refit 0.840;
# with a floor of 2 (250k, lr) they rise with the refit, 0.599 -> 0.676 (docs/results/
# benchmarks.md). REFIT_LR on the same validation cells, after 4 epochs: 1e-3 0.827, 3e-4 0.847,
# 1e-4 0.845.
REFIT_EPOCHS, REFIT_BATCH, REFIT_LR = 4, 512, 3e-4
# Rows per read, and reads mixed into one block of shuffled mini-batches: a file sorted by
# type or donor still gives mixed batches, and a block stays small (32k rows).
PIECE_ROWS, PIECES_PER_BLOCK = 2048, 16
# Rows per cluster task of the gene statistics (`fit --workers` / `--scheduler`).
SHARD_ROWS = 100_000
# The column carrying each sampled cell's row in the file, through `fit_annotator`.
ROW = "_cellcontrast_row"


@dataclass
class StreamingReference:
    """A backed reference, its sample, and how each exported linear chain is refitted on it."""

    path: Path
    layer: str | None
    obs: pd.DataFrame
    labels: np.ndarray  # each row's label ("" where left out: no label, filtered)
    sample: np.ndarray  # sorted rows
    seed: int
    checkpoints: Path | None
    epochs: int = REFIT_EPOCHS
    cluster: tuple[int, str | None] = (1, None)  # (workers, scheduler): the gene statistics by shards

    @property
    def n_cells(self) -> int:
        return int((self.labels != "").sum())

    def read_sample(self) -> anndata.AnnData:
        """The sampled cells in memory (raw counts as stored, obs with their file rows)."""
        with h5py.File(self.path, "r") as f, ThreadPoolExecutor(2) as pool:
            matrix = open_query(f, self.layer, pool)
            parts = []
            for lo in range(0, matrix.n_obs, PIECE_ROWS * PIECES_PER_BLOCK):
                hi = min(lo + PIECE_ROWS * PIECES_PER_BLOCK, matrix.n_obs)
                wanted = self.sample[(self.sample >= lo) & (self.sample < hi)] - lo
                if wanted.size:
                    parts.append(sp.csr_matrix(matrix.rows(lo, hi))[wanted])
            X, genes = sp.vstack(parts, format="csr"), matrix.var_names
        obs = self.obs.iloc[self.sample].copy()
        obs[ROW] = self.sample
        return anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes.astype(str))))

    def refit(self, name: str, chain: Chain, reference: anndata.AnnData, trained: np.ndarray,
              validation: np.ndarray | None = None) -> Chain:
        """``chain`` (trained on the sample's rows ``trained``) refitted on every training cell of
        the file when it is linear, the sample's ``validation`` rows (if any) scored by epoch;
        a deep chain as it is, with a note in its config."""
        config = chain.config
        base, component = config.get("base"), config.get("component", "none")
        if base not in LINEAR_BASES or component != "none":
            config["fit"]["streamed"] = {"cells": 0, "note": f"trained on the sample of {len(self.sample)} cells"}
            return chain
        # Sampled cells the chain did not train on (its validation part, a test part) stay out.
        left_out = np.setdiff1d(self.sample, reference.obs[ROW].to_numpy()[trained])
        classes = list(chain.classes)
        codes = pd.Categorical(self.labels, categories=classes).codes.astype(np.int64)
        codes[left_out] = -1
        p, choices = config["params"][base], config["fit"]["choices"]
        n_rows = int((codes >= 0).sum())
        l2 = float(choices.get("chosen_l2") or p["l2"]) * int(config["fit"]["n_train"]) / max(n_rows, 1)
        with h5py.File(self.path, "r") as f, ThreadPoolExecutor(2) as pool:  # gzip chunks inflate on threads
            matrix = open_query(f, self.layer, pool)
            col_map = align_genes(matrix.var_names, chain.genes)
            blocks = row_blocks(matrix, codes, col_map, len(chain.genes))
            moments = None if self.cluster == (1, None) else (
                lambda: self.moments_on_cluster(codes, col_map, len(chain.genes), chain.module.preprocess.target_sum))
            checkpoint = None if self.checkpoints is None else self.checkpoints / f"{name}.pt"
            info = refit_linear_stream(chain.module, blocks, n_hvg=choices["n_hvg"], l2=l2,
                                       loss=p.get("loss", "log"), epochs=self.epochs, batch_size=REFIT_BATCH,
                                       lr=REFIT_LR, seed=self.seed, checkpoint=checkpoint,
                                       validate=_validator(reference, validation, classes), moments=moments,
                                       desc=f"refit {name} on every cell")
        seconds = info.pop("seconds")  # said, not stored: the same seed writes the same file
        print(f"note: {name} refitted on {info['cells']} cells in {info['epochs']} epochs ({seconds:.0f} s)",
              file=sys.stderr)
        config["fit"].update({"n_train": info["cells"], "streamed": {**info, "sample_cells": len(self.sample)}})
        return Chain(chain.module, chain_config(chain.module, config))

    def moments_on_cluster(self, codes: np.ndarray, col_map: np.ndarray, n_model: int,
                           target_sum: float) -> GeneMoments:
        """The gene statistics of the rows with a code, a shard of ``SHARD_ROWS`` rows per task on
        the cluster (``fit --workers`` / ``--scheduler``; its workers read the same file path)."""
        from cellcontrast.core.engine import task_executor

        moments = GeneMoments(n_model, target_sum)
        with task_executor(*self.cluster, pin=True) as executor:
            futures = [executor.submit(shard_moments, str(self.path), self.layer, lo, codes[lo:lo + SHARD_ROWS],
                                       col_map, n_model, target_sum)
                       for lo in range(0, len(codes), SHARD_ROWS) if (codes[lo:lo + SHARD_ROWS] >= 0).any()]
            for future in futures:  # summed in shard order: the same sums whatever finishes first
                sums, n_cells = future.result()
                moments.sums += sums
                moments.n_cells += n_cells
        return moments

    def finish(self) -> None:
        """The fit is written: its checkpoints go."""
        if self.checkpoints is not None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)


def shard_moments(path: str, layer: str | None, lo: int, codes: np.ndarray, col_map: np.ndarray, n_model: int,
                  target_sum: float) -> tuple[np.ndarray, int]:
    """`GeneMoments` sums of the rows ``lo .. lo + len(codes)`` that have a code (a cluster task)."""
    moments = GeneMoments(n_model, target_sum)
    with h5py.File(path, "r") as f:
        matrix = open_query(f, layer)
        for start in range(0, len(codes), PIECE_ROWS):
            keep = np.flatnonzero(codes[start:start + PIECE_ROWS] >= 0)
            if keep.size:
                moments.add(_model_csr(matrix, lo + start, lo + min(start + PIECE_ROWS, len(codes)), col_map,
                                       n_model)[keep])
    return moments.sums, moments.n_cells


def _model_csr(matrix, lo: int, hi: int, col_map: np.ndarray, n_model: int) -> sp.csr_matrix:
    """Rows [lo, hi) of the file checked as raw counts, in the model's genes."""
    return to_model_columns(matrix.rows(lo, hi), col_map, n_model, lo, matrix.where,
                            " (the reference's raw counts)").csr()


def _validator(reference: anndata.AnnData, rows: np.ndarray | None, classes: list[str]):
    """A chain's (macro F1, accuracy, -loss) on the sample's validation ``rows``, or None."""
    if rows is None or not len(rows):
        return None
    counts = reference.X[rows]
    y = np.array(pd.Categorical(reference.obs[LABEL].astype(str).to_numpy()[rows], categories=classes).codes,
                 dtype=np.int64)  # a writable copy: torch warns on pandas' read-only codes

    def validate(module) -> tuple:
        return rank_scores(val_scores(y, torch.as_tensor(predict_logits(module, counts)), len(classes)))

    return validate


def row_blocks(matrix, codes: np.ndarray, col_map: np.ndarray, n_model: int):
    """`train.linear_stream.Blocks` over the rows with a code (>= 0), in the model's genes."""
    pieces = [(lo, min(lo + PIECE_ROWS, matrix.n_obs)) for lo in range(0, matrix.n_obs, PIECE_ROWS)]
    pieces = [(lo, hi) for lo, hi in pieces if (codes[lo:hi] >= 0).any()]

    def blocks(rng: np.random.Generator | None):
        order = pieces if rng is None else [pieces[i] for i in rng.permutation(len(pieces))]

        def read():
            for i in range(0, len(order), PIECES_PER_BLOCK):
                parts, ys = [], []
                for lo, hi in order[i:i + PIECES_PER_BLOCK]:
                    csr = _model_csr(matrix, lo, hi, col_map, n_model)
                    keep = np.flatnonzero(codes[lo:hi] >= 0)
                    parts.append(csr[keep])
                    ys.append(codes[lo:hi][keep])
                yield sp.vstack(parts, format="csr"), np.concatenate(ys)

        return read_ahead(read())

    return blocks


def sample_rows(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted rows of a stratified sample of about ``n`` labelled cells: each type its share, at
    least ``MIN_SAMPLE_PER_TYPE`` (or all it has). Same seed, same sample."""
    rng = np.random.default_rng([seed, 7])
    labelled = labels != ""
    fraction = n / max(int(labelled.sum()), 1)
    rows = []
    for name in np.unique(labels[labelled]):
        members = np.flatnonzero(labels == name)
        k = min(members.size, max(MIN_SAMPLE_PER_TYPE, round(members.size * fraction)))
        rows.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(rows))


def streaming_reference(adata: anndata.AnnData | str | Path, labels_key: str, layer: str | None, filters: dict | None, *,
                        max_cells_in_memory: int, sample_cells: int, seed: int, out: Path | None,
                        resume: bool, refit_epochs: int = REFIT_EPOCHS,
                        cluster: tuple[int, str | None] = (1, None)) -> StreamingReference | None:
    """The streaming plan for a reference (a backed AnnData, or an .h5ad path) with more labelled
    cells than ``max_cells_in_memory`` (None otherwise: the reference is read whole)."""
    if isinstance(adata, anndata.AnnData) and not adata.isbacked:
        if resume:
            raise InputError("--resume continues a fit on a reference read in chunks; this one is in memory")
        return None
    path = Path(adata if not isinstance(adata, anndata.AnnData) else adata.filename)
    obs = read_obs(path) if not isinstance(adata, anndata.AnnData) else adata.obs
    if labels_key not in obs.columns:
        return None  # prepare_atlas refuses it in its own words
    raw = obs[labels_key]
    labels = np.where(raw.isna().to_numpy(), "", raw.astype(str).str.strip().to_numpy()).astype(object)
    labels[~apply_filters(obs, filters, "the reference")] = ""
    if int((labels != "").sum()) <= max_cells_in_memory:
        if resume:
            raise InputError(f"--resume: the reference holds at most {max_cells_in_memory} cells and is fitted in "
                             "memory, without checkpoints")
        return None
    if sample_cells < 1000:
        raise InputError(f"--sample-cells {sample_cells}: the choices need at least 1000 cells")
    if refit_epochs < 0:
        raise InputError(f"--refit-epochs {refit_epochs} must be 0 (the sample's weights) or more")
    checkpoints = None if out is None else Path(out).with_suffix(".fit-checkpoint")
    if checkpoints is not None:
        if checkpoints.exists() and not resume:
            shutil.rmtree(checkpoints)
        elif resume and not checkpoints.exists():
            print(f"note: --resume: no checkpoint at {checkpoints}; fitting from the start", file=sys.stderr)
        checkpoints.mkdir(parents=True, exist_ok=True)
    elif resume:
        raise InputError("--resume needs --out: the checkpoints live beside the annotator")
    stream = StreamingReference(path, layer, obs, labels.astype(str), np.empty(0, dtype=np.int64), seed,
                                checkpoints, refit_epochs, cluster)
    stream.sample = sample_rows(stream.labels, sample_cells, seed)
    print(f"note: {stream.n_cells} cells: every choice on a stratified sample of {len(stream.sample)}, then the "
          "chosen linear chain refitted on every cell read in chunks", file=sys.stderr)
    return stream

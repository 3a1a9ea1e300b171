"""Stream the rows of a query matrix through the annotator: the top-3 classes and
probabilities of every cell (all probabilities and a novelty score when asked for)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm  # plain bars: tqdm.auto warns in notebooks without ipywidgets

from cellcontrast.annotation.model import Annotator
from cellcontrast.annotation.stream import (
    INFERENCE_ROWS,
    read_ahead,
    read_chunks,
    to_model_columns,
    top3,
)
from cellcontrast.core.errors import InputError


@dataclass
class Predicted:
    """The streamed predictions of every cell: top-3 classes and probabilities (and all)."""

    top_idx: np.ndarray
    top_p: np.ndarray
    probabilities: np.ndarray | None
    col_map: np.ndarray
    found: int
    novelty: np.ndarray | None = None


def progress_bar(progress: bool | None):
    """A function opening a tqdm bar on stderr (None: shown when stderr is a terminal)."""
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    return lambda total, desc: tqdm(total=total, unit="cells", desc=desc, file=sys.stderr, disable=disable)


def predict_matrix(model: Annotator, matrix, col_map: np.ndarray, batch_size: int, *,
                   probabilities: bool = False, novelty: str | None = None, progress: bool | None = None) -> Predicted:
    """Stream every row of ``matrix`` (`open_query` or `MemoryMatrix`) through the model;
    ``novelty``: also each cell's score of that name (`Annotator.novelty_scores`)."""
    n, n_model, n_classes = matrix.n_obs, len(model.genes), len(model.classes)
    top_idx = np.zeros((n, min(3, n_classes)), dtype=np.int32)
    top_p = np.zeros(top_idx.shape, dtype=np.float32)
    probs_all = np.zeros((n, n_classes), dtype=np.float32) if probabilities else None
    width = model.novelty_width(novelty)
    novelty_all = np.zeros((n, width) if width > 1 else n, dtype=np.float32) if novelty else None
    chunks = read_ahead(read_chunks(matrix, batch_size))
    with progress_bar(progress)(n, "annotate") as bar, \
            contextlib.closing(chunks):  # stops the reader before the file closes, even on error
        for start, chunk in chunks:
            mapped = to_model_columns(chunk, col_map, n_model, start, matrix.where, matrix.hint)
            # onnxruntime gets at most INFERENCE_ROWS rows at a time: its activations
            # (several [rows, width] tensors) stay small while reads stay large.
            for lo in range(0, mapped.n_rows, INFERENCE_ROWS):
                hi = min(lo + INFERENCE_ROWS, mapped.n_rows)
                a, b = start + lo, start + hi
                probs, score = model.predict(mapped.rows(lo, hi), novelty=novelty)
                if probs.shape != (b - a, n_classes):
                    raise InputError(f"the model returned shape {probs.shape} for {b - a} cells; re-export it")
                top_idx[a:b], top_p[a:b] = top3(probs)
                if probs_all is not None:
                    probs_all[a:b] = probs
                if novelty_all is not None:
                    novelty_all[a:b] = score
                bar.update(b - a)
    return Predicted(top_idx, top_p, probs_all, col_map, int((col_map >= 0).sum()), novelty_all)


def joined_predictions(parts: list[Predicted], col_map: np.ndarray) -> Predicted:
    """The predictions of consecutive row ranges, as one (`row_ranges`)."""
    def cat(name):
        return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])
    return Predicted(cat("top_idx"), cat("top_p"), cat("probabilities"), col_map, parts[0].found, cat("novelty"))

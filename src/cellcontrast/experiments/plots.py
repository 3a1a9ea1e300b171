"""Figures logged with every training: confusion matrix and a 2-D picture of the embedding."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str):
    """Row-normalised confusion matrix (recall on the diagonal), readable for up to ~100 classes."""
    n = len(class_names)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, min(22.0, 0.22 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(n)
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=max(4, 9 - n // 15))
    ax.set_yticks(ticks, class_names, fontsize=max(4, 9 - n // 15))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the true class")
    fig.tight_layout()
    return fig


def embedding_figure(embedding: np.ndarray, labels: np.ndarray, class_names: list[str], title: str):
    """First two principal components of an embedding, one colour per class."""
    centred = embedding - embedding.mean(axis=0)
    # PCA by SVD: deterministic and cheap for a few thousand cells.
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred[:, 0], np.zeros(len(centred))]
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(class_names) <= 20 else "gist_ncar")
    colours = cmap(np.linspace(0, 1, max(len(class_names), 2), endpoint=False))
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[labels], s=4, alpha=0.7, linewidths=0)
    if len(class_names) <= 25:
        for k, name in enumerate(class_names):
            ax.scatter([], [], color=colours[k], label=name, s=12)
        ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

"""`annotate --plots DIR`: what an annotated query looks like. The cells in 2-D (UMAP of the
square-root class probabilities, the space majority voting clusters in; at most
``MAX_LAYOUT_CELLS`` cells, drawn with a seed) coloured by label and by confidence, the count
per label, with ``--coverage`` the prediction-set sizes (overall and per label), and, given the
query's own labels, a contingency heatmap and per-label accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path

MAX_LAYOUT_CELLS = 50_000
PREFIX = "cellcontrast_"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return path


def layout(probabilities: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn (at most MAX_LAYOUT_CELLS) and their 2-D UMAP coordinates."""
    import umap

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(probabilities), size=min(MAX_LAYOUT_CELLS, len(probabilities)), replace=False))
    points = np.sqrt(probabilities[rows], dtype=np.float32)
    if len(rows) < 5:
        return rows, np.zeros((len(rows), 2), dtype=np.float32)
    reducer = umap.UMAP(n_neighbors=min(15, len(rows) - 1), random_state=seed, n_jobs=1)
    return rows, reducer.fit_transform(points)


def _scatter_labels(plt, xy: np.ndarray, labels: pd.Series, title: str):
    fig, ax = plt.subplots(figsize=(9, 7))
    names = labels.value_counts().index.tolist()
    cmap = plt.get_cmap("tab20" if len(names) <= 20 else "gist_ncar")
    for i, name in enumerate(names):
        mask = (labels == name).to_numpy()
        ax.scatter(xy[mask, 0], xy[mask, 1], s=2, color=cmap(i / max(1, len(names) - 1)), label=name, rasterized=True)
    if len(names) <= 40:
        ax.legend(markerscale=5, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    ax.set(title=title, xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    return fig


def _contingency(plt, given: pd.Series, predicted: pd.Series):
    table = pd.crosstab(given, predicted, normalize="index")
    fig, ax = plt.subplots(figsize=(0.3 * table.shape[1] + 4, 0.3 * table.shape[0] + 3))
    image = ax.imshow(table.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
    ax.set(xlabel="predicted", ylabel="given label", title="Share of each given label by predicted label")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return fig


def _set_sizes(plt, size: np.ndarray, labels: pd.Series, label_col: str):
    """How many labels each cell's prediction set holds (0: none plausible, a novelty signal),
    and the mean per label: where the annotation is ambiguous."""
    per_label = pd.Series(size, index=labels.index).groupby(labels.to_numpy()).mean().sort_values()
    fig, (ax_hist, ax_label) = plt.subplots(1, 2, figsize=(13, 0.25 * len(per_label) + 2.5), layout="constrained",
                                           gridspec_kw={"width_ratios": [4, 6]})
    counts = np.bincount(size.astype(int))
    ax_hist.bar(np.arange(counts.size), counts)
    ax_hist.set(xlabel="labels in the prediction set", ylabel="cells", title="Prediction-set sizes",
                xticks=np.arange(counts.size))
    ax_label.barh(per_label.index, per_label.to_numpy())
    ax_label.set(xlabel="mean set size", title=f"Mean set size per {label_col}")
    ax_label.tick_params(axis="y", labelsize=7)
    return fig


def _unfamiliar(plt, xy: np.ndarray, unfamiliar: np.ndarray, raw_labels: pd.Series):
    """Where the ``--flag-unseen`` cells lie (a tight group of them: a type the reference may
    lack) and which label each would have carried."""
    fig, (ax_map, ax_bar) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [1.2, 1]})
    ax_map.scatter(xy[~unfamiliar, 0], xy[~unfamiliar, 1], s=2, c="lightgrey", rasterized=True, label="familiar")
    ax_map.scatter(xy[unfamiliar, 0], xy[unfamiliar, 1], s=3, c="crimson", rasterized=True, label="unfamiliar")
    ax_map.legend(markerscale=5, loc="best")
    ax_map.set(title=f"Cells flagged by --flag-unseen: {int(unfamiliar.sum())} of {unfamiliar.size}", xticks=[],
               yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    counts = raw_labels[unfamiliar].value_counts().head(25)
    ax_bar.barh(counts.index[::-1], counts.to_numpy()[::-1], color="crimson")
    ax_bar.set(xlabel="unfamiliar cells", title="The label they would have carried")
    ax_bar.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def write_plots(out_dir: str | Path, obs: pd.DataFrame, probabilities: np.ndarray, *,
                label_key: str | None = None, seed: int = 0) -> list[Path]:
    """Write the PNG files into ``out_dir`` (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--plots {out_dir} is a file; name a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    label_col = f"{PREFIX}majority_voting" if f"{PREFIX}majority_voting" in obs else f"{PREFIX}label"
    labels = obs[label_col].astype(str)
    rows, xy = layout(probabilities, seed)
    paths = [_save(_scatter_labels(plt, xy, labels.iloc[rows].reset_index(drop=True), f"Cells by {label_col}"),
                   out_dir / "umap_labels.png")]
    fig, ax = plt.subplots(figsize=(8, 7))
    points = ax.scatter(xy[:, 0], xy[:, 1], s=2, c=obs[f"{PREFIX}confidence"].to_numpy()[rows], cmap="magma",
                        vmin=0, vmax=1, rasterized=True)
    fig.colorbar(points, ax=ax, label="confidence")
    ax.set(title="Cells by confidence", xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    paths.append(_save(fig, out_dir / "umap_confidence.png"))
    counts = labels.value_counts()
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(counts) + 1.5))
    ax.barh(counts.index[::-1], counts.to_numpy()[::-1])
    ax.set(xlabel="cells", title=f"Cells per {label_col}")
    ax.tick_params(axis="y", labelsize=7)
    paths.append(_save(fig, out_dir / "label_counts.png"))
    if f"{PREFIX}set_size" in obs:
        paths.append(_save(_set_sizes(plt, obs[f"{PREFIX}set_size"].to_numpy(), labels, label_col),
                           out_dir / "set_sizes.png"))
    if f"{PREFIX}unfamiliar" in obs:
        flagged = obs[f"{PREFIX}unfamiliar"].to_numpy(dtype=bool)[rows]
        raw = obs[f"{PREFIX}raw_label"].astype(str).iloc[rows].reset_index(drop=True)
        paths.append(_save(_unfamiliar(plt, xy, flagged, raw), out_dir / "unfamiliar.png"))
    if label_key is not None:
        given = obs[label_key].astype(str)
        paths.append(_save(_contingency(plt, given, labels), out_dir / "contingency.png"))
        accuracy = (given == labels).groupby(given).mean().sort_values()
        fig, ax = plt.subplots(figsize=(7, 0.25 * len(accuracy) + 1.5))
        ax.barh(accuracy.index, accuracy.to_numpy())
        ax.set(xlim=(0, 1), xlabel=f"share of cells whose {label_col} is the given label", title="Accuracy per given label")
        ax.tick_params(axis="y", labelsize=7)
        paths.append(_save(fig, out_dir / "accuracy_per_label.png"))
    return paths

"""Majority voting, as CellTypist users know it: over-cluster the query, give each cluster the
label most of its cells got, and mark the clusters without a clear majority ``Heterogeneous``.

The clusters are Leiden communities (igraph) of a kNN graph of the cells' square-root class
probabilities (the Hellinger geometry of the model's output). CellTypist clusters a PCA of the
query's expression instead; measured by bench/majority_space.py, that PCA makes clusters that
mix types: the best any vote over them could reach (voting with the true labels) was 0.544 on
a 20k-cell query of the simulated atlas against 0.916 for the probabilities, 0.935 against
0.961 on half of kidney, 0.931 against 0.956 on the pancreas set's new donor, and level on
cbmc (0.882 / 0.883). The probabilities also need no second pass over the query: they stream
with the predictions. Only they, the graph and the clusters are held (`bytes_per_cell`), and a
query that would not fit in the memory available is refused before any work.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError

HETEROGENEOUS = "Heterogeneous"
N_NEIGHBORS = 15
# Up to this many cells the neighbours are found exactly (seconds); above, NN-descent
# (pynndescent), whose numba code compiles once per process (about 45 s here).
EXACT_NEIGHBOURS = 30_000
# What majority voting adds to a run's peak memory: a fixed part (numba, pynndescent) and, per
# cell, the kNN search and the Leiden graph besides the probabilities (bench/bench_majority.py:
# +590 MiB at 100k cells, +3.4 GiB at 1M, 97 classes; rounded up).
FIXED_BYTES = 300 << 20
GRAPH_BYTES_PER_CELL = 3_200


def bytes_per_cell(n_classes: int) -> int:
    return GRAPH_BYTES_PER_CELL + 2 * 4 * n_classes  # the probabilities and their square roots


def default_resolution(n_cells: int) -> float:
    """Leiden resolution growing with the query's size (CellTypist's schedule)."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0)):
        if n_cells < limit:
            return resolution
    return 30.0


def available_bytes() -> int:
    """Memory available to a new allocation (Linux: MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_can_cluster(n_cells: int, n_classes: int, available: int | None = None) -> None:
    """Refuse, before any work, a query whose clustering would not fit in memory, and a
    missing clustering library."""
    from importlib.util import find_spec  # finding, not importing: numba's import takes seconds

    if find_spec("igraph") is None or find_spec("pynndescent") is None:
        raise InputError("majority voting needs igraph and pynndescent: pip install 'cellcontrast[majority]'")
    need = FIXED_BYTES + n_cells * bytes_per_cell(n_classes)
    available = available_bytes() if available is None else available
    if need > 0.8 * available:
        raise InputError(f"majority voting on {n_cells} cells needs about {need / 2**30:.1f} GiB "
                         f"({bytes_per_cell(n_classes)} bytes a cell for its probabilities, kNN graph and clustering) but "
                         f"{available / 2**30:.1f} GiB are available; annotate without majority voting "
                         "or split the query")


def _exact_neighbours(points: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Each point's k + 1 nearest points (itself first), by blocks of rows."""
    sq = (points.astype(np.float32) ** 2).sum(1)
    out = np.empty((len(points), k + 1), dtype=np.int64)
    for lo in range(0, len(points), block):
        d2 = sq[lo:lo + block, None] + sq[None, :] - 2 * points[lo:lo + block] @ points.T
        d2[np.arange(len(d2)), np.arange(lo, lo + len(d2))] = -1.0  # itself first, even on ties
        near = np.argpartition(d2, k, axis=1)[:, :k + 1]
        out[lo:lo + block] = np.take_along_axis(near, np.argsort(np.take_along_axis(d2, near, 1), 1, kind="stable"), 1)
    return out


def over_cluster(points: np.ndarray, *, resolution: float | None = None, n_neighbors: int = N_NEIGHBORS,
                 seed: int = 0) -> np.ndarray:
    """Leiden clusters (modularity, igraph) of the symmetric kNN graph of ``points``."""
    import igraph

    n = len(points)
    k = min(n_neighbors, n - 1)
    if k < 1:
        return np.zeros(n, dtype=np.int32)
    if n <= EXACT_NEIGHBOURS:
        neighbours = _exact_neighbours(points, k)
    else:
        import pynndescent  # only here: its numba import and compilation cost most of a minute

        # seeded, and the same on a machine with the same number of cores
        index = pynndescent.NNDescent(points, n_neighbors=k + 1, random_state=seed)
        neighbours = index.neighbor_graph[0]
    rows = np.repeat(np.arange(n), k + 1)
    keep = neighbours.ravel() != rows
    edges = np.column_stack([rows[keep], neighbours.ravel()[keep]])
    graph = igraph.Graph(n=n, edges=edges)
    graph.simplify()  # mutual neighbours are one edge
    previous = random.getstate()
    igraph.set_random_number_generator(random.Random(seed))
    try:
        partition = graph.community_leiden(objective_function="modularity", n_iterations=2,
                                           resolution=default_resolution(n) if resolution is None else resolution)
    finally:
        igraph.set_random_number_generator(random)
        random.setstate(previous)
    return np.asarray(partition.membership, dtype=np.int32)


def majority_columns(probabilities: np.ndarray, labels: pd.Categorical, *, min_agreement: float, prefix: str,
                     seed: int = 0) -> dict[str, object]:
    """The columns majority voting adds: ``{prefix}over_clustering``, ``majority_voting``,
    ``majority_agreement``."""
    clusters = over_cluster(np.sqrt(probabilities, dtype=np.float32), seed=seed)
    voted, agreement = majority_vote(labels, clusters, min_agreement)
    names = [str(c) for c in range(int(clusters.max()) + 1)]
    return {f"{prefix}over_clustering": pd.Categorical(clusters.astype(str), categories=names),
            f"{prefix}majority_voting": voted, f"{prefix}majority_agreement": agreement}


def majority_vote(labels: pd.Categorical, clusters: np.ndarray, min_agreement: float = 0.0
                  ) -> tuple[pd.Categorical, np.ndarray]:
    """Each cell's cluster's most frequent label, and the share of the cluster that has it;
    ``Heterogeneous`` where that share is below ``min_agreement``."""
    labels = pd.Categorical(labels)
    table = pd.crosstab(clusters, labels.codes)
    top = table.to_numpy().argmax(axis=1)
    share = table.to_numpy().max(axis=1) / table.to_numpy().sum(axis=1)
    position = table.index.get_indexer(clusters)
    codes, agreement = table.columns.to_numpy()[top][position], share[position].astype(np.float32)
    names = np.asarray(labels.categories, dtype=object)[codes]
    names = np.where(agreement >= min_agreement, names, HETEROGENEOUS)
    return pd.Categorical(names, categories=list(dict.fromkeys([*labels.categories, HETEROGENEOUS]))), agreement


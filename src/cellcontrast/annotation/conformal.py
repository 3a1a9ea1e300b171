"""Conformal prediction sets: which labels are plausible for a cell, with a coverage guarantee.

Split conformal prediction (Vovk et al. 2005; Angelopoulos & Bates 2021): `cellcontrast fit`
scores cells the model never trained on (the held-out batches of grouped validation, else the
validation part) with a conformity score and stores the scores in the annotator. At
annotation, for a target coverage ``c``, ``q`` is the ``ceil((n + 1) c)``-th smallest of the
``n`` scores, and a cell's set holds every label whose score would be at most ``q``. When the
query's cells are exchangeable with the calibration cells, the true label is in the set with
probability at least ``c``; across donors that holds only as far as the held-out batches were
like the new donor, which is why grouped validation supplies them.

Three scores:

- ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``1 - p(true label)``,
  one threshold for every type. Every label with a probability of at least ``1 - q`` is in the
  set: the smallest sets on average for the coverage; a set can be empty when no label is that
  probable (set size 0, a novelty signal).
- ``aps`` (adaptive prediction sets, Romano et al. 2020, without randomisation): the
  probability mass of the labels ranked at or above the true one. A set is the most probable
  labels whose mass stays within ``q``, and at least the top label: never empty, larger where
  the model hesitates.
- ``class`` (class-conditional, "Mondrian"): ``lac``'s score with a threshold per type from that
  type's own calibration cells, so each type gets its coverage; a type with too few calibration
  cells for the coverage asked (fewer than about ``1 / (1 - c)``) takes ``lac``'s threshold
  rather than being put in every set. Sets can be empty, as with ``lac``.

Numpy only: `annotate` stays torch-free.
"""

from __future__ import annotations

import math

import numpy as np

from cellcontrast.core.errors import InputError

SCORES = ("lac", "aps", "class")
# Calibration cells kept in an annotator (a seeded subsample beyond it: still exchangeable).
MAX_CALIBRATION = 20_000


def conformity_scores(proba: np.ndarray, y: np.ndarray, classes: list[str], *, source: str,
                      seed: int = 0) -> dict:
    """The calibration an annotator stores: both scores of each calibration cell (true label
    ``y``, calibrated probabilities ``proba``), sorted, rounded to 1e-6, at most
    ``MAX_CALIBRATION`` cells; ``source`` says which cells they are."""
    proba, y = np.asarray(proba, dtype=np.float64), np.asarray(y)
    keep = y >= 0
    proba, y = proba[keep], y[keep]
    if len(y) > MAX_CALIBRATION:
        rows = np.sort(np.random.default_rng(seed).choice(len(y), MAX_CALIBRATION, replace=False))
        proba, y = proba[rows], y[rows]
    p_true = proba[np.arange(len(y)), y]
    aps = (proba * (proba >= p_true[:, None])).sum(axis=1)  # mass ranked at or above the truth
    lac = 1.0 - p_true
    rounded = lambda v: [round(float(s), 6) for s in np.sort(v)]  # noqa: E731
    return {"source": source, "n": int(len(y)), "aps": rounded(aps), "lac": rounded(lac),
            "class": {classes[k]: rounded(lac[y == k]) for k in range(len(classes)) if (y == k).any()}}


def conformal_quantile(scores, coverage: float) -> float:
    """The ``ceil((n + 1) coverage)``-th smallest score; infinite when there are too few
    scores for that coverage (every label is then plausible)."""
    n = len(scores)
    k = math.ceil((n + 1) * coverage)
    return float("inf") if k > n or n == 0 else float(scores[k - 1])


def check_coverage(coverage: float, calibration: dict | None, score: str) -> None:
    if not (isinstance(coverage, int | float) and 0.0 < coverage < 1.0):
        raise InputError(f"--coverage {coverage} must lie strictly between 0 and 1 (e.g. 0.9)")
    if score not in SCORES:
        raise InputError(f"--conformal-score {score!r}: expected one of {', '.join(SCORES)}")
    if not calibration:
        raise InputError("this annotator has no conformity scores (exported before they were recorded, or "
                         "not by `cellcontrast fit`); refit it with `cellcontrast fit` to use --coverage")


def set_membership(proba: np.ndarray, calibration: dict, coverage: float, score: str,
                   classes: list[str]) -> np.ndarray:
    """Boolean ``[cells, classes]``: which labels each cell's set holds."""
    proba = np.asarray(proba, dtype=np.float64)
    if score == "aps":
        q = conformal_quantile(calibration["aps"], coverage)
        order = np.argsort(-proba, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(proba, order, axis=1), axis=1)
        # the labels whose score (the mass at or above them) is at most q, and always the top one
        size = np.maximum((mass <= q + 1e-12).sum(axis=1), 1)
        ranked = np.arange(proba.shape[1])[None, :] < size[:, None]
        member = np.zeros_like(ranked)
        np.put_along_axis(member, order, ranked, axis=1)
        return member
    lac = calibration.get("lac") or sorted(v for values in calibration["class"].values() for v in values)
    pooled = conformal_quantile(lac, coverage)
    if score == "lac":
        return proba >= 1.0 - pooled - 1e-12
    per_class = [conformal_quantile(calibration["class"].get(name, []), coverage) for name in classes]
    thresholds = np.array([1.0 - (q if np.isfinite(q) else pooled) for q in per_class])
    return proba >= thresholds[None, :] - 1e-12


def prediction_sets(proba: np.ndarray, calibration: dict, coverage: float, score: str,
                    classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's set as labels joined by ``|`` in probability order, and its size."""
    member = set_membership(proba, calibration, coverage, score, classes)
    order = np.argsort(-np.asarray(proba), axis=1, kind="stable")
    names = np.asarray(classes, dtype=object)
    ranked_member = np.take_along_axis(member, order, axis=1)
    labels = np.array(["|".join(names[row[keep]]) for row, keep in zip(order, ranked_member, strict=True)],
                      dtype=object)
    return labels, member.sum(axis=1).astype(np.int32)


def cross_fitted_membership(proba: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: list[str],
                            coverage: float, score: str = "lac") -> np.ndarray:
    """Each cell's set calibrated on the cells of the *other* groups only (boolean ``[cells,
    classes]``): what a new batch's cells would get, measurable on labelled cells without
    scoring the calibration cells themselves (the model card's coverage by type)."""
    proba, y, groups = np.asarray(proba, dtype=np.float64), np.asarray(y), np.asarray(groups)
    member = np.zeros(proba.shape, dtype=bool)
    for g in np.unique(groups):
        held = groups == g
        calibration = conformity_scores(proba[~held], y[~held], classes, source="other groups")
        member[held] = set_membership(proba[held], calibration, coverage, score, classes)
    return member


# `--flag-unseen` on a cross-fitted annotator: a cell is unfamiliar when at most this share of
# the reference's held-out cells are at least as unfamiliar (the 5% the refit's threshold aims at).
UNSEEN_ALPHA = 0.05


def energy_calibration(energies_by_fold: list[np.ndarray], *, seed: int = 0) -> dict:
    """What a cross-fitted annotator stores for ``--flag-unseen``: the energies of the cells each
    fold held out, under that fold's own model, sorted and rounded to 1e-6 (at most
    ``MAX_CALIBRATION`` cells in all, each fold subsampled in proportion)."""
    total = sum(len(e) for e in energies_by_fold)
    rng = np.random.default_rng(seed)
    folds = []
    for values in energies_by_fold:
        values = np.asarray(values, dtype=np.float64)
        if total > MAX_CALIBRATION:
            keep = max(1, round(len(values) * MAX_CALIBRATION / total))
            values = values[rng.choice(len(values), min(keep, len(values)), replace=False)]
        folds.append([round(float(v), 6) for v in np.sort(values)])
    return {"alpha": UNSEEN_ALPHA, "folds": folds}


def energy_p_values(fold_energy: np.ndarray, calibration: dict) -> np.ndarray:
    """Each cell's conformal p-value of unfamiliarity: ``(1 + m) / (n + 1)``, ``m`` the held-out
    cells whose energy under their own fold's model is at least the cell's energy under that
    same model, ``n`` all of them (cross-conformal: Vovk 2015; Barber et al. 2021's CV+).

    ``fold_energy``: ``[cells, folds]``, the annotator's ``fold_energy`` output. Reading a new cell
    against the models that scored the held-out cells keeps both energies on one scale; the refit
    on every cell scores on its own (docs: unseen types)."""
    fold_energy = np.asarray(fold_energy, dtype=np.float64)
    scores = [np.asarray(s, dtype=np.float64) for s in calibration["folds"]]
    if fold_energy.ndim != 2 or fold_energy.shape[1] != len(scores):
        raise InputError(f"the annotator's fold energies have shape {fold_energy.shape} but its metadata holds "
                         f"{len(scores)} folds; re-export it with `cellcontrast fit`")
    at_least = sum(len(s) - np.searchsorted(s, fold_energy[:, k], side="left") for k, s in enumerate(scores))
    return (1.0 + at_least) / (1.0 + sum(len(s) for s in scores))

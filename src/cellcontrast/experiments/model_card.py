"""The model card `fit_annotator` writes beside the ONNX file: Markdown with the classes and
their training counts, the genes, every chain's validation scores and the choice, per-class
validation F1 and prediction-set coverage; a PNG with the validation confusion matrix, the
calibration curve, the coverage by type and the set size per predicted label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellcontrast.annotation.conformal import cross_fitted_membership
from cellcontrast.core.files import atomic_path
from cellcontrast.core.names import CV_FOLD


def _calibration(y: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    confidence, correct = proba.max(1), proba.argmax(1) == y
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    frame = pd.DataFrame({"bin": bins, "confidence": confidence, "correct": correct})
    return frame.groupby("bin").agg(confidence=("confidence", "mean"), accuracy=("correct", "mean"),
                                    cells=("correct", "size"))


# The coverage the card's prediction sets are shown at (`annotate --coverage`, default score).
CARD_COVERAGE = 0.9


def held_out_sets(result, coverage: float = CARD_COVERAGE) -> pd.DataFrame:
    """Per class: validation cells, the share whose prediction set holds their type (coverage),
    cells predicted as it and their mean set size. Each fold's cells get sets calibrated on the
    other folds' (grouped validation: held-out batches), or each random half's on the other half's."""
    y, proba = result.validation
    classes = result.chain.classes
    groups = result.validation_groups
    if groups is None:
        groups = np.random.default_rng(result.chain.config.get("fit", {}).get("seed", 0)).permutation(len(y)) % 2
    member = cross_fitted_membership(proba, y, groups, classes, coverage)
    known = y >= 0
    covered = member[np.flatnonzero(known), y[known]]
    predicted, size = proba.argmax(1), member.sum(1)
    frame = pd.DataFrame({"class": np.asarray(classes)[y[known]], "covered": covered})
    by_class = frame.groupby("class")["covered"].agg(["size", "mean"])
    sizes = pd.Series(size).groupby(np.asarray(classes)[predicted]).agg(["size", "mean"])
    return pd.DataFrame({"cells": by_class["size"], "coverage": by_class["mean"], "predicted": sizes["size"],
                         "mean_set_size": sizes["mean"]}).reindex(classes)


def _sets_panels(ax_cov, ax_size, sets: pd.DataFrame, coverage: float) -> None:
    fontsize = max(4, 9 - len(sets) // 15)
    ax_cov.barh(sets.index[::-1], sets["coverage"].to_numpy()[::-1])
    ax_cov.axvline(coverage, color="grey", linestyle="--", linewidth=1)
    ax_cov.set(xlim=(0, 1), xlabel=f"share of cells whose set holds their type (target {coverage:.2f})",
               title="Coverage by type (held-out cells)")
    ax_size.barh(sets.index[::-1], sets["mean_set_size"].to_numpy()[::-1])
    ax_size.set(xlabel="mean labels in the set", title="Set size per predicted label")
    for ax in (ax_cov, ax_size):
        ax.tick_params(axis="y", labelsize=fontsize)


def _figure(path: Path, classes: list[str], y: np.ndarray, proba: np.ndarray, sets: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellcontrast.train.metrics import confusion

    matrix = confusion(y, proba.argmax(1), len(classes)).astype(float)
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    side = min(14, 4 + 0.18 * len(classes))
    fig, (ax_cm, ax_cal, ax_cov, ax_size) = plt.subplots(1, 4, figsize=(side + 17, side),
                                                         gridspec_kw={"width_ratios": [side, 5, 4, 4]})
    image = ax_cm.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax_cm.set_xticks(ticks, classes, rotation=90, fontsize=max(4, 9 - len(classes) // 15))
    ax_cm.set_yticks(ticks, classes, fontsize=max(4, 9 - len(classes) // 15))
    ax_cm.set(xlabel="predicted", ylabel="validation label", title="Validation confusion (row share)")
    fig.colorbar(image, ax=ax_cm, fraction=0.04)
    cal = _calibration(y, proba)
    ax_cal.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax_cal.plot(cal["confidence"], cal["accuracy"], marker="o")
    ax_cal.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="Calibration (validation)")
    ax_cal.set_aspect("equal")
    _sets_panels(ax_cov, ax_size, sets, CARD_COVERAGE)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _energy_line(chain) -> str:
    source = chain.config.get("energy_from")
    where = f"the {source} chain's, trained beside it" if source else "the chosen chain's"
    calibration = chain.config.get("energy_calibration") or {}
    folds = calibration.get("folds")
    if folds:
        return (f"\n- `--flag-unseen` energy: {where}, read under each of its {len(folds)} fold models against the "
                f"{sum(map(len, folds))} cells those folds held out; a cell is flagged when at most "
                f"{calibration['alpha']:.0%} of them are as unfamiliar (column `cellcontrast_energy_p`)")
    return (f"\n- `--flag-unseen` energy: {where}; threshold {chain.metrics.get('val_energy_q95', float('nan')):.3f} "
            "(95% of the validated cells below it)")


def _genes_used(chain) -> str:
    """What the base's preprocessing kept (n_hvg "auto" chose it on validation); an
    ensemble's, member by member."""
    modules = getattr(chain.module, "weighted_members", None) or [chain.module]
    used = ["all" if int(m.preprocess.n_selected) == len(chain.genes) else str(int(m.preprocess.n_selected))
            for m in modules]
    return used[0] if len(used) == 1 else " / ".join(used) + f" (members {', '.join(chain.config['members'])})"


def _fold_table(result) -> str:
    """Grouped validation: each held-out batch's macro F1 for every chain (fold rows)."""
    folds = result.fold_scores
    if folds is None or folds.empty:
        return ""
    table = folds.pivot_table(index=["held_out", "n_val"], columns="chain", values="val_macro_f1", sort=False)
    names = list(dict.fromkeys(folds["chain"]))
    fit = result.chain.config.get("fit", {})
    rows = [f"| {held} | {n_val} | " + " | ".join(f"{row[name]:.4f}" for name in names) + " |"
            for (held, n_val), row in table.iterrows()]
    single = fit.get("single_batch_types") or []
    single_md = (f"\nTypes found in one {fit.get('batch_key')} only, validated within it: {', '.join(single)}.\n"
                 if single else "")
    return f"""
## Validation by held-out {fit.get('batch_key')}

Each row: every chain trained on the other folds' cells, its choices made on this one (macro F1).

| held out | cells | {' | '.join(names)} |
|---|---|{'---|' * len(names)}
{chr(10).join(rows)}
{single_md}"""


def _validation_line(result) -> str:
    fit = result.chain.config.get("fit", {})
    if fit.get("validation") == "grouped" and fit.get("batch_key") == CV_FOLD:
        return (f"- Validation: {len(fit.get('folds', []))} stratified cross-validation folds (every cell validated "
                "once); the chosen chain refitted on every cell, its temperature and thresholds from the folds' "
                "held-out cells")
    if fit.get("validation") == "grouped":
        return (f"- Validation: grouped by `{fit['batch_key']}`, {len(fit.get('folds', []))} folds; the chosen chain "
                "refitted on every cell, its temperature and thresholds from the folds' held-out cells")
    return "- Validation: a stratified random part of the reference" + (
        f" ({fit['validation_note']})" if fit.get("validation_note") else "")


def _streamed_line(fit: dict) -> str:
    """How a reference read in chunks was used (`experiments.fit_stream`), or nothing."""
    streamed = fit.get("streamed")
    if not streamed:
        return ""
    if not streamed.get("cells"):
        return f"\n- Read in chunks: every choice on a stratified sample; this chain was {streamed['note']}"
    return (f"\n- Read in chunks: every choice on a stratified sample of {streamed['sample_cells']} cells; the chain "
            f"refitted on all {streamed['cells']} training cells ({streamed['n_selected']} genes from one pass of "
            f"gene statistics, {streamed['epochs']} epochs of mini-batch Adam from the sample fit, training loss "
            f"{' -> '.join(str(v) for v in streamed['losses'])}"
            + (f"; the sample's validation macro F1 by epoch, from the sample fit's weights "
               f"{' -> '.join(str(v) for v in streamed['val_macro_f1'])}, the last kept"
               if "val_macro_f1" in streamed else "") + ")")


def _num(value: float, digits: int) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{digits}f}"


def _markdown(result, y: np.ndarray, proba: np.ndarray, png: Path, sets: pd.DataFrame) -> str:
    from cellcontrast.train.metrics import per_class_f1

    chain, classes = result.chain, result.chain.classes
    scores = result.scores.set_index("chain")
    cols = [c for c in ("val_macro_f1", "val_macro_f1_se", "val_gap_to_best_se", "val_top1", "val_top3", "val_ece")
            if c in scores]
    rows = [f"| {name}{' (chosen)' if name == result.chosen else ''} | "
            + " | ".join(f"{row[c]:.4f}" for c in cols) + " |" for name, row in scores[cols].iterrows()]
    table = "\n".join([f"| chain | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|", *rows])
    f1 = per_class_f1(y, proba.argmax(1), classes).set_index("class")["f1"] if len(y) else pd.Series(dtype=float)
    classes_md = "\n".join(f"| {name} | {int(result.class_counts.get(name, 0))} | {f1.get(name, float('nan')):.3f} | "
                           f"{_num(sets.at[name, 'coverage'], 3)} | {_num(sets.at[name, 'mean_set_size'], 2)} |"
                           for name in classes)
    covered = (sets["coverage"] * sets["cells"]).sum() / max(sets["cells"].sum(), 1)
    mean_size = (sets["mean_set_size"] * sets["predicted"]).sum() / max(sets["predicted"].sum(), 1)
    test = result.test_metrics
    test_md = (f"Held-out test part ({test['n_test']} cells, reported only): macro F1 {test['test_macro_f1']:.4f}, "
               f"top-1 {test['test_top1']:.4f}, top-3 {test['test_top3']:.4f}.\n" if test else
               "No test part was held out (`--test-fraction 0`): every cell trained or validated.\n")
    fit = chain.config.get("fit", {})
    return f"""# Model card: {png.name.removesuffix('.card.png')}

- Chosen chain: **{result.chosen}** ({fit.get('chosen_by', '')}), among {', '.join(fit.get('chains', []))}
{_validation_line(result)}{_streamed_line(fit)}
- Cells: {result.n_cells['reference']} in the reference; {result.n_cells['train']} trained, {result.n_cells['val']} validated{f", {result.n_cells['test']} held out for the test" if result.n_cells['test'] else ''}; seed {fit.get('seed', 0)}
- Genes: {len(chain.genes)} in the reference, {_genes_used(chain)} used by the base
- Classes: {len(classes)}; temperature {chain.metrics.get('temperature', float('nan')):.3f};
  `--min-confidence auto` threshold {chain.metrics.get('val_confidence_q05', float('nan')):.3f}{_energy_line(chain)}

## Chains on validation

{table}

{test_md}{_fold_table(result)}
## Classes

Prediction sets (`annotate --coverage {CARD_COVERAGE}`, score `lac`) on the held-out cells, each
{'fold' if result.validation_groups is not None else 'random half'} calibrated on the other{'s' if result.validation_groups is not None else ''}:
coverage {covered:.3f}, mean set size {mean_size:.2f}.

| class | training + validation cells | validation F1 | set coverage | mean set size (predicted as it) |
|---|---|---|---|---|
{classes_md}

![validation confusion matrix and calibration]({png.name})
"""


def write_model_card(result, out: Path) -> dict[str, Path]:
    """From ``result.validation`` (the chain's validation cells, or the folds' held-out cells),
    write ``<out>.card.md`` and ``<out>.card.png`` (atomically); returns their paths."""
    stem = out.with_suffix("")
    md, png = Path(f"{stem}.card.md"), Path(f"{stem}.card.png")
    y, proba = result.validation
    sets = held_out_sets(result)
    _figure(png, result.chain.classes, y, proba, sets)
    with atomic_path(md) as tmp:
        tmp.write_text(_markdown(result, y, proba, png, sets))
    return {"card": md, "card_png": png}

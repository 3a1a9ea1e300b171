"""Figure 2 of the paper and the calibration report (table and figure) from the grid's results."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellcontrast.core.names import BASES, COMPONENTS
from cellcontrast.experiments.results import (
    BASE_NAMES,
    COMPONENT_NAMES,
    SETTING_NAMES,
    SETTING_ORDER,
    clean_results,
    model_name,
    ordered,
    settings_in,
)


def figure2_data(results: pd.DataFrame) -> pd.DataFrame:
    """The bars of Figure 2: log(mean top-1 of a model / mean top-1 of vanilla LR), per setting.

    ``sd`` is the sd (ddof=1) over seeds of log(top-1 of the model in a seed / mean top-1 of
    vanilla LR). A setting without a vanilla LR run has no reference and no bars.
    """
    df = clean_results(results)
    cols = ["setting", "model", "log_fold_change", "sd", "n", "base", "component"]
    rows = []
    for setting in settings_in(df):
        sub = df[df["setting"] == setting]
        ref = sub.loc[(sub["base"] == "lr") & (sub["component"] == "none"), "test_top1"].dropna()
        if ref.empty or not ref.mean() > 0:
            continue
        ref_mean = float(ref.mean())
        for base in ordered(sub["base"].unique(), BASES):
            for component in ordered(sub["component"].unique(), COMPONENTS):
                acc = sub.loc[(sub["base"] == base) & (sub["component"] == component), "test_top1"].dropna()
                acc = acc[acc > 0]
                if acc.empty:
                    continue
                per_seed = np.log(acc.to_numpy(dtype=float) / ref_mean)
                rows.append({
                    "setting": setting,
                    "model": f"{setting}: {model_name(base, component)}",
                    "log_fold_change": float(np.log(acc.mean() / ref_mean)),
                    "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else math.nan,
                    "n": len(per_seed), "base": base, "component": component,
                })
    return pd.DataFrame(rows, columns=cols)


def figure2(results: pd.DataFrame):
    """Figure 2 as a matplotlib Figure (object API: no pyplot, no global backend change)."""
    data = figure2_data(results)
    settings = settings_in(clean_results(results))
    fig = Figure(figsize=(4.6 * max(len(settings), 1) + 1.4, 4.4), layout="constrained")
    # own y scale per panel: a collapse in one setting must not flatten the others
    axes = fig.subplots(1, max(len(settings), 1), squeeze=False)[0]
    colours = {"none": "#4c72b0", "mlp": "#dd8452", "mls": "#55a868"}
    extra = iter(["#c44e52", "#8172b3", "#937860"])
    for ax, setting in zip(axes, settings, strict=False):
        sub = data[data["setting"] == setting]
        ax.axhline(0.0, color="black", linewidth=0.9)
        ax.set_title(SETTING_NAMES.get(setting, setting), fontsize=12)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if sub.empty:
            ax.text(0.5, 0.5, "no vanilla LR run:\nno reference", ha="center", va="center",
                    transform=ax.transAxes, fontsize=10)
            ax.set_xticks([])
            continue
        bases = ordered(sub["base"].unique(), BASES)
        components = ordered(sub["component"].unique(), COMPONENTS)
        width = 0.8 / len(components)
        x = np.arange(len(bases))
        for j, component in enumerate(components):
            part = sub[sub["component"] == component].set_index("base").reindex(bases)
            colour = colours.get(component) or next(extra, "grey")
            ax.bar(x + (j - (len(components) - 1) / 2) * width, part["log_fold_change"].to_numpy(),
                   width * 0.95, yerr=part["sd"].fillna(0).to_numpy(), capsize=3, color=colour,
                   ecolor="#333333", label=COMPONENT_NAMES.get(component, component))
        ax.set_xticks(x, [BASE_NAMES.get(b, b) for b in bases], fontsize=11)
        ax.set_xlabel("base model", fontsize=11)
        ax.tick_params(axis="y", labelsize=10)
    axes[0].set_ylabel("ln(top-1 / top-1 of vanilla LR)", fontsize=11)
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, title="component", fontsize=10, title_fontsize=10,
                   loc="outside right center", frameon=False)
    fig.suptitle("Figure 2: log fold change of top-1 accuracy against vanilla LR "
                 "(error bars: sd over seeds)", fontsize=11)
    return fig


def calibration_data(results: pd.DataFrame) -> pd.DataFrame | None:
    """Per setting and model, means over seeds of the temperature, test ECE before and after
    temperature scaling, and test coverage / accuracy at each confidence threshold; ``chosen``
    marks the model with the best mean VALIDATION macro F1 of its setting (what `export --best`
    would pick). None when the results carry no calibration columns (older runs)."""
    df = clean_results(results)
    coverage = sorted(c for c in df.columns if c.startswith(("test_coverage_t", "test_accuracy_t")))
    needed = ["temperature", "test_ece_uncalibrated", "test_ece"]
    if any(c not in df.columns for c in needed) or not coverage:
        return None
    cols = needed + coverage + (["val_macro_f1"] if "val_macro_f1" in df.columns else [])
    for col in cols:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    frame = df.groupby(["setting", "base", "component"], sort=False)[cols].mean().reset_index()
    frame["n"] = df.groupby(["setting", "base", "component"], sort=False).size().to_numpy()
    frame["model"] = [model_name(b, c) for b, c in zip(frame["base"], frame["component"], strict=True)]
    frame["chosen"] = False
    if "val_macro_f1" in frame.columns:
        for _, sub in frame.groupby("setting"):
            if sub["val_macro_f1"].notna().any():
                frame.loc[sub["val_macro_f1"].idxmax(), "chosen"] = True
    order = {s: i for i, s in enumerate(settings_in(df))}
    rank = {(b, c): i * 10 + j for i, b in enumerate(BASES) for j, c in enumerate(COMPONENTS)}
    frame["_o"] = [(order.get(s, 99), rank.get((b, c), 999)) for s, b, c in
                   zip(frame["setting"], frame["base"], frame["component"], strict=True)]
    return frame.sort_values("_o").drop(columns="_o").reset_index(drop=True)


def _thresholds(frame: pd.DataFrame) -> list[str]:
    return sorted({c.rsplit("_t", 1)[1] for c in frame.columns if c.startswith("test_coverage_t")})


def calibration_markdown(frame: pd.DataFrame) -> str:
    """One table per setting: temperature, ECE before -> after, coverage and accuracy kept."""
    shown = [t for t in ("50", "90") if t in _thresholds(frame)]
    lines = ["# Calibrated confidence (test, mean over seeds)", "",
             "Temperature T fitted on validation NLL; ECE = expected calibration error of the "
             "confidence (15 bins). Coverage / accuracy: the fraction of test cells with "
             "confidence >= p and the accuracy among them (the rest would be `Unassigned`). "
             "\u2192 marks the chain chosen on validation.", ""]
    for setting in ordered(frame["setting"].unique(), SETTING_ORDER):
        sub = frame[frame["setting"] == setting]
        lines += [f"## {SETTING_NAMES.get(setting, setting)} (`{setting}`)", ""]
        head = ["Model", "T", "ECE before", "ECE after", "accuracy (all cells)"]
        head += [f"coverage / accuracy at p={int(t) / 100:g}" for t in shown]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
        for _, row in sub.iterrows():
            cells = [("\u2192 " if row["chosen"] else "") + row["model"], f"{row['temperature']:.2f}",
                     f"{row['test_ece_uncalibrated']:.4f}", f"{row['test_ece']:.4f}",
                     f"{row.get('test_accuracy_t00', float('nan')):.4f}"]
            for t in shown:
                cells.append(f"{row[f'test_coverage_t{t}']:.3f} / {row.get(f'test_accuracy_t{t}', float('nan')):.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def calibration_figure(frame: pd.DataFrame):
    """Per setting: accuracy vs coverage of every chain (chosen one bold) and ECE before/after."""
    settings = ordered(frame["setting"].unique(), SETTING_ORDER)
    thresholds = _thresholds(frame)
    fig = Figure(figsize=(11, 3.8 * len(settings)), layout="constrained")
    axes = fig.subplots(len(settings), 2, squeeze=False)
    for (ax_cov, ax_ece), setting in zip(axes, settings, strict=True):
        sub = frame[frame["setting"] == setting]
        for _, row in sub.iterrows():
            cov = [row[f"test_coverage_t{t}"] for t in thresholds]
            acc = [row.get(f"test_accuracy_t{t}", np.nan) for t in thresholds]
            style = {"linewidth": 2.6, "zorder": 3} if row["chosen"] else {"linewidth": 1.0, "alpha": 0.7}
            ax_cov.plot(cov, acc, marker="o", markersize=3, label=row["model"] + (" (chosen)" if row["chosen"] else ""),
                        **style)
        ax_cov.set_xlabel("coverage (fraction of cells kept)")
        ax_cov.set_ylabel("accuracy of kept cells")
        ax_cov.set_title(f"{SETTING_NAMES.get(setting, setting)}: accuracy vs coverage "
                         f"(thresholds {', '.join(str(int(t) / 100) for t in thresholds)})", fontsize=10)
        ax_cov.invert_xaxis()
        ax_cov.grid(alpha=0.3)
        ax_cov.legend(fontsize=7, ncol=2)
        x = np.arange(len(sub))
        ax_ece.bar(x - 0.2, sub["test_ece_uncalibrated"], 0.4, label="before (T = 1)", color="#c44e52")
        ax_ece.bar(x + 0.2, sub["test_ece"], 0.4, label="after temperature scaling", color="#4c72b0")
        ax_ece.set_xticks(x, sub["model"], rotation=45, ha="right", fontsize=8)
        ax_ece.set_ylabel("test ECE")
        ax_ece.set_title(f"{SETTING_NAMES.get(setting, setting)}: calibration error", fontsize=10)
        ax_ece.grid(axis="y", alpha=0.3)
        ax_ece.legend(fontsize=8)
    return fig

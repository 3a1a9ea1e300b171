"""The paper's Table 1 and Figure 2 from the grid's results, as files, DVC metrics/plots and MLflow.

Input: the grid's results table (``reports/results.csv``), one row per setting x seed x base x
component with the test metrics ``test_top1``, ``test_top3``, ``test_macro_f1``.

Output (in ``out_dir``, every file written atomically):

- ``table1.md``: one Markdown table per setting; rows are base x {Base, MLP, MLS}, cells
  "mean ± sd" over seeds (sd with ddof=1), n = number of seeds. The best mean of each metric
  within a base model is **bold**; an asterisk marks the best mean of the whole setting.
- ``table1.csv``: the same numbers in long format
  (setting, base, component, model, metric, mean, sd, n, best_in_base, best_in_setting).
- ``figure2.png``: one panel per setting, ln(mean top-1 of a model / mean top-1 of vanilla LR);
  error bar = sd over seeds of log(top-1 of the model in that seed / mean top-1 of vanilla LR),
  i.e. the model's own spread across seeds on the scale of the bar (as the paper's caption says,
  "the standard deviation of the given model's performance"), so vanilla LR has a bar too.
- ``figure2.csv``: the bars of Figure 2 for ``dvc plots`` (setting, model, log_fold_change, sd,
  n, base, component); ``model`` is "<setting>: <display name>", unique across settings, so
  a bar template does not stack the settings onto each other.
- ``metrics.json``: DVC metrics, ``{setting: {"base+component": {top1, top3, macro_f1}}}`` (means).
- ``calibration.md`` / ``.csv`` / ``.png``: per model, the temperature fitted on validation, test
  ECE before and after it, and test accuracy against coverage at confidence thresholds (the
  trade `annotate --min-confidence` makes), the chain chosen on validation marked.

With ``log_to_mlflow`` the files are also logged to one MLflow run (name "report", tag
``kind=report``) with every mean as a metric named ``<setting>.<base>-<component>.<metric>``
(MLflow names may not contain "+").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError, first_line
from cellcontrast.core.files import atomic_path
from cellcontrast.core.names import BASES, COMPONENTS
from cellcontrast.experiments import tracking
from cellcontrast.experiments.open_set_report import unseen_frame, unseen_markdown
from cellcontrast.experiments.report_figures import (
    calibration_data,
    calibration_figure,
    calibration_markdown,
    figure2,
    figure2_data,
)
from cellcontrast.experiments.results import (
    METRICS,
    SETTING_NAMES,
    clean_results,
    markdown_table,
    model_name,
    ordered,
    settings_in,
)

# The paper's Table 1 (top-1, top-3, macro F1), shown under our tables for reference.
PAPER_TABLE1 = {
    "default": {
        ("lr", "none"): (0.9285, 0.9935, 0.8633), ("lr", "mlp"): (0.9267, 0.9915, 0.8445),
        ("lr", "mls"): (0.9303, 0.9926, 0.8690),
        ("actinn", "none"): (0.9174, 0.9864, 0.8165), ("actinn", "mlp"): (0.9111, 0.9826, 0.7886),
        ("actinn", "mls"): (0.9135, 0.9824, 0.7879),
        ("scdae", "none"): (0.9238, 0.9868, 0.8660), ("scdae", "mlp"): (0.9221, 0.9793, 0.8615),
        ("scdae", "mls"): (0.9222, 0.9796, 0.8633),
    },
    "scarce": {
        ("lr", "none"): (0.8188, 0.9570, 0.8148), ("lr", "mlp"): (0.8349, 0.9516, 0.8302),
        ("lr", "mls"): (0.8908, 0.9750, 0.8880),
        ("actinn", "none"): (0.6285, 0.7761, 0.5771), ("actinn", "mlp"): (0.3849, 0.5881, 0.3177),
        ("actinn", "mls"): (0.4416, 0.6434, 0.3754),
        ("scdae", "none"): (0.8848, 0.9732, 0.8803), ("scdae", "mlp"): (0.8787, 0.9688, 0.8739),
        ("scdae", "mls"): (0.8777, 0.9665, 0.8734),
    },
}


NO_RESULTS = "no results at {path}; run the grid first (`cellcontrast grid` or `dvc repro`)"


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: setting, base, component, model, metric, mean, sd (ddof=1), n, and the marks.

    ``best_in_base``: the best mean of that metric among the components of that base in that
    setting; ``best_in_setting``: the best mean of that metric in the whole setting. Ties are
    all marked. Missing values (NaN) are left out of mean, sd and n.
    """
    df = clean_results(results)
    rows = []
    for (setting, base, component), group in df.groupby(["setting", "base", "component"], sort=False):
        for metric, (col, _) in METRICS.items():
            values = group[col].dropna().to_numpy(dtype=float)
            n = len(values)
            rows.append({
                "setting": setting, "base": base, "component": component,
                "model": model_name(base, component), "metric": metric,
                "mean": float(values.mean()) if n else math.nan,
                "sd": float(values.std(ddof=1)) if n > 1 else math.nan,
                "n": n,
            })
    out = pd.DataFrame(rows, columns=["setting", "base", "component", "model", "metric", "mean", "sd", "n"])
    if out.empty:
        out["best_in_base"] = pd.Series(dtype=bool)
        out["best_in_setting"] = pd.Series(dtype=bool)
        return out

    def is_best(means: pd.Series) -> pd.Series:
        best = means.max()
        return means.notna() & np.isclose(means.fillna(-np.inf), best, rtol=0, atol=1e-12)

    out["best_in_base"] = out.groupby(["setting", "base", "metric"])["mean"].transform(is_best).astype(bool)
    out["best_in_setting"] = out.groupby(["setting", "metric"])["mean"].transform(is_best).astype(bool)
    # A stable, readable order: settings, bases, components, metrics as the paper has them.
    out["_s"] = out["setting"].map({s: i for i, s in enumerate(settings_in(out))})
    out["_b"] = out["base"].map({b: i for i, b in enumerate(ordered(out["base"].unique(), BASES))})
    out["_c"] = out["component"].map(
        {c: i for i, c in enumerate(ordered(out["component"].unique(), COMPONENTS))})
    out["_m"] = out["metric"].map({m: i for i, m in enumerate(METRICS)})
    out = out.sort_values(["_s", "_b", "_c", "_m"]).drop(columns=["_s", "_b", "_c", "_m"])
    return out.reset_index(drop=True)


def format_cell(mean: float, sd: float, bold: bool = False, star: bool = False, digits: int = 4) -> str:
    """A "mean ± sd" cell, **bold** when best in its base, with an asterisk when best overall."""
    if mean is None or not np.isfinite(mean):
        return ""
    text = f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None and np.isfinite(sd) else f"{mean:.{digits}f}"
    if bold:
        text = f"**{text}**"
    if star:
        text += "\\*"
    return text


def table1_frame(summary: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Table 1 of one setting as display strings: Model, Top-1, Top-3, F1, n.

    Rows are every base x every component present in the results (all settings), so a
    component that is missing for a base shows as a blank row rather than disappearing.
    """
    bases = ordered(summary["base"].unique(), BASES)
    components = ordered(summary["component"].unique(), COMPONENTS)
    sub = summary[summary["setting"] == setting].set_index(["base", "component", "metric"])
    rows = []
    for base in bases:
        for component in components:
            row = {"Model": model_name(base, component)}
            ns = []
            for metric, (_, title) in METRICS.items():
                key = (base, component, metric)
                if key in sub.index:
                    r = sub.loc[key]
                    row[title] = format_cell(r["mean"], r["sd"], bool(r["best_in_base"]), bool(r["best_in_setting"]))
                    ns.append(int(r["n"]))
                else:
                    row[title] = ""
            row["n"] = str(max(ns)) if ns else ""
            rows.append(row)
    return pd.DataFrame(rows, columns=["Model", *[t for _, t in METRICS.values()], "n"])


def _paper_line(setting: str) -> str | None:
    ref = PAPER_TABLE1.get(setting)
    if not ref:
        return None
    parts = [f"{model_name(b, c)} {v[0]:.4f}/{v[1]:.4f}/{v[2]:.4f}" for (b, c), v in ref.items()]
    return "Paper (Table 1, Top-1/Top-3/F1): " + "; ".join(parts) + "."


def folds_markdown(results: pd.DataFrame) -> str:
    """Per fold of each held-out-batch setting: test macro F1 / top-1 of every model on each
    held-out batch, and the mean over folds. Empty when no setting holds out batches."""
    if "holdout" not in results.columns:
        return ""
    df = clean_results(results).dropna(subset=["holdout"])
    sections = []
    for setting in settings_in(df):
        sub = df[df["setting"] == setting]
        batches = sorted(sub["holdout"].astype(str).unique())
        head = ["Model", *[f"{b} (F1 / top-1)" for b in batches], "mean F1 / top-1"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
        for base in ordered(sub["base"].unique(), BASES):
            for component in ordered(sub["component"].unique(), COMPONENTS):
                runs = sub[(sub["base"] == base) & (sub["component"] == component)]
                if runs.empty:
                    continue
                cells = []
                for batch in batches:
                    fold = runs[runs["holdout"].astype(str) == batch]
                    cells.append(f"{fold['test_macro_f1'].mean():.4f} / {fold['test_top1'].mean():.4f}"
                                 if len(fold) else "")
                cells.append(f"{runs['test_macro_f1'].mean():.4f} / {runs['test_top1'].mean():.4f}")
                lines.append("| " + " | ".join([model_name(base, component), *cells]) + " |")
        sections.append(f"## {SETTING_NAMES.get(setting, setting)} (`{setting}`), per held-out batch\n\n"
                        + "\n".join(lines))
    return "\n\n".join(sections) + ("\n" if sections else "")


def table1_markdown(summary: pd.DataFrame, paper_reference: bool = True) -> str:
    """Table 1 as Markdown: one section per setting (default, scarce, natural order)."""
    sections = ["# Table 1: test performance, mean ± sd over seeds",
                "Bold: best mean of the metric within the base model. \\*: best mean in the setting."]
    for setting in settings_in(summary):
        sections.append(f"## {SETTING_NAMES.get(setting, setting)} (`{setting}`)")
        sections.append(markdown_table(table1_frame(summary, setting)))
        line = _paper_line(setting) if paper_reference else None
        if line:
            sections.append(line)
    return "\n\n".join(sections) + "\n"


def metrics_dict(summary: pd.DataFrame) -> dict:
    """``{setting: {"base+component": {"top1": mean, "top3": mean, "macro_f1": mean}}}``; NaN -> null."""
    out: dict = {}
    for _, r in summary.iterrows():
        value = float(r["mean"]) if np.isfinite(r["mean"]) else None
        out.setdefault(r["setting"], {}).setdefault(f"{r['base']}+{r['component']}", {})[r["metric"]] = value
    return out


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """Flat MLflow metric names, ``default.lr-mls.top1`` ("+" is not allowed in MLflow names)."""
    return {f"{setting}.{model.replace('+', '-')}.{metric}": value
            for setting, models in metrics.items() for model, values in models.items()
            for metric, value in values.items() if value is not None}


def rarest_classes(per_class: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The `n` classes with the lowest support (ties: lowest F1), mean F1 per model as columns.

    `per_class` holds the runs' ``per_class_f1.csv`` rows joined with ``base`` and
    ``component`` (and any number of seeds). Returns one row per class: mean support, then
    one column of mean F1 per model (display names, in table order).
    """
    df = per_class.copy()
    df["model"] = [model_name(b, c) for b, c in zip(df["base"], df["component"], strict=True)]
    by_class = df.groupby("class").agg(support=("support", "mean"), mean_f1=("f1", "mean"))
    chosen = by_class.sort_values(["support", "mean_f1"]).head(n).index
    wide = df[df["class"].isin(chosen)].pivot_table(index="class", columns="model", values="f1", aggfunc="mean")
    order = [model_name(b, c) for b in ordered(df["base"].unique(), BASES)
             for c in ordered(df["component"].unique(), COMPONENTS)]
    wide = wide[[m for m in order if m in wide.columns]]
    out = by_class.loc[chosen, ["support"]].join(wide)
    out.columns.name = None
    return out


def worst_classes(per_class: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """Per model, its `n` classes with the lowest mean F1: rank 1..n x model, "class (F1)"."""
    df = per_class.copy()
    df["model"] = [model_name(b, c) for b, c in zip(df["base"], df["component"], strict=True)]
    mean = df.groupby(["model", "class"], as_index=False)["f1"].mean()
    order = [model_name(b, c) for b in ordered(df["base"].unique(), BASES)
             for c in ordered(df["component"].unique(), COMPONENTS)]
    columns = {}
    for model in [m for m in order if m in set(mean["model"])]:
        worst = mean[mean["model"] == model].sort_values(["f1", "class"]).head(n)
        columns[model] = [f"{c} ({f:.2f})" for c, f in zip(worst["class"], worst["f1"], strict=True)]
    out = pd.DataFrame({m: pd.Series(v, dtype=object) for m, v in columns.items()})
    out.index = pd.RangeIndex(1, len(out) + 1, name="rank")
    return out


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def make_report(results: pd.DataFrame, out_dir, log_to_mlflow: bool = True,
                experiment: str = "cellcontrast") -> dict[str, Path]:
    """Write Table 1, Figure 2, DVC metrics and plots into `out_dir`; returns {name: path}.

    Names: ``table1_md``, ``table1_csv``, ``figure2_png``, ``figure2_csv``, ``metrics_json``, and
    when the runs logged calibration metrics ``calibration_md``, ``calibration_csv``,
    ``calibration_png`` (temperature, ECE before/after, accuracy vs coverage), ``run_times_md``
    (each setting and chain's training seconds, when the rows carry them), and when the
    splits had unseen types (``--unseen-types``) ``unseen_md``, ``unseen_csv``.
    With `log_to_mlflow`, logs them to one MLflow run "report" (tag ``kind=report``).
    """
    df = clean_results(results)
    if df.empty:
        raise InputError("the results table has no rows; run the grid first (`cellcontrast grid` or `dvc repro`)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / file for name, file in (
        ("table1_md", "table1.md"), ("table1_csv", "table1.csv"), ("figure2_png", "figure2.png"),
        ("figure2_csv", "figure2.csv"), ("metrics_json", "metrics.json"))}

    summary = summarize(df)
    folds = folds_markdown(df)
    _write_text(paths["table1_md"], table1_markdown(summary) + ("\n" + folds if folds else ""))
    with atomic_path(paths["table1_csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(paths["figure2_csv"]) as tmp:
        figure2_data(df).to_csv(tmp, index=False)
    fig = figure2(df)
    with atomic_path(paths["figure2_png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    metrics = metrics_dict(summary)
    _write_text(paths["metrics_json"], json.dumps(metrics, indent=2) + "\n")

    calibration = calibration_data(df)
    if calibration is not None:
        paths.update({"calibration_md": out / "calibration.md", "calibration_csv": out / "calibration.csv",
                      "calibration_png": out / "calibration.png"})
        _write_text(paths["calibration_md"], calibration_markdown(calibration))
        with atomic_path(paths["calibration_csv"]) as tmp:
            calibration.to_csv(tmp, index=False)
        with atomic_path(paths["calibration_png"]) as tmp:
            calibration_figure(calibration).savefig(tmp, format="png", dpi=110)

    times = run_times(df)
    if times is not None:
        paths["run_times_md"] = out / "run_times.md"
        _write_text(paths["run_times_md"], run_times_markdown(times))

    unseen = unseen_frame(df)
    if unseen is not None:
        paths.update({"unseen_md": out / "unseen.md", "unseen_csv": out / "unseen.csv"})
        _write_text(paths["unseen_md"], unseen_markdown(unseen))
        with atomic_path(paths["unseen_csv"]) as tmp:
            unseen.to_csv(tmp, index=False)

    if log_to_mlflow:
        _log_to_mlflow(paths, metrics, df, experiment)
    return paths


def run_times(results: pd.DataFrame) -> pd.DataFrame | None:
    """Each (setting, chain)'s training time over its runs (``train_seconds`` of the grid's rows),
    most expensive first: where the grid's time goes (None when the rows carry no times)."""
    if "train_seconds" not in results or results["train_seconds"].isna().all():
        return None
    frame = results.assign(chain=results["base"] + results["component"].map(lambda c: "" if c == "none" else f" + {c}"))
    times = frame.groupby(["setting", "chain"])["train_seconds"].agg(runs="count", total="sum", mean="mean")
    return times.sort_values("total", ascending=False).reset_index()


def run_times_markdown(times: pd.DataFrame) -> str:
    total = times["total"].sum()
    rows = [f"| {r.setting} | {r.chain} | {r.runs} | {r.total:.0f} | {r.mean:.1f} | {r.total / total:.0%} |"
            for r in times.itertuples()]
    return "\n".join([f"# Where the grid's time goes ({total:.0f} task seconds; MLflow: each run's train_seconds)", "",
                      "| setting | chain | runs | seconds | per run | share |", "|---|---|---|---|---|---|", *rows]) + "\n"


def _log_to_mlflow(paths: dict[str, Path], metrics: dict, results: pd.DataFrame, experiment: str) -> None:
    mlflow = tracking.mlflow
    tracking.setup(experiment)
    with mlflow.start_run(run_name="report", tags={"kind": "report", **tracking.parent_tags()}):
        mlflow.log_params({"settings": ",".join(settings_in(results)),
                           "n_runs": len(results),
                           "n_seeds": int(results["seed"].nunique())})
        for path in paths.values():
            mlflow.log_artifact(str(path))
        flat = mlflow_metrics(metrics)
        if flat:
            mlflow.log_metrics(flat)


def read_results(path: str | Path) -> pd.DataFrame:
    """The grid's results CSV; a missing, empty or unreadable one is an InputError."""
    path = Path(path)
    message = NO_RESULTS.format(path=path)
    if not path.is_file() or path.stat().st_size == 0:
        raise InputError(message)
    try:
        results = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise InputError(message) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a readable CSV: {first_line(err)}") from None
    if results.empty:
        raise InputError(message)
    return results

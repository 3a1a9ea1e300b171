"""Table 1, Figure 2, DVC metrics and the `report` command on a synthetic grid with known numbers."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from cellcontrast.experiments import report

SEEDS = (0, 1, 2)
DELTAS = (-0.01, 0.0, 0.02)  # per-seed offsets, scaled per component so that sds differ
SCALE = {"none": 1.0, "mlp": 1.5, "mls": 0.5}
# (top1, top3, macro_f1) of the Default setting
SPEC = {
    ("lr", "none"): (0.90, 0.980, 0.865), ("lr", "mlp"): (0.91, 0.970, 0.84),
    ("lr", "mls"): (0.93, 0.985, 0.86),
    ("actinn", "none"): (0.92, 0.984, 0.83), ("actinn", "mlp"): (0.89, 0.970, 0.80),
    ("actinn", "mls"): (0.90, 0.975, 0.87),
    ("scdae", "none"): (0.88, 0.960, 0.82), ("scdae", "mlp"): (0.915, 0.990, 0.81),
    ("scdae", "mls"): (0.905, 0.970, 0.88),
}
SETTING_SHIFT = {"default": 0.0, "scarce": -0.05}


def _value(setting, base, component, k, seed_index):
    shift = SETTING_SHIFT[setting] - (0.15 if setting == "scarce" and base == "actinn" else 0.0)
    return SPEC[(base, component)][k] + shift + DELTAS[seed_index] * SCALE[component]


def _results() -> pd.DataFrame:
    rows = []
    # scarce first: the report must still order the settings default, scarce
    for setting in ("scarce", "default"):
        for i, seed in enumerate(SEEDS):
            for base, component in SPEC:
                rows.append({
                    "setting": setting, "seed": seed, "base": base, "component": component,
                    "run_id": f"{setting}-{seed}-{base}-{component}",
                    "val_top1": 0.5, "val_top3": 0.5, "val_macro_f1": 0.5,
                    "test_top1": _value(setting, base, component, 0, i),
                    "test_top3": _value(setting, base, component, 1, i),
                    "test_macro_f1": _value(setting, base, component, 2, i),
                    "train_seconds": 1.0,
                })
    return pd.DataFrame(rows)


def _hand(setting, base, component, k):
    values = [_value(setting, base, component, k, i) for i in range(len(SEEDS))]
    return statistics.mean(values), statistics.stdev(values)


@pytest.fixture(scope="module")
def results():
    return _results()


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report.make_report(results, out, log_to_mlflow=False)


def test_summary_means_and_sds_match_hand_computation(results):
    summary = report.summarize(results)
    assert len(summary) == 2 * 9 * 3
    assert list(dict.fromkeys(summary["setting"])) == ["default", "scarce"]
    for _, r in summary.iterrows():
        k = list(report.METRICS).index(r["metric"])
        mean, sd = _hand(r["setting"], r["base"], r["component"], k)
        assert r["mean"] == pytest.approx(mean, abs=1e-12)
        assert r["sd"] == pytest.approx(sd, abs=1e-12)
        assert r["n"] == 3


def test_table1_csv_is_long_format(written, results):
    table = pd.read_csv(written["table1_csv"])
    assert list(table.columns[:7]) == ["setting", "base", "component", "model", "metric", "mean", "sd"]
    assert "n" in table.columns
    row = table[(table.setting == "scarce") & (table.base == "scdae") & (table.component == "mlp")
                & (table.metric == "macro_f1")].iloc[0]
    mean, sd = _hand("scarce", "scdae", "mlp", 2)
    assert row["mean"] == pytest.approx(mean) and row["sd"] == pytest.approx(sd) and row["n"] == 3


def test_bold_within_base_and_asterisk_on_overall_best(results):
    summary = report.summarize(results)
    frame = report.table1_frame(summary, "default").set_index("Model")
    bold = {(m, c) for m in frame.index for c in ("Top-1", "Top-3", "F1") if frame.loc[m, c].startswith("**")}
    star = {(m, c) for m in frame.index for c in ("Top-1", "Top-3", "F1") if frame.loc[m, c].endswith("\\*")}
    assert bold == {
        ("LR + MLS", "Top-1"), ("ACTINN", "Top-1"), ("scDAE + MLP", "Top-1"),
        ("LR + MLS", "Top-3"), ("ACTINN", "Top-3"), ("scDAE + MLP", "Top-3"),
        ("LR", "F1"), ("ACTINN + MLS", "F1"), ("scDAE + MLS", "F1"),
    }
    assert star == {("LR + MLS", "Top-1"), ("scDAE + MLP", "Top-3"), ("scDAE + MLS", "F1")}
    mean, sd = _hand("default", "lr", "mls", 0)
    assert frame.loc["LR + MLS", "Top-1"] == f"**{mean:.4f} ± {sd:.4f}**\\*"
    mean, sd = _hand("default", "lr", "none", 0)
    assert frame.loc["LR", "Top-1"] == f"{mean:.4f} ± {sd:.4f}"
    assert set(frame["n"]) == {"3"}
    # the flags in the long table agree with the marks
    flags = summary[(summary.setting == "default") & summary.best_in_setting]
    assert sorted(zip(flags.model, flags.metric, strict=True)) == [
        ("LR + MLS", "top1"), ("scDAE + MLP", "top3"), ("scDAE + MLS", "macro_f1")]


def test_table1_markdown_sections_in_setting_order(written):
    text = written["table1_md"].read_text()
    assert text.index("## Default") < text.index("## Data Scarce")
    assert "| Model | Top-1 | Top-3 | F1 | n |" in text
    assert text.count("| LR + MLS |") == 2
    assert "Paper (Table 1" in text


def test_missing_component_is_a_blank_row(results):
    partial = results[~((results.base == "scdae") & (results.component == "mls"))]
    summary = report.summarize(partial)
    frame = report.table1_frame(summary, "default").set_index("Model")
    assert (frame.loc["scDAE + MLS"] == "").all()
    assert frame.loc["scDAE", "F1"].startswith("**")  # now the best F1 of scDAE
    assert report.figure2_data(partial).shape[0] == 2 * 8


def test_figure2_png_and_csv(written, results):
    assert written["figure2_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = pd.read_csv(written["figure2_csv"])
    assert list(bars.columns[:4]) == ["setting", "model", "log_fold_change", "sd"]
    assert len(bars) == 2 * 9 and bars["model"].is_unique
    for setting in ("default", "scarce"):
        sub = bars[bars.setting == setting].set_index(["base", "component"])
        assert sub.loc[("lr", "none"), "log_fold_change"] == pytest.approx(0.0, abs=1e-12)
        lr = statistics.mean(_value(setting, "lr", "none", 0, i) for i in range(3))
        accs = [_value(setting, "actinn", "mls", 0, i) for i in range(3)]
        assert sub.loc[("actinn", "mls"), "log_fold_change"] == pytest.approx(
            math.log(statistics.mean(accs) / lr))
        assert sub.loc[("actinn", "mls"), "sd"] == pytest.approx(
            statistics.stdev(math.log(a / lr) for a in accs))
    assert bars.loc[(bars.setting == "scarce") & (bars.base == "actinn"), "log_fold_change"].lt(0).all()


def test_metrics_json(written):
    metrics = json.loads(written["metrics_json"].read_text())
    assert list(metrics) == ["default", "scarce"]
    assert set(metrics["default"]) == {f"{b}+{c}" for b, c in SPEC}
    assert metrics["scarce"]["lr+mls"]["top1"] == pytest.approx(_hand("scarce", "lr", "mls", 0)[0])
    assert metrics["default"]["actinn+none"]["macro_f1"] == pytest.approx(_hand("default", "actinn", "none", 2)[0])
    assert set(metrics["default"]["lr+none"]) == {"top1", "top3", "macro_f1"}


def test_rarest_classes():
    per_class = pd.DataFrame({
        "class": ["a", "b", "c", "a", "b", "c"], "f1": [0.5, 0.9, 0.1, 0.7, 0.8, 0.3],
        "precision": 0.0, "recall": 0.0, "support": [5, 50, 5, 5, 50, 5],
        "base": "lr", "component": ["none"] * 3 + ["mls"] * 3,
    })
    top = report.rarest_classes(per_class, n=2)
    assert list(top.index) == ["c", "a"]  # lowest support, ties by lowest F1
    assert list(top.columns) == ["support", "LR", "LR + MLS"]
    assert top.loc["a", "LR + MLS"] == pytest.approx(0.7)


def _params(tmp_path, results_path):
    p = tmp_path / "params.yaml"
    p.write_text(f"report:\n  results: {results_path}\n  out_dir: {tmp_path / 'out'}\n"
                 "  experiment: report-test\n")
    return str(p)


@pytest.mark.parametrize("content", [None, ""])
def test_cli_without_results_is_one_line_exit_2(tmp_path, capsys, content):
    from cellcontrast.cli.entry import main

    results_path = tmp_path / "results.csv"
    if content is not None:
        results_path.write_text(content)
    assert main(["report", "--params", _params(tmp_path, results_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"no results at {results_path}; run the grid first" in err
    assert not (tmp_path / "out").exists()


def test_cli_writes_report_and_logs_mlflow_run(tmp_path, capsys, mlflow_store, results):
    import mlflow

    from cellcontrast.cli.entry import main

    results_path = tmp_path / "results.csv"
    results.to_csv(results_path, index=False)
    assert main(["report", "--params", _params(tmp_path, results_path)]) == 0
    out = capsys.readouterr().out
    assert "## Default" in out and "| LR + MLS |" in out
    for name in ("table1.md", "table1.csv", "figure2.png", "figure2.csv", "metrics.json"):
        assert (tmp_path / "out" / name).is_file()
    runs = mlflow.search_runs(experiment_names=["report-test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "report" and run.data.tags["kind"] == "report"
    assert run.data.metrics["default.lr-mls.top1"] == pytest.approx(_hand("default", "lr", "mls", 0)[0])
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"table1.md", "table1.csv", "figure2.png", "metrics.json"} <= logged


def _with_calibration(results: pd.DataFrame) -> pd.DataFrame:
    df = results.copy()
    rank = {("lr", "none"): 0.9, ("scdae", "mlp"): 0.95}
    df["val_macro_f1"] = [rank.get((b, c), 0.5) for b, c in zip(df["base"], df["component"], strict=True)]
    df["temperature"] = 1.5
    df["test_ece_uncalibrated"] = 0.12
    df["test_ece"] = 0.03
    for t, cov, acc in (("00", 1.0, 0.80), ("50", 0.9, 0.85), ("90", 0.6, 0.95)):
        df[f"test_coverage_t{t}"] = cov
        df[f"test_accuracy_t{t}"] = acc
    return df


def test_calibration_report_files_and_validation_choice(results, tmp_path):
    calibrated = _with_calibration(results)
    frame = report.calibration_data(calibrated)
    chosen = frame[frame["chosen"]]
    assert set(chosen["setting"]) == {"default", "scarce"} and set(chosen["model"]) == {"scDAE + MLP"}
    paths = report.make_report(calibrated, tmp_path, log_to_mlflow=False)
    for name in ("calibration_md", "calibration_csv", "calibration_png"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0
    text = paths["calibration_md"].read_text()
    assert "\u2192 scDAE + MLP" in text and "| 0.1200 | 0.0300 |" in text and "0.600 / 0.9500" in text


def test_no_calibration_columns_no_calibration_files(written):
    assert "calibration_md" not in written
    assert report.calibration_data(_results()) is None


def test_run_times_say_where_the_grid_time_goes(results, tmp_path):
    timed = results.assign(train_seconds=np.where(results["base"].eq("scdae") & results["component"].eq("none"),
                                                  30.0, 1.0))
    paths = report.make_report(timed, tmp_path, log_to_mlflow=False)
    lines = paths["run_times_md"].read_text().splitlines()
    n_seeds = len(SEEDS)
    assert f"| scdae | {n_seeds} | {30 * n_seeds} | 30.0 |" in lines[4]  # the costliest first
    assert report.run_times(timed.drop(columns="train_seconds")) is None

"""Compare cellcontrast's chains with peer annotators (CellTypist, calibrated linear SVM, kNN).

    .venv/bin/python bench/compare_peers.py [--datasets all|NAME,...] [--settings default,scarce,natural]
        [--seeds 5] [--tune-trials 3] [--out-dir reports/peers] [--skip-cellcontrast] [--force]
        [--batch-key KEY]

The held-out-batch setting (``heldout`` in --settings, batches from obs[KEY], params.yaml's
batch_key without --batch-key) has one fold per batch in place of the seeds: fold i holds out the
i-th batch in sorted order, its split in OUT/{dataset}/splits/heldout/seed{i}. Its report shows
every fold (named by its held-out batch) and the mean over folds.

Datasets: every ``.h5ad`` in ``--data-dir`` (default ``../shared/data`` from the repository root)
plus the simulated atlas ``data/atlas.h5ad`` (name ``atlas``) when it exists. For each dataset:

1. ``cellcontrast benchmark`` (a subprocess in the repository root, so the same params.yaml)
   into OUT/{dataset}/: splits (OUT/{dataset}/splits/{setting}/seed{s}), tuning, the grid of
   3 bases x {none, mlp, mls}, OUT/{dataset}/results.csv. Skipped when results.csv already
   covers every requested setting and seed (``--force`` redoes it). With ``--skip-cellcontrast``
   only the splits are made (``cellcontrast split``, the same deterministic splits).
2. ``bench/peers.py`` in the peers' environment (``.venv-bench``, ``make bench-venv``) on every
   split: each peer trained on TRAIN only, scored on TEST. Skipped where the split's peers.json
   exists and was made from the same split.json.
3. Every saved chain is reloaded and run on its split's test cells: predict seconds (raw counts
   in, like the peers) and the per-class F1 (its macro F1 is checked against results.csv).
4. OUT/peers.csv (long: dataset, setting, seed, method, metrics, times), OUT/peers_per_class.csv
   and OUT/peers.md: per dataset and setting the peers, the cellcontrast chain chosen per seed
   on that seed's VALIDATION by the one-SE rule (``--selection best``: the best validation macro F1;
   ``cellcontrast.experiments.selection``; test never chooses, and
   no seed chooses on another seed's validation, whose cells may be in its test) and all chains; a
   summary "best peer vs chosen chain"; per-class F1 of the rarest types in the natural setting;
   per fold (held-out batch) macro F1 and top-1 in the heldout setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellcontrast.experiments.open_set_report import OPEN_SET_COLUMNS
from cellcontrast.experiments.selection import choose_per_seed

REPO = Path(__file__).resolve().parents[1]
PEERS_SCRIPT = REPO / "bench" / "peers.py"
PEERS = ["celltypist", "svm", "knn"]
PEER_NAMES = {"celltypist": "CellTypist (LR, defaults)", "svm": "linear SVM (calibrated)",
              "knn": "kNN (k=15, PCA)"}
BASES = ["lr", "actinn", "scdae"]
COMPONENTS = ["none", "mlp", "mls"]
BASE_NAMES = {"lr": "LR", "actinn": "ACTINN", "scdae": "scDAE"}
COMPONENT_NAMES = {"none": "", "mlp": " + MLP-CL", "mls": " + MLS-CL"}
# val_macro_f1_se: the bootstrap standard error of a chain's validation macro F1 (the one-SE rule)
METRICS = ["val_top1", "val_top3", "val_macro_f1", "val_macro_f1_se", "test_top1", "test_top3", "test_macro_f1"]
CSV_COLUMNS = ["dataset", "setting", "seed", "kind", "method", *METRICS, "train_seconds", "predict_seconds", "run_id"]
# With --unseen-types: how well each method flags the test cells of types it never trained on
# (peers: their top probability; chains also the energy and distance scores).
OPEN_SET = list(OPEN_SET_COLUMNS)
# Added after CSV_COLUMNS only when a held-out-batch setting was run: the fold's held-out batch.
HOLDOUT = "holdout"
CHOSEN = "chosen"  # the rows of the chain chosen per seed on its validation
# The rule that chooses (--selection): the one-standard-error rule, as `cellcontrast fit` does, or
# the best validation macro F1 (the rule of the tables before it).
SELECTION = {"one-se": True, "best": False}
selection_one_se = True
N_RARE = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chain_method(base: str, component: str) -> str:
    return base if component == "none" else f"{base}+{component}"


def display(method: str) -> str:
    if method in PEER_NAMES:
        return PEER_NAMES[method]
    base, _, component = method.partition("+")
    return BASE_NAMES.get(base, base) + COMPONENT_NAMES.get(component or "none", f" + {component}")


# ------------------------------------------------------------------ datasets and environments


def discover(args) -> tuple[list[tuple[str, Path]], list[str]]:
    """(name, path) of the datasets to run, and notes on what was left out."""
    data_dir = (REPO / args.data_dir).resolve()
    atlas = (REPO / args.atlas).resolve()
    found: dict[str, Path] = {}
    notes = []
    if data_dir.is_dir():
        found.update({p.stem: p for p in sorted(data_dir.glob("*.h5ad"))})
    else:
        notes.append(f"no data folder at {data_dir}: real datasets skipped")
    if atlas.exists():
        found["atlas"] = atlas
    else:
        notes.append(f"simulated atlas {atlas} not found, skipped (make it with `dvc repro atlas` or "
                     f"`cellcontrast simulate --out {args.atlas}`)")
    if args.datasets.strip() == "all":
        return list(found.items()), notes
    chosen = []
    for name in (n.strip() for n in args.datasets.split(",") if n.strip()):
        stem = Path(name).stem if name.endswith(".h5ad") else name
        if stem not in found:
            raise SystemExit(f"error: no dataset {name!r}; known: {', '.join(found) or 'none'}")
        chosen.append((stem, found[stem]))
    return chosen, notes


def check_bench_python(python: str) -> str:
    path = Path(python) if Path(python).is_absolute() else REPO / python
    hint = "run `make bench-venv` in the repository root (celltypist 1.7.1 + scikit-learn 1.7.2)"
    if not path.exists():
        raise SystemExit(f"error: the peers' environment is missing ({path} does not exist): {hint}")
    probe = subprocess.run([str(path), "-c", "import celltypist, sklearn, scanpy, anndata"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"error: {path} cannot import celltypist/scikit-learn/scanpy ({last}): {hint}")
    return str(path)


def run(cmd: list[str], env: dict | None = None) -> int:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def subprocess_env(args) -> dict:
    env = dict(os.environ)
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    return env


def prepare_store(uri: str, dataset_stem: str, artifact_dir: Path) -> None:
    """Create the benchmark's MLflow experiments in `uri` with artifacts under `artifact_dir`.

    Otherwise an experiment created by `cellcontrast benchmark` in a fresh sqlite store puts its
    artifacts in ./mlruns of the repository. Names as in `cellcontrast.pipeline.benchmark`;
    experiments that exist already are left as they are.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    for name in (f"benchmark-{dataset_stem}", f"benchmark-{dataset_stem}-tuning"):
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=(artifact_dir / name).resolve().as_uri())


def heldout_settings(params_path: str, settings: list[str], batch_key: str | None) -> dict[str, str]:
    """{setting: batch column} for the settings that leave one batch out (params.yaml's
    batch_key, or --batch-key); the random-split settings are not in it."""
    from cellcontrast.core.params import load_params, setting_params

    params = load_params(REPO / params_path if not Path(params_path).is_absolute() else params_path)
    out = {}
    for setting in settings:
        if "batch_key" in ((params.get("settings") or {}).get(setting) or {}):
            out[setting] = setting_params(params, setting, batch_key)["batch_key"]
    return out


def batch_names(atlas: Path, batch_key: str) -> list[str]:
    """The sorted batches of the atlas's labelled cells: fold i holds out the i-th, as in
    `cellcontrast benchmark` (which leaves out cells without a label before it counts them)."""
    import anndata as ad

    from cellcontrast.core.names import LABEL
    from cellcontrast.data.heldout import batch_values

    a = ad.read_h5ad(atlas, backed="r")
    try:
        obs = a.obs
    finally:
        a.file.close()
    if LABEL in obs.columns:
        labels = obs[LABEL]
        obs = obs[~(labels.isna().to_numpy() | (labels.astype(str).str.strip() == "").to_numpy())]
    return sorted(set(batch_values(obs, batch_key, where=str(atlas))))


def seeds_by_setting(settings: list[str], seeds: list[int], folds: dict[str, list[str]]) -> dict[str, list[int]]:
    """Each setting's seeds: 0..N-1, or for a held-out-batch setting its folds."""
    return {s: list(range(len(folds[s]))) if s in folds else list(seeds) for s in settings}


def split_dirs(ds_out: Path, settings: list[str], seeds: dict[str, list[int]]) -> list[Path]:
    return [ds_out / "splits" / s / f"seed{seed}" for s in settings for seed in seeds[s]]


def results_cover(path: Path, settings: list[str], seeds: dict[str, list[int]],
                  folds: dict[str, list[str]] | None = None) -> bool:
    """results.csv has every (setting, seed); a held-out-batch fold must also hold out the
    same batch as now (the `holdout` column)."""
    if not path.exists():
        return False
    try:
        table = pd.read_csv(path, dtype={HOLDOUT: str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return False
    have = set(zip(table["setting"].astype(str), table["seed"].astype(int), strict=True))
    if not all((s, seed) in have for s in settings for seed in seeds[s]):
        return False
    for setting, names in (folds or {}).items():
        if setting not in settings:
            continue
        if HOLDOUT not in table.columns:
            return False
        rows = table[table["setting"].astype(str) == setting]
        held = set(zip(rows["seed"].astype(int), rows[HOLDOUT].astype(str), strict=True))
        if not all((i, name) in held for i, name in enumerate(names)):
            return False
    return True


def cellcontrast_stage(name: str, atlas: Path, ds_out: Path, args, settings, seeds,
                       folds: dict[str, list[str]]) -> str | None:
    """Run `cellcontrast benchmark` (or only the splits); returns an error message or None.

    ``seeds``: each setting's seeds (a held-out-batch setting: its folds); ``folds``: the
    held-out-batch settings' batches, fold i holding out the i-th.
    """
    results = ds_out / "results.csv"
    cli = [sys.executable, "-m", "cellcontrast"]
    batch = ["--batch-key", args.batch_key] if args.batch_key and folds else []
    unseen = ["--unseen-types", str(args.unseen_types)] if args.unseen_types else []
    if args.skip_cellcontrast:
        for split in split_dirs(ds_out, settings, seeds):
            setting, seed = split.parent.name, split.name.removeprefix("seed")
            if (split / "split.json").exists() and not args.force:
                if setting in folds:
                    held = json.loads((split / "split.json").read_text()).get(HOLDOUT)
                    if held == folds[setting][int(seed)]:
                        continue
                    log(f"[{name}] {split} holds out {held!r}, fold {seed} is {folds[setting][int(seed)]!r}: "
                        "split again")
                else:
                    continue
            rc = run([*cli, "split", "--atlas", str(atlas), "--setting", setting, "--seed", seed,
                      "--out-dir", str(split), "--params", args.params, *(batch if setting in folds else []),
                      *unseen])
            if rc != 0:
                what = f"fold {seed} (holds out {folds[setting][int(seed)]})" if setting in folds else f"seed {seed}"
                return f"`cellcontrast split` failed (exit {rc}) for {setting} {what}"
        return None
    if results.exists() and not args.force:
        if results_cover(results, settings, seeds, folds):
            shown = "; ".join(f"{s} {'folds' if s in folds else 'seeds'} {seeds[s]}" for s in settings)
            log(f"[{name}] {results} exists and covers {shown}: benchmark skipped")
            return None
        log(f"[{name}] {results} lacks some requested setting/seed/fold: running the benchmark again")
    if args.tracking_uri:
        prepare_store(args.tracking_uri, atlas.stem, ds_out / "mlartifacts")
    t0 = time.time()
    rc = run([*cli, "benchmark", "--atlas", str(atlas), "--settings", ",".join(settings),
              "--seeds", str(args.seeds), "--tune-trials", str(args.tune_trials), "--out-dir", str(ds_out),
              "--params", args.params, *batch, *unseen], env=subprocess_env(args))
    if rc != 0:
        return f"`cellcontrast benchmark` failed (exit {rc})"
    log(f"[{name}] benchmark done in {time.time() - t0:.0f} s")
    return None


def peers_stage(name: str, ds_out: Path, args, settings, seeds, python: str) -> list[str]:
    """peers.py on every split; returns error messages."""
    import hashlib

    errors = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}
    for split in split_dirs(ds_out, settings, seeds):
        if not (split / "split.json").exists():
            errors.append(f"{split}: no split (the cellcontrast stage did not make it)")
            continue
        out = split / "peers.json"
        if out.exists() and not args.force:
            try:
                old = json.loads(out.read_text())
                fresh = old.get("split_sha256") == hashlib.sha256((split / "split.json").read_bytes()).hexdigest()
                complete = all(m in old.get("methods", {}) for m in args.methods.split(","))
            except json.JSONDecodeError:
                fresh = complete = False
            if fresh and complete:
                log(f"[{name}] {out} exists: skipped")
                continue
        rc = run([python, str(PEERS_SCRIPT), "--split-dir", str(split), "--methods", args.methods,
                  "--out", str(out), "--threads", str(args.threads)], env=env)
        if rc != 0:
            errors.append(f"{split}: peers.py exit {rc}" + ("" if out.exists() else " (no peers.json)"))
    return errors


# ------------------------------------------------------------------ collecting results


def holdout_of(split: Path) -> dict:
    """{'holdout': batch} for a held-out-batch split, {} for a random one."""
    path = split / "split.json"
    if not path.exists():
        return {}
    info = json.loads(path.read_text())
    return {HOLDOUT: str(info[HOLDOUT])} if info.get("heldout") and HOLDOUT in info else {}


def fold_infos(ds_out: Path, settings, seeds, folds: dict[str, list[str]]) -> dict[str, list[dict]]:
    """{held-out-batch setting: split.json of each fold, in fold order} (folds without a split left out)."""
    out = {}
    for setting in settings:
        if setting not in folds:
            continue
        out[setting] = []
        for seed in seeds[setting]:
            path = ds_out / "splits" / setting / f"seed{seed}" / "split.json"
            if path.exists():
                out[setting].append(json.loads(path.read_text()))
    return out


def peer_rows(name: str, ds_out: Path, settings, seeds) -> tuple[list[dict], list[dict]]:
    rows, per_class = [], []
    for split in split_dirs(ds_out, settings, seeds):
        path = split / "peers.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        counts = d.get("n_per_type_by_class") or {}
        where = holdout_of(split)
        for method, r in d["methods"].items():
            rows.append({"dataset": name, "setting": d["setting"], "seed": int(d["seed"]), "kind": "peer",
                         "method": method, **{m: r.get(m) for m in METRICS + OPEN_SET},
                         "train_seconds": r["train_seconds"], "predict_seconds": r["predict_seconds"], **where})
            for cls, f1, support in zip(d["classes"], r["per_class_f1"], d["test_support"], strict=True):
                per_class.append({"dataset": name, "setting": d["setting"], "seed": int(d["seed"]), **where,
                                  "method": method, "class": cls, "n_cells": counts.get(cls),
                                  "test_support": support, "f1": f1})
    return rows, per_class


def chain_rows(name: str, ds_out: Path, settings, seeds, threads: int) -> tuple[list[dict], list[dict], list[str]]:
    """results.csv rows, each completed by re-running its saved chain on the test cells."""
    results = ds_out / "results.csv"
    if not results.exists():
        return [], [], []
    import torch

    from cellcontrast.data.split_data import load_split_data
    from cellcontrast.nn.chain import load_chain, predict_proba
    from cellcontrast.train.metrics import macro_f1_standard_error, per_class_f1

    torch.set_num_threads(threads)
    table = pd.read_csv(results, dtype={HOLDOUT: str})
    wanted = {(s, seed) for s in settings for seed in seeds[s]}
    table = table[[(str(s), int(seed)) in wanted
                   for s, seed in zip(table["setting"], table["seed"], strict=True)]].copy()
    # A component's row in results.csv times only the component and its new head: the base was
    # trained once, in the row of component 'none'. The whole chain's training time is the sum.
    base_time = table[table["component"] == "none"].set_index(["setting", "seed", "base"])["train_seconds"]
    keys = list(zip(table["setting"], table["seed"], table["base"], strict=True))
    table["chain_train_seconds"] = [
        t + (base_time.get(k, np.nan) if c != "none" else 0.0)
        for t, c, k in zip(table["train_seconds"], table["component"], keys, strict=True)]
    rows, per_class, warnings = [], [], []
    for (setting, seed), group in table.groupby(["setting", "seed"], sort=True):
        split = ds_out / "splits" / str(setting) / f"seed{int(seed)}"
        data = load_split_data(split) if (split / "split.json").exists() else None
        counts = (data.info.get("n_per_type_by_class") or {}) if data else {}
        where = holdout_of(split)
        for _, r in group.iterrows():
            method = chain_method(r["base"], r["component"])
            if where and HOLDOUT in r and pd.notna(r[HOLDOUT]) and str(r[HOLDOUT]) != where[HOLDOUT]:
                warnings.append(f"{name} {setting} fold {seed} {method}: results.csv holds out {r[HOLDOUT]!r}, "
                                f"the split {where[HOLDOUT]!r}")
            row = {"dataset": name, "setting": setting, "seed": int(seed), "kind": "cellcontrast",
                   "method": method, **{m: r.get(m) for m in METRICS + OPEN_SET},
                   "train_seconds": r.get("chain_train_seconds"), "predict_seconds": np.nan,
                   "run_id": r.get("run_id"), **where}
            model_dir = ds_out / "models" / str(setting) / f"seed{int(seed)}" / f"{r['base']}-{r['component']}"
            if data is None or not (model_dir / "config.json").exists():
                warnings.append(f"{name} {setting} seed {seed} {method}: no saved chain or split, no per-class F1")
                rows.append(row)
                continue
            chain, _ = load_chain(model_dir)
            if pd.isna(row.get("val_macro_f1_se")):  # runs from before training logged it
                val_pred = predict_proba(chain, data.X["val"]).argmax(axis=1)
                row["val_macro_f1_se"] = macro_f1_standard_error(data.y["val"], val_pred, len(data.classes))
            t0 = time.perf_counter()
            proba = predict_proba(chain, data.X["test"])
            row["predict_seconds"] = time.perf_counter() - t0
            f1 = per_class_f1(data.y["test"], proba.argmax(axis=1), data.classes)
            macro = float(f1["f1"].mean())
            if pd.notna(r.get("test_macro_f1")) and abs(macro - float(r["test_macro_f1"])) > 1e-4:
                warnings.append(f"{name} {setting} seed {seed} {method}: reloaded chain's test macro F1 "
                                f"{macro:.4f} differs from results.csv {float(r['test_macro_f1']):.4f}")
            for cls, value, support in zip(f1["class"], f1["f1"], f1["support"], strict=True):
                per_class.append({"dataset": name, "setting": setting, "seed": int(seed), **where, "method": method,
                                  "class": cls, "n_cells": counts.get(cls), "test_support": int(support),
                                  "f1": float(value)})
            rows.append(row)
    return rows, per_class, warnings


# ------------------------------------------------------------------ report


def fmt(values: pd.Series, digits: int = 3, sd: bool = True) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "—"
    text = f"{values.mean():.{digits}f}"
    if sd and len(values) > 1:
        text += f" ± {values.std(ddof=1):.{digits}f}"
    return text


def with_chosen(group: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """``group`` plus one CHOSEN row per seed: the chain chosen on that seed's validation by
    the one-SE rule (``--selection best``: the highest validation macro F1) with
    ``cellcontrast.experiments.selection`` (a seed's own validation, never another seed's, whose
    cells may be in this seed's test set). Returns (rows, label of the choice)."""
    group = group[group["kind"] != CHOSEN]
    chains = group[group["kind"] == "cellcontrast"]
    simplest_first = [chain_method(b, c) for b in BASES for c in COMPONENTS]  # ties: LR before the others
    picked = choose_per_seed(chains, prefer=simplest_first, one_se=selection_one_se) if not chains.empty else chains
    if picked.empty:
        return group, None
    counts = picked["method"].value_counts()
    label = ", ".join(f"{display(m)} x{n}" if len(counts) > 1 else display(m) for m, n in counts.items())
    return pd.concat([group, picked.assign(kind=CHOSEN, chosen_from=picked["method"], method=CHOSEN)]), label


def times_chosen(group: pd.DataFrame, method: str) -> int:
    return int((group.get("chosen_from", pd.Series(dtype=object)) == method).sum())


def method_order(group: pd.DataFrame) -> list[str]:
    peers = [m for m in PEERS if m in set(group["method"])]
    known = [chain_method(b, c) for b in BASES for c in COMPONENTS]
    chains = sorted(set(group.loc[group["kind"] == "cellcontrast", "method"]),
                    key=lambda m: known.index(m) if m in known else len(known))
    return peers + chains


def table_md(group: pd.DataFrame, chosen: str | None, unit: str = "seeds") -> list[str]:
    """``group`` with its CHOSEN rows (``with_chosen``); ``chosen``: the label of the choice."""
    lines = [f"| method | {unit} | val macro F1 | test top-1 | test top-3 | test macro F1 | train s | predict s |",
             "|---|---|---|---|---|---|---|---|"]

    def line(method: str, label: str) -> str:
        g = group[group["method"] == method]
        return (f"| {label} | {g['seed'].nunique()} | {fmt(g['val_macro_f1'])} | {fmt(g['test_top1'])} | "
                f"{fmt(g['test_top3'])} | {fmt(g['test_macro_f1'])} | {fmt(g['train_seconds'], 1, False)} | "
                f"{fmt(g['predict_seconds'], 3, False)} |")

    order = method_order(group)
    for m in (m for m in order if m in PEERS):
        lines.append(line(m, f"peer: {display(m)}"))
    if chosen:
        lines.append(line(CHOSEN, f"**cellcontrast chosen per seed on its validation: {chosen}**"))
    for m in (m for m in order if m not in PEERS):
        lines.append(line(m, f"cellcontrast {display(m)}" + chosen_mark(group, m)))
    return lines


def chosen_mark(group: pd.DataFrame, method: str) -> str:
    n = times_chosen(group, method)
    return f" (chosen in {n})" if n else ""


def heldout_md(group: pd.DataFrame, chosen: str | None, infos: list[dict]) -> list[str]:
    """A held-out-batch setting: which batch each fold holds out, then test macro F1 and top-1
    of every method per fold and their mean over folds, then the usual mean ± sd table."""
    seeds = sorted(int(s) for s in group["seed"].dropna().unique())
    by_seed = {int(i["seed"]): i for i in infos}
    names = {seed: str(by_seed[seed][HOLDOUT]) if seed in by_seed else f"fold {seed}" for seed in seeds}
    lines = []
    if infos:
        first = infos[0]
        lines.append(f"One fold per batch of `{first.get('batch_key')}`: fold i trains on the other batches "
                     "(validation drawn from them, stratified by type) and is tested on every cell of the "
                     "held-out batch whose type is kept. "
                     f"{len(first['classes'])} types kept (at least {first.get('min_cells')} cells in the "
                     f"training batches of every fold): {', '.join(map(str, first['classes']))}."
                     + (f" Left out: {', '.join(map(str, first['dropped_types']))}."
                        if first.get("dropped_types") else ""))
        lines.append("")
        lines += ["| fold | held-out batch | train cells | val cells | test cells |", "|---|---|---|---|---|"]
        for info in infos:
            n = info["n_cells"]
            lines.append(f"| {info['seed']} | {info[HOLDOUT]} | {n['train']} | {n['val']} | {n['test']} |")
        lines.append("")
    order = method_order(group)
    rows = [(m, f"peer: {display(m)}") for m in order if m in PEERS]
    if chosen:
        rows.append((CHOSEN, f"**cellcontrast chosen per fold on its validation: {chosen}**"))
    rows += [(m, f"cellcontrast {display(m)}" + chosen_mark(group, m)) for m in order if m not in PEERS]
    folds_head = " | ".join(f"{names[s]} (fold {s})" for s in seeds)
    for metric, title in (("test_macro_f1", "Test macro F1"), ("test_top1", "Test top-1")):
        lines += [f"{title} per fold (held-out batch) and mean over folds"
                  + (" (val macro F1: mean over folds; each fold's choice is made on its own):" if metric == "test_macro_f1"
                     else ":"), "",
                  f"| method |{' val macro F1 |' if metric == 'test_macro_f1' else ''} {folds_head} | mean |",
                  "|---|" + ("---|" if metric == "test_macro_f1" else "") + "---|" * len(seeds) + "---|"]
        for method, label in rows:
            g = group[group["method"] == method]
            cells = [fmt(g.loc[g["seed"] == s, metric]) for s in seeds]
            val = f" {fmt(g['val_macro_f1'], sd=False)} |" if metric == "test_macro_f1" else ""
            lines.append(f"| {label} |{val} {' | '.join(cells)} | {fmt(g[metric], sd=False)} |")
        lines.append("")
    lines += ["Mean ± sd over folds, with top-3 and times:", "", *table_md(group, chosen, unit="folds")]
    return lines


def unseen_md(group: pd.DataFrame, chosen: str | None) -> list[str]:
    """How each method flags test cells of the types removed from its training (mean over seeds)."""
    if "test_unseen_auroc_max_prob" not in group or group["test_unseen_auroc_max_prob"].isna().all():
        return []
    lines = ["Unseen types (test cells of types removed from train and val), mean over seeds: AUROC of each "
             "novelty score for unseen against seen test cells; Unassigned: top probability below 0.5; "
             "with `--flag-unseen` also the energy above 5% of validation; flagged: above the kNN (centroid) "
             "distance threshold that flags 5% of validation.", "",
             "| method | " + " | ".join(OPEN_SET_COLUMNS.values()) + " |", "|---" * (len(OPEN_SET) + 1) + "|"]
    order = method_order(group)
    rows = [(m, f"peer: {display(m)}") for m in order if m in PEERS]
    if chosen:
        rows.append((CHOSEN, f"**cellcontrast chosen per seed: {chosen}**"))
    rows += [(m, f"cellcontrast {display(m)}") for m in order if m not in PEERS]
    for method, label in rows:
        g = group[group["method"] == method]
        lines.append(f"| {label} | " + " | ".join(fmt(g[c], sd=False) if c in g else "—" for c in OPEN_SET) + " |")
    return lines + [""]


def summary_rows(long: pd.DataFrame) -> list[dict]:
    out = []
    for (dataset, setting), group in long.groupby(["dataset", "setting"], sort=False):
        peers = group[group["kind"] == "peer"]
        peer_means = peers.groupby("method")["test_macro_f1"].mean()
        best_peer = peer_means.idxmax() if not peer_means.empty else None
        group, chosen = with_chosen(group)
        cc = group.loc[group["method"] == CHOSEN, "test_macro_f1"] if chosen else pd.Series(dtype=float)
        bp = peers.loc[peers["method"] == best_peer, "test_macro_f1"] if best_peer else pd.Series(dtype=float)
        gap = cc.mean() - bp.mean() if chosen and best_peer else np.nan
        out.append({"dataset": dataset, "setting": setting, "seeds": int(group["seed"].nunique()),
                    "best_peer": best_peer, "peer_f1": fmt(bp), "chosen": chosen, "cc_f1": fmt(cc), "gap": gap})
    return out


def rare_md(per_class: pd.DataFrame, long: pd.DataFrame, dataset: str) -> list[str]:
    sub = per_class[(per_class["dataset"] == dataset) & (per_class["setting"] == "natural")]
    if sub.empty:
        return []
    picked, chosen = with_chosen(long[(long["dataset"] == dataset) & (long["setting"] == "natural")])
    picked = picked[picked["method"] == CHOSEN]
    if chosen:  # each seed's per-class F1 of the chain chosen on that seed's validation
        keys = set(zip(picked["seed"], picked["chosen_from"], strict=True))
        mine = sub[[(s, m) in keys for s, m in zip(sub["seed"], sub["method"], strict=True)]]
        sub = pd.concat([sub, mine.assign(method=CHOSEN)])
    methods = [m for m in PEERS if m in set(sub["method"])] + ([CHOSEN] if chosen else [])
    sizes = sub.drop_duplicates("class").set_index("class")["n_cells"].dropna()
    if sizes.empty:
        return []
    rare = sizes.astype(int).sort_values(kind="stable").index[:N_RARE].tolist()
    head = " | ".join(f"chosen per seed ({chosen})" if m == CHOSEN else display(m) for m in methods)
    lines = [f"Per-class test F1 of the {len(rare)} rarest types, natural setting (mean over seeds; with a "
             "handful of test cells per type, one cell moves F1 a lot):", "",
             f"| type | cells kept | test cells / seed | {head} |",
             "|---|---|---|" + "---|" * len(methods)]
    for cls in rare:
        c = sub[sub["class"] == cls]
        support = c.drop_duplicates("seed")["test_support"]
        cells = " | ".join(fmt(c.loc[c["method"] == m, "f1"], 2) for m in methods)
        lines.append(f"| {cls} | {int(sizes[cls])} | {fmt(support, 1, False)} | {cells} |")
    return lines


def write_report(long: pd.DataFrame, per_class: pd.DataFrame, out: Path, args, notes: list[str],
                 errors: dict[str, list[str]], folds: dict[tuple[str, str], list[dict]] | None = None) -> Path:
    """``folds``: {(dataset, held-out-batch setting): split.json of each fold}."""
    folds = folds or {}
    heldout = sorted({s for _, s in folds})
    random = [s for s in args.settings.split(",") if s not in heldout]
    parts = [f"seeds 0..{args.seeds - 1}"] if random or not heldout else []
    if heldout:
        parts.append(f"{', '.join(heldout)}: one fold per batch" + (f" of `{args.batch_key}`" if args.batch_key else ""))
    lines = ["# cellcontrast vs peer annotators", "",
             f"`{' '.join(shlex.quote(a) for a in sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}); "
             f"settings {args.settings}, {'; '.join(parts)}, tuning trials {args.tune_trials}.", "",
             "Every method is trained on the split's TRAIN cells and scored on its TEST cells; metrics are "
             "mean ± sd over seeds (each seed a new downsample, split and model initialisation). Peers run "
             "with fixed defaults (no tuning, nothing selected on validation). The cellcontrast row *chosen per "
             "seed* is, in each seed, chosen on that seed's VALIDATION cells among the 9 "
             + ("by the one-standard-error rule (the simplest chain, LR first, within one bootstrap SE of the "
                "best validation macro F1) " if selection_one_se else "by the highest validation macro F1 ")
             + "(tuning ran on a split holding no seed's test cell); no test cell takes part in any choice. "
             "The summary's best peer is the peer with the highest mean TEST "
             "macro F1, an optimistic choice in the peers' favour. Times: wall seconds, one thread per "
             "process; train includes preprocessing and, for a cellcontrast chain with a component, the base "
             "model's training too (base + component + new head); predict is raw test counts to "
             "probabilities, model already in memory. On these small splits the times are dominated by "
             "fixed overheads.", ""]
    if heldout:
        lines += [f"Held-out batch ({', '.join(heldout)}): the seeds are folds, one per batch; fold i holds out "
                  "the i-th batch (sorted names), trains on the others and tests on the held-out one, so "
                  "\"seeds\" in the summary counts folds and mean ± sd is over folds. Each fold's chain is chosen on "
                  "that fold's validation (drawn from its training batches).",
                  ""]
    for note in notes:
        lines.append(f"- note: {note}")
    if notes:
        lines.append("")
    lines += ["## Summary: macro F1 on test, best peer vs cellcontrast (chosen on validation)", "",
              "| dataset | setting | seeds | best peer | peer macro F1 | cellcontrast chosen on val | "
              "its macro F1 | gap (cellcontrast − peer) |", "|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(long):
        gap = "—" if pd.isna(r["gap"]) else f"{r['gap']:+.3f}"
        lines.append(f"| {r['dataset']} | {r['setting']} | {r['seeds']} | "
                     f"{display(r['best_peer']) if r['best_peer'] else '—'} | {r['peer_f1']} | "
                     f"{r['chosen'] or '—'} | {r['cc_f1']} | {gap} |")
    lines.append("")
    for dataset in long["dataset"].drop_duplicates():
        lines += [f"## {dataset}", ""]
        for message in errors.get(dataset, []):
            lines.append(f"- error: {message}")
        if errors.get(dataset):
            lines.append("")
        d = long[long["dataset"] == dataset]
        for setting in [s for s in args.settings.split(",") if s in set(d["setting"])]:
            group = d[d["setting"] == setting]
            group, chosen = with_chosen(group)
            if (dataset, setting) in folds:
                body = heldout_md(group, chosen, folds[(dataset, setting)])
            else:
                body = table_md(group, chosen)
            lines += [f"### {dataset} / {setting}", "", *body, "", *unseen_md(group, chosen)]
        rare = rare_md(per_class, long, dataset)
        if rare:
            lines += [f"### {dataset} / natural: rarest types", "", *rare, ""]
    for dataset in errors:
        if dataset not in set(long["dataset"]):
            lines += [f"## {dataset}", "", *(f"- error: {m}" for m in errors[dataset]), ""]
    path = out / "peers.md"
    tmp = path.with_name(f".peers.md.part.{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part.{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="all", help="'all' or comma-separated names (file stems; 'atlas')")
    p.add_argument("--settings", default="default,scarce,natural")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    p.add_argument("--tune-trials", type=int, default=3, help="Optuna trials per study in the benchmark")
    p.add_argument("--out-dir", default="reports/peers")
    p.add_argument("--skip-cellcontrast", action="store_true",
                   help="only make the splits and run the peers (an existing results.csv is still reported)")
    p.add_argument("--force", action="store_true", help="redo benchmarks and peers.json that exist")
    p.add_argument("--methods", default=",".join(PEERS), help="peers to run (default: celltypist,svm,knn)")
    p.add_argument("--data-dir", default="../shared/data", help="folder of real .h5ad datasets (from the repo root)")
    p.add_argument("--atlas", default="data/atlas.h5ad", help="the simulated atlas (from the repo root)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--bench-python", default=".venv-bench/bin/python", help="interpreter with celltypist")
    p.add_argument("--threads", type=int, default=1, help="threads for the peers and for chain prediction")
    p.add_argument("--batch-key", default=None,
                   help="heldout: the obs column of batches (donor, individual, ...), passed to `cellcontrast "
                        "benchmark/split --batch-key`; one fold per batch (default: params.yaml's batch_key)")
    p.add_argument("--unseen-types", type=int, default=0, metavar="N",
                   help="per seed, N types left out of training and kept in the test (`cellcontrast benchmark "
                        "--unseen-types`): the report adds how well each method flags them")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store for the benchmark runs, e.g. sqlite:///reports/peers/mlflow.db; its "
                        "artifacts then go under OUT/{dataset}/mlartifacts (default: MLFLOW_TRACKING_URI or "
                        "the project's sqlite:///mlflow.db with ./mlruns)")
    p.add_argument("--selection", choices=sorted(SELECTION), default="one-se",
                   help="how the reported chain is chosen on each seed's validation: one-se (the simplest chain "
                        "within one standard error of the best, as `cellcontrast fit` chooses) or best")
    args = p.parse_args(argv)
    global selection_one_se
    selection_one_se = SELECTION[args.selection]
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    unknown = [m for m in args.methods.split(",") if m not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")

    python = check_bench_python(args.bench_python)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.settings = ",".join(settings)
    seeds = list(range(args.seeds))
    try:
        batch_keys = heldout_settings(args.params, settings, args.batch_key)
    except Exception as err:  # noqa: BLE001 - an unknown setting, a bad params.yaml: one line
        p.error(str(err))
    if args.batch_key and not batch_keys:
        log(f"note: --batch-key {args.batch_key} is ignored: no setting of --settings leaves one batch out "
            "(add heldout)")
        args.batch_key = None
    out = Path(args.out_dir)
    out = out if out.is_absolute() else REPO / out
    out.mkdir(parents=True, exist_ok=True)
    datasets, notes = discover(args)
    for note in notes:
        log(f"note: {note}")
    if not datasets:
        log("error: no datasets to run")
        return 2

    long_rows, per_class_rows, errors, fold_report = [], [], {}, {}
    for name, atlas in datasets:
        ds_out = out / name
        log(f"[{name}] {atlas} -> {ds_out}")
        ds_settings, folds = list(settings), {}
        for setting, key in batch_keys.items():
            try:
                folds[setting] = batch_names(atlas, key)
            except Exception as err:  # noqa: BLE001 - no such column, one batch: this dataset skips the setting
                errors.setdefault(name, []).append(f"{setting}: {err}; setting skipped")
                log(f"[{name}] {setting}: {err}; setting skipped")
                ds_settings.remove(setting)
                continue
            log(f"[{name}] {setting}: {len(folds[setting])} folds, one per batch of {key!r}: "
                f"{', '.join(folds[setting])}")
        if not ds_settings:
            continue
        ds_seeds = seeds_by_setting(ds_settings, seeds, folds)
        err = cellcontrast_stage(name, atlas, ds_out, args, ds_settings, ds_seeds, folds)
        if err:
            errors.setdefault(name, []).append(err)
            log(f"[{name}] {err}")
        errors.setdefault(name, []).extend(peers_stage(name, ds_out, args, ds_settings, ds_seeds, python))
        for setting, infos in fold_infos(ds_out, ds_settings, ds_seeds, folds).items():
            fold_report[(name, setting)] = infos
            for info in infos:
                if str(info.get(HOLDOUT)) != folds[setting][int(info["seed"])]:
                    errors.setdefault(name, []).append(
                        f"{setting} fold {info['seed']}: its split holds out {info.get(HOLDOUT)!r}, expected "
                        f"{folds[setting][int(info['seed'])]!r} (rerun with --force)")
        rows, per_class = peer_rows(name, ds_out, ds_settings, ds_seeds)
        c_rows, c_per_class, warnings = chain_rows(name, ds_out, ds_settings, ds_seeds, args.threads)
        for w in warnings:
            log(f"warning: {w}")
        notes.extend(warnings)
        long_rows += rows + c_rows
        per_class_rows += per_class + c_per_class
        if not errors[name]:
            del errors[name]

    if not long_rows:
        log("error: no results to report")
        return 1
    long = pd.DataFrame(long_rows)
    found = [c for c in OPEN_SET if c in long.columns and long[c].notna().any()]  # with --unseen-types
    long = long.reindex(columns=CSV_COLUMNS + found + ([HOLDOUT] if HOLDOUT in long.columns else []))
    rank = {s: i for i, s in enumerate(settings)}
    long = long.sort_values(["dataset", "setting", "kind", "method", "seed"],
                            key=lambda col: col.map(rank) if col.name == "setting" else col).reset_index(drop=True)
    per_class = pd.DataFrame(per_class_rows)
    write_csv(long, out / "peers.csv")
    write_csv(per_class, out / "peers_per_class.csv")
    report = write_report(long, per_class, out, args, notes, errors, fold_report)
    print("| dataset | setting | seeds | best peer | peer macro F1 | cellcontrast (val-chosen) | its macro F1 | gap |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary_rows(long):
        gap = "—" if pd.isna(r["gap"]) else f"{r['gap']:+.3f}"
        print(f"| {r['dataset']} | {r['setting']} | {r['seeds']} | {r['best_peer'] or '—'} | {r['peer_f1']} | "
              f"{r['chosen'] or '—'} | {r['cc_f1']} | {gap} |")
    print(f"wrote {out / 'peers.csv'}, {out / 'peers_per_class.csv'}, {report}")
    for dataset, messages in errors.items():
        for m in messages:
            log(f"error [{dataset}]: {m}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

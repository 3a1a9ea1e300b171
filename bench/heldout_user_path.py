"""The user path on held-out donors: `cellcontrast fit` on some donors, `annotate` on a new one.

For each dataset and each donor (a fold), the reference is every cell of the other donors and
the query every cell of that donor. cellcontrast is fitted through its CLI with its defaults
(chains lr,scdae), once with ``--batch-key donor`` (grouped validation: every choice made
leave-one-donor-out inside the reference, then a refit on every cell) and once without (a
stratified 10% validation part), and the query annotated with ``cellcontrast annotate``
(defaults: no Unassigned calls). Peers are trained on the same reference cells:
CellTypist, a calibrated linear SVM, logistic regression and PCA-kNN through ``bench/peers.py``
(in ``.venv-bench``), and scANVI (scvi-tools: scVI then scANVI on the reference, 2,000
seurat_v3 HVGs of the reference counts, query mapped with ``prepare_query_anndata`` /
``load_query_data`` and a short query training with weight_decay=0, then ``predict``), run by
this same file in its ``--scanvi-worker`` mode inside ``.venv-bench``.

Metric: macro F1 (sklearn ``f1_score(average='macro', zero_division=0)``) of each method's
per-cell label against ``obs['cell_type']`` on the query cells whose type the reference holds
(types matched by name; query cells of types absent from the reference are excluded and
counted), over the labels present in the truth or the predictions among the reference's types
(a prediction outside them, e.g. 'Unassigned', only counts as a miss).

Needs ``make bench-venv`` and, for scANVI, ``.venv-bench/bin/pip install torch==2.13.0`` then
``.venv-bench/bin/pip install scvi-tools torch==2.13.0``. Run from the repository root,
single-threaded and niced (the command of docs/results/heldout_user_path.md):

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
    PYTHONPATH=/work/wt-bench/src nice -n 10 /work/main/.venv/bin/python bench/heldout_user_path.py \\
        --datasets human,mouse,atlas --atlas-cells 20000 --out-dir /work/heldout-runs \\
        --csv docs/results/heldout_user_path.csv

Two more kinds of fold (``--split``; ``heldout_donor`` in the CSV then holds the fold's name):

- ``--split random``: per dataset one fold, a seeded (``--seed`` 0), per-type stratified split
  of ALL cells: reference = 80%, query = 20% (``--query-fraction``; per type
  ``floor(0.2 n + 0.5)`` query cells; types with fewer than ``--min-type-cells`` 5 cells go
  wholly into the reference). cellcontrast is fitted without ``--batch-key`` (``cc_nobatch``)
  and, where the dataset has a donor column with 2+ donors in the reference, also with
  ``--batch-key donor`` (``cc_batchkey``). Datasets: any file stem of /work/shared/data
  (default: the five, smallest first).
- ``--split cross-study``: train on one dataset, annotate another (``--pairs REF:QUERY,...``,
  default the Baron human <-> mouse pancreas pair, both ways). Types are harmonised by name
  (lower-case, stripped) and scored on the types both hold (the macro F1's labels are those
  types; a prediction of a reference-only type counts as a miss). Genes are matched
  case-insensitively: both sets' symbols are upper-cased (mouse ``Ins1`` -> ``INS1``), a symbol
  that upper-cases to a duplicate within its set is dropped, and BOTH reference and query are
  restricted to the genes they share, for every method. cellcontrast: ``fit --query QUERY.h5ad
  --batch-key donor``, then ``annotate`` (``--case-insensitive`` only if the written gene names
  still differ in case, which the upper-casing rules out).

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/heldout_user_path.py --split random \\
        --out-dir /work/random-runs --csv docs/results/user_path_random_crossstudy.csv
    PYTHONPATH=src nice -n 10 .venv/bin/python bench/heldout_user_path.py --split cross-study \\
        --out-dir /work/random-runs --csv docs/results/user_path_random_crossstudy.csv --append

Outputs under --out-dir: per dataset and fold the reference/query .h5ad, both annotators and
their model cards, the peers' split folder and JSON, scANVI's predictions, a ``result.json`` per
step (a rerun reuses finished steps; ``--force`` redoes them), and an MLflow store
(``mlflow.db``, ``mlruns/``) that MLFLOW_TRACKING_URI points at for the fits. The CSV has one
row per dataset, fold and method; the Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data")
DATASETS = {
    "human": DATA / "baron_human_pancreas_4donors.h5ad",
    "mouse": DATA / "baron_mouse_pancreas_2donors.h5ad",
    "atlas": None,  # simulated into --out-dir
}
RANDOM_DATASETS = ("pbmc68k_reduced_counts_10types", "baron_human_pancreas_4donors", "baron_mouse_pancreas_2donors",
                   "human_kidney_11types", "cbmc_citeseq_15types")  # smallest first
CROSS_PAIRS = "baron_human_pancreas_4donors:baron_mouse_pancreas_2donors,baron_mouse_pancreas_2donors:baron_human_pancreas_4donors"
NO_DONOR = "none"  # the donor of every cell of a set without a donor column
PEERS = ("celltypist", "svm", "logreg", "knn")
VARIANTS = {"cc_batchkey": ["--batch-key", "donor"], "cc_nobatch": []}
LABEL, DONOR = "cell_type", "donor"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("donor", "random", "cross-study"), default="donor",
                   help="donor: leave one donor out; random: one stratified 80/20 fold of all cells per dataset; "
                        "cross-study: train on one dataset, annotate another (--pairs)")
    p.add_argument("--datasets", default=None,
                   help="comma-separated, in order: human, mouse, atlas (--split donor, the default) or file stems of "
                        f"{DATA} (--split random; default {','.join(RANDOM_DATASETS)})")
    p.add_argument("--donors", default=None,
                   help="--split donor: only these held-out donors (comma-separated; default every donor), e.g. to "
                        "run a dataset's folds in two processes, each with its own --csv")
    p.add_argument("--pairs", default=CROSS_PAIRS, help="--split cross-study: REF:QUERY file stems, comma-separated")
    p.add_argument("--query-fraction", type=float, default=0.2, help="--split random: each type's query share")
    p.add_argument("--min-type-cells", type=int, default=5,
                   help="--split random: types with fewer cells go wholly into the reference")
    p.add_argument("--seed", type=int, default=0, help="--split random: the split's seed")
    p.add_argument("--append", action="store_true",
                   help="keep the CSV's rows of other datasets (those this run writes are replaced)")
    p.add_argument("--out-dir", default=str(ROOT.parent / "heldout-runs"), help="working folder (outside the repo)")
    p.add_argument("--csv", default=str(ROOT / "docs/results/heldout_user_path.csv"), help="results CSV to write")
    p.add_argument("--cellcontrast", default=str(Path(sys.executable).with_name("cellcontrast")),
                   help="the cellcontrast CLI (default: beside this Python)")
    p.add_argument("--bench-python", default=str(ROOT / ".venv-bench/bin/python"),
                   help="Python of the peers' venv (make bench-venv; scvi-tools for scANVI)")
    p.add_argument("--peers", default=",".join(PEERS), help="peers.py methods")
    p.add_argument("--no-scanvi", action="store_true", help="skip scANVI")
    p.add_argument("--scvi-epochs", type=int, default=100)
    p.add_argument("--scanvi-epochs", type=int, default=20)
    p.add_argument("--query-epochs", type=int, default=100)
    p.add_argument("--scanvi-timeout", type=float, default=900, help="seconds per fold before scANVI is stopped")
    p.add_argument("--cap-minutes", type=float, default=70,
                   help="per dataset: no new fold starts once the folds' time so far plus a mean fold passes this "
                        "(a reused fold counts the time it took when computed, its fold.json)")
    p.add_argument("--atlas-cells", type=int, default=20000)
    p.add_argument("--atlas-types", type=int, default=97)
    p.add_argument("--atlas-genes", type=int, default=2000)
    p.add_argument("--atlas-individuals", type=int, default=4)
    p.add_argument("--val-cells", type=int, default=200,
                   help="peers' val.h5ad: this many reference cells (information only, peers select nothing on it)")
    p.add_argument("--force", action="store_true", help="redo finished steps")
    # the scANVI worker, run by the main mode inside .venv-bench
    p.add_argument("--scanvi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--pred-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------ helpers


def run_cmd(cmd: list[str], log_path: Path, cwd: Path, env: dict | None = None,
            timeout: float | None = None) -> tuple[int, float, str]:
    """Run niced, output to log_path; (return code, wall seconds, output). rc 124 on timeout."""
    full = ["nice", "-n", "10", *cmd]
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write("$ " + " ".join(full) + "\n")
        fh.flush()
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 124
    seconds = time.perf_counter() - t0
    return rc, seconds, log_path.read_text()


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def save_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def macro_f1(truth, pred, reference_types) -> float:
    """Macro F1 over the reference's types present in truth or prediction."""
    from sklearn.metrics import f1_score

    ref = set(reference_types)
    labels = sorted((set(truth) | set(pred)) & ref)
    return float(f1_score(list(truth), list(pred), labels=labels, average="macro", zero_division=0))


# ------------------------------------------------------------------ data


def atlas_path(args) -> Path:
    out = Path(args.out_dir) / "atlas" / (f"sim_{args.atlas_cells}c_{args.atlas_types}t_{args.atlas_genes}g_"
                                          f"{args.atlas_individuals}ind.h5ad")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [args.cellcontrast, "simulate", "--out", str(out), "--cells", str(args.atlas_cells),
               "--types", str(args.atlas_types), "--genes", str(args.atlas_genes),
               "--individuals", str(args.atlas_individuals), "--seed", "0"]
        rc, sec, text = run_cmd(cmd, out.with_suffix(".log"), out.parent)
        if rc != 0:
            raise RuntimeError(f"simulate failed:\n{text[-2000:]}")
        log(f"atlas: simulated {out.name} in {sec:.0f} s")
    return out


def load_dataset(name: str, args):
    import anndata as ad
    import scipy.sparse as sp

    path = atlas_path(args) if name == "atlas" else DATASETS.get(name, DATA / f"{name}.h5ad")
    a = ad.read_h5ad(path)
    obs = a.obs
    if DONOR in obs or "individual" in obs:
        donor = obs[DONOR] if DONOR in obs else obs["individual"]  # the simulator calls donors individuals
        donor = donor.astype(str).values
    else:
        donor = NO_DONOR
    a.obs = obs[[LABEL]].assign(**{DONOR: donor})
    a.obs[LABEL] = a.obs[LABEL].astype(str)
    a.X = sp.csr_matrix(a.X, dtype="float32")
    return a, path


def write_fold(adata, donor: str, fold_dir: Path) -> dict:
    """Leave-one-donor-out fold: the reference is every other donor's cells."""
    mask = (adata.obs[DONOR] == donor).values
    return write_parts(adata[~mask].copy(), adata[mask].copy(), fold_dir)


def random_query_mask(adata, fraction: float, min_cells: int, seed: int):
    """Per type (sorted), floor(fraction * n + 0.5) random cells (at least 1) to the query; types under
    min_cells cells stay wholly in the reference."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = adata.obs[LABEL].astype(str).values
    mask = np.zeros(adata.n_obs, dtype=bool)
    for t in sorted(set(labels)):
        idx = np.flatnonzero(labels == t)
        if idx.size < min_cells:
            continue
        n_q = max(1, int(np.floor(fraction * idx.size + 0.5)))
        mask[rng.permutation(idx)[:n_q]] = True
    return mask


def write_random_fold(adata, fold_dir: Path, args) -> dict:
    mask = random_query_mask(adata, args.query_fraction, args.min_type_cells, args.seed)
    ref = adata[~mask].copy()
    # --batch-key donor only where the reference holds 2+ donors
    variants = list(VARIANTS) if ref.obs[DONOR].astype(str).nunique() > 1 else ["cc_nobatch"]
    return write_parts(ref, adata[mask].copy(), fold_dir, variants=variants)


def harmonise(adata):
    """Cross-study: types lower-cased and stripped; gene symbols upper-cased, duplicates after it dropped."""
    import pandas as pd

    adata.obs[LABEL] = adata.obs[LABEL].astype(str).str.strip().str.lower()
    upper = pd.Index(adata.var_names.astype(str).str.upper())
    keep = ~upper.duplicated(keep=False)
    adata = adata[:, keep].copy()
    adata.var_names = upper[keep]
    return adata, int((~keep).sum())


def write_cross_fold(ref, query, fold_dir: Path) -> dict:
    """Cross-study fold: both sets harmonised and restricted to the genes they share (reference order)."""
    ref, ref_dropped = harmonise(ref)
    query, query_dropped = harmonise(query)
    query_genes = set(query.var_names)
    shared = [g for g in ref.var_names if g in query_genes]
    fold = write_parts(ref[:, shared].copy(), query[:, shared].copy(), fold_dir, cross=True, variants=["cc_batchkey"])
    # annotate --case-insensitive only where the written names still differ in case (not after the upper-casing)
    fold["case_differs"] = list(ref[:, shared].var_names) != list(query[:, shared].var_names)
    fold["genes"] = {"reference": int(ref.n_vars), "query": int(query.n_vars), "shared": len(shared),
                     "dropped_as_case_duplicates": {"reference": ref_dropped, "query": query_dropped}}
    return fold


def write_parts(ref, query, fold_dir: Path, cross: bool = False, variants: list[str] | None = None) -> dict:
    """Write reference.h5ad / query.h5ad (unless there) and describe the fold. Scored: query cells of
    reference types (cross-study: of the types both hold, the macro F1's labels)."""
    ref_path, query_path = fold_dir / "reference.h5ad", fold_dir / "query.h5ad"
    if not ref_path.exists() or not query_path.exists():
        fold_dir.mkdir(parents=True, exist_ok=True)
        ref.write_h5ad(ref_path)
        query.write_h5ad(query_path)
    ref_types = sorted(ref.obs[LABEL].astype(str).unique())
    q_types = query.obs[LABEL].astype(str)
    score_types = sorted(set(ref_types) & set(q_types)) if cross else ref_types
    absent = q_types[~q_types.isin(score_types)]
    ref_donors = sorted(ref.obs[DONOR].astype(str).unique())
    if variants is None:  # leave-one-donor-out: both, always (one reference donor: --batch-key falls back)
        variants = list(VARIANTS)
    return {"reference": ref_path, "query": query_path, "ref_types": ref_types, "score_types": score_types,
            "ref_donors": ref_donors, "n_ref": ref.n_obs, "n_query": query.n_obs,
            "n_excluded": int(absent.size),
            "excluded": {str(k): int(v) for k, v in absent.value_counts().items() if v > 0},
            "truth": q_types, "ref": ref, "query_adata": query, "variants": variants, "cross": cross,
            "ref_only_types": sorted(set(ref_types) - set(q_types))}


def write_split(fold: dict, split_dir: Path, val_cells: int) -> None:
    """A peers.py split folder: train = reference, val = a few reference cells, test = scored query cells."""
    import numpy as np

    if (split_dir / "split.json").exists():
        return
    split_dir.mkdir(parents=True, exist_ok=True)
    ref, query = fold["ref"], fold["query_adata"]
    rng = np.random.default_rng(0)
    val_idx = np.sort(rng.choice(ref.n_obs, size=min(val_cells, ref.n_obs), replace=False))
    ref.write_h5ad(split_dir / "train.h5ad")
    ref[val_idx].copy().write_h5ad(split_dir / "val.h5ad")
    query[query.obs[LABEL].isin(fold["score_types"]).values].copy().write_h5ad(split_dir / "test.h5ad")
    (split_dir / "split.json").write_text(json.dumps({
        "classes": fold["ref_types"], "setting": "heldout-user-path", "seed": 0,
        "note": "train = every reference cell; val = a random subset of train (information only); "
                "test = query cells of the scored types (reference types; cross-study: types both hold)"},
        indent=1) + "\n")


# ------------------------------------------------------------------ methods


def fit_env(out_dir: Path) -> dict:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env



def cached_step(folder: Path, force: bool) -> tuple[Path, dict | None]:
    """A step's ``result.json`` and what it holds when finished (None with ``--force``)."""
    done = folder / "result.json"
    return done, (None if force else load_json(done))

def run_cellcontrast(variant: str, fold: dict, fold_dir: Path, tag: str, args) -> dict:
    import pandas as pd

    vdir = fold_dir / variant
    done, res = cached_step(vdir, args.force)
    if res:
        return res
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    out_dir = Path(args.out_dir).resolve()
    onnx = vdir / "annotator.onnx"
    cmd = [args.cellcontrast, "fit", "--reference", str(fold["reference"]), "--out", str(onnx),
           "--experiment", f"{args.split}-{tag}-{variant}", "--no-register", *VARIANTS[variant]]
    if fold["cross"]:  # restricts the reference to the query's genes
        cmd += ["--query", str(fold["query"])]
    rc, fit_s, text = run_cmd(cmd, vdir / "fit.log", out_dir, env=fit_env(out_dir))
    if rc != 0:
        return {"error": f"fit rc {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}", "fit_seconds": fit_s}
    m = re.search(r"^chose (\S+) \((.*?)\) in", text, re.M)
    notes = [ln.strip() for ln in text.splitlines() if ln.lower().startswith(("note", "warning"))]
    cmd = [args.cellcontrast, "annotate", str(onnx), str(fold["query"]), "--out", str(vdir / "annotated.h5ad"),
           "--csv", str(vdir / "annotated.csv")]
    if fold["cross"] and fold.get("case_differs"):
        cmd.append("--case-insensitive")
    rc, ann_s, text2 = run_cmd(cmd, vdir / "annotate.log", out_dir, env=fit_env(out_dir))
    if rc != 0:
        return {"error": f"annotate rc {rc}: {text2.strip().splitlines()[-1]}", "fit_seconds": fit_s}
    pred = pd.read_csv(vdir / "annotated.csv", index_col=0)["cellcontrast_label"].astype(str)
    res = {"chain": m.group(1) if m else None, "selection": m.group(2) if m else None, "notes": notes,
           "case_insensitive": "--case-insensitive" in cmd,
           "fit_seconds": fit_s, "annotate_seconds": ann_s, "pred": pred.to_dict()}
    save_json(done, res)
    return res


def run_peers(fold: dict, fold_dir: Path, args) -> dict:
    import pandas as pd

    pdir = fold_dir / "peers"
    done, res = cached_step(pdir, args.force)
    if res:
        return res
    write_split(fold, pdir / "split", args.val_cells)
    cmd = [args.bench_python, str(ROOT / "bench/peers.py"), "--split-dir", str(pdir / "split"),
           "--methods", args.peers, "--out", str(pdir / "peers.json"), "--predictions", str(pdir / "predictions.csv")]
    rc, sec, text = run_cmd(cmd, pdir / "peers.log", pdir)
    info = load_json(pdir / "peers.json") or {}
    res = {"rc": rc, "seconds": sec, "errors": info.get("errors", {}), "methods": {}}
    if (pdir / "predictions.csv").exists():
        preds = pd.read_csv(pdir / "predictions.csv", index_col="cell")
        for name, row in info.get("methods", {}).items():
            res["methods"][name] = {"train_seconds": row["train_seconds"], "predict_seconds": row["predict_seconds"],
                                    "notes": row.get("notes", {}), "pred": preds[name].astype(str).to_dict()}
    if rc != 0 and not res["methods"]:
        res["errors"]["peers.py"] = f"rc {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"
    save_json(done, res)
    return res


def run_scanvi(fold: dict, fold_dir: Path, args) -> dict:
    import pandas as pd

    sdir = fold_dir / "scanvi"
    done, res = cached_step(sdir, args.force)
    if res:
        return res
    sdir.mkdir(parents=True, exist_ok=True)
    cmd = [args.bench_python, str(Path(__file__).resolve()), "--scanvi-worker",
           "--reference", str(fold["reference"]), "--query", str(fold["query"]), "--pred-out", str(sdir / "pred.csv"),
           "--scvi-epochs", str(args.scvi_epochs), "--scanvi-epochs", str(args.scanvi_epochs),
           "--query-epochs", str(args.query_epochs)]
    rc, sec, text = run_cmd(cmd, sdir / "scanvi.log", sdir, timeout=args.scanvi_timeout)
    if rc == 124:
        res = {"error": f"stopped after {sec:.0f} s (cap {args.scanvi_timeout:.0f} s)", "seconds": sec}
    elif rc != 0 or not (sdir / "pred.csv").exists():
        last = [ln for ln in text.strip().splitlines() if ln.strip()]
        res = {"error": f"rc {rc}: {last[-1] if last else ''}", "seconds": sec}
    else:
        pred = pd.read_csv(sdir / "pred.csv", index_col=0)
        times = json.loads((sdir / "pred.csv.json").read_text())
        res = {"seconds": sec, **times, "pred": pred["pred"].astype(str).to_dict()}
    save_json(done, res)
    return res


def scanvi_worker(args) -> int:
    """Inside .venv-bench: scVI -> scANVI on the reference, query mapping, predictions CSV."""
    import anndata as ad
    import scanpy as sc
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    t = {}

    def stage(msg: str) -> None:  # the log shows where a stopped run was
        print(f"[scanvi-worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    ref, query = ad.read_h5ad(args.reference), ad.read_h5ad(args.query)
    ref.layers["counts"] = ref.X.copy()
    query.layers["counts"] = query.X.copy()
    multi = ref.obs[DONOR].nunique() > 1
    t0 = time.perf_counter()
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=2000, layer="counts",
                                batch_key=DONOR if multi else None, subset=True)
    # the scArches settings of scvi-tools' reference-mapping tutorial
    scvi.model.SCVI.setup_anndata(ref, layer="counts", batch_key=DONOR)
    vae = scvi.model.SCVI(ref, n_layers=2, encode_covariates=True, deeply_inject_covariates=False,
                          use_layer_norm="both", use_batch_norm="none")
    vae.train(max_epochs=args.scvi_epochs, accelerator="cpu", enable_progress_bar=False)
    t["scvi_seconds"] = time.perf_counter() - t0
    stage(f"scVI on {ref.n_obs} reference cells: {t['scvi_seconds']:.0f} s (with HVGs)")
    t0 = time.perf_counter()
    lab = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown", labels_key=LABEL)
    lab.train(max_epochs=args.scanvi_epochs, n_samples_per_label=100, accelerator="cpu", enable_progress_bar=False)
    t["scanvi_seconds"] = time.perf_counter() - t0
    stage(f"scANVI: {t['scanvi_seconds']:.0f} s; query mapping of {query.n_obs} cells")
    t0 = time.perf_counter()
    query.obs[LABEL] = lab.unlabeled_category_
    query = scvi.model.SCANVI.prepare_query_anndata(query, lab, inplace=False)
    qmodel = scvi.model.SCANVI.load_query_data(query, lab)
    qmodel.train(max_epochs=args.query_epochs, plan_kwargs={"weight_decay": 0.0}, check_val_every_n_epoch=10,
                 accelerator="cpu", enable_progress_bar=False)
    pred = qmodel.predict()
    t["query_seconds"] = time.perf_counter() - t0
    stage(f"query training and predict: {t['query_seconds']:.0f} s")
    import pandas as pd

    pd.DataFrame({"pred": pred}, index=query.obs_names).to_csv(args.pred_out)
    t.update(scvi_version=scvi.__version__, torch_version=torch.__version__, hvg=int(ref.n_vars),
             scvi_epochs=args.scvi_epochs, scanvi_epochs=args.scanvi_epochs, query_epochs=args.query_epochs)
    Path(args.pred_out + ".json").write_text(json.dumps(t) + "\n")
    return 0


# ------------------------------------------------------------------ driver


def score_rows(dataset: str, fold: dict, donor: str, results: dict) -> list[dict]:
    truth = fold["truth"]
    keep = truth.isin(fold["score_types"])
    scored = truth[keep]
    base = {"dataset": dataset, "heldout_donor": donor, "reference_donors": "+".join(fold["ref_donors"]),
            "n_reference": fold["n_ref"], "n_query": fold["n_query"], "n_scored": int(keep.sum()),
            "n_excluded": fold["n_excluded"],
            "excluded_types": ";".join(f"{k}:{v}" for k, v in sorted(fold["excluded"].items()))}
    rows = []
    for method, res in results.items():
        row = dict(base, method=method, macro_f1=None, accuracy=None, chain=res.get("chain"),
                   train_seconds=res.get("train_seconds"), predict_seconds=res.get("predict_seconds"),
                   note=res.get("note", ""))
        if res.get("pred") is not None:
            pred = [res["pred"].get(str(c), "<missing>") for c in scored.index]
            row["macro_f1"] = round(macro_f1(scored.tolist(), pred, fold["score_types"]), 4)
            row["accuracy"] = round(sum(p == t for p, t in zip(pred, scored, strict=True)) / len(pred), 4)
        rows.append(row)
    return rows


def fold_methods(fold: dict, fold_dir: Path, tag: str, args) -> dict:
    out = {}
    for variant in fold["variants"]:
        log(f"{tag}: cellcontrast fit {'--batch-key donor' if VARIANTS[variant] else '(no --batch-key)'}")
        r = run_cellcontrast(variant, fold, fold_dir, tag, args)
        note = "; ".join(r.get("notes", [])) if "error" not in r else r["error"]
        out[variant] = {"pred": r.get("pred"), "chain": r.get("chain"), "train_seconds": r.get("fit_seconds"),
                        "predict_seconds": r.get("annotate_seconds"), "note": note}
        log(f"{tag}: {variant}: chose {r.get('chain')} ({r.get('selection')}), fit {r.get('fit_seconds', 0):.0f} s"
            + (f" ERROR {r['error']}" if "error" in r else ""))
    log(f"{tag}: peers {args.peers}")
    p = run_peers(fold, fold_dir, args)
    for name in args.peers.split(","):
        if name in p["methods"]:
            m = p["methods"][name]
            note = "; ".join(f"{k}={v}" for k, v in m["notes"].items())
            out[name] = {"pred": m["pred"], "train_seconds": m["train_seconds"],
                         "predict_seconds": m["predict_seconds"], "note": note}
        else:
            out[name] = {"pred": None, "note": p["errors"].get(name) or p["errors"].get("peers.py", "missing")}
    log(f"{tag}: peers done in {p['seconds']:.0f} s" + (f" errors {p['errors']}" if p["errors"] else ""))
    if not args.no_scanvi:
        log(f"{tag}: scANVI (scVI {args.scvi_epochs} / scANVI {args.scanvi_epochs} / query {args.query_epochs} epochs)")
        s = run_scanvi(fold, fold_dir, args)
        if "error" in s:
            out["scanvi"] = {"pred": None, "note": s["error"], "train_seconds": s.get("seconds")}
        else:
            out["scanvi"] = {"pred": s["pred"], "train_seconds": s["scvi_seconds"] + s["scanvi_seconds"],
                             "predict_seconds": s["query_seconds"],
                             "note": f"scvi-tools {s['scvi_version']}, {s['hvg']} HVGs, epochs scVI {s['scvi_epochs']} / "
                                     f"scANVI {s['scanvi_epochs']} / query {s['query_epochs']}; "
                                     f"process {s['seconds']:.0f} s"}
        log(f"{tag}: scANVI " + (s["error"] if "error" in s else f"done in {s['seconds']:.0f} s"))
    return out


def markdown(rows: list[dict], caption: str = "the held-out donor's cells of reference types") -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return "(no rows)"
    methods = list(dict.fromkeys(df["method"]))
    lines = []
    for dataset, d in df.groupby("dataset", sort=False):
        folds = list(dict.fromkeys(d["heldout_donor"]))
        lines += [f"**{dataset}** (macro F1 on {caption})", "",
                  "| method | " + " | ".join(folds) + " | mean |", "|---" * (len(folds) + 2) + "|"]
        for m in methods:
            dm = d[d["method"] == m].set_index("heldout_donor")
            if dm.empty:
                continue
            cells = []
            for f in folds:
                v = dm["macro_f1"].get(f) if f in dm.index else None
                cells.append("failed" if v is None or pd.isna(v) else f"{v:.3f}")
            vals = dm["macro_f1"].dropna()
            mean = f"{vals.mean():.3f}" if len(vals) == len(folds) else (
                f"{vals.mean():.3f} ({len(vals)}/{len(folds)})" if len(vals) else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
        cc = d[d["method"].str.startswith("cc_")]
        if not cc.empty:
            lines += [f"cellcontrast on {dataset}: chosen chain, fit and annotate wall seconds", "",
                      "| fold | variant | chain | fit s | annotate s |", "|---|---|---|---|---|"]
            for _, r in cc.iterrows():
                fit = "-" if pd.isna(r["train_seconds"]) else f"{r['train_seconds']:.0f}"
                ann = "-" if pd.isna(r["predict_seconds"]) else f"{r['predict_seconds']:.1f}"
                lines.append(f"| {r['heldout_donor']} | {r['method']} | {r['chain']} | {fit} | {ann} |")
            lines.append("")
    return "\n".join(lines)


def main(args) -> int:

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([str(Path(args.cellcontrast).with_name("python")), "-c",
                            "import cellcontrast; print(cellcontrast.__file__)"], capture_output=True, text=True)
    log(f"cellcontrast from {probe.stdout.strip() or probe.stderr.strip()}; threads "
        + ", ".join(f"{v}={os.environ.get(v)}" for v in THREAD_VARS))
    rows: list[dict] = []
    csv = Path(args.csv)
    if args.split == "random":
        rows = run_random(args, out_dir, csv)
    elif args.split == "cross-study":
        rows = run_cross(args, out_dir, csv)
    else:
        rows = run_donor(args, out_dir, csv)
    caption = {"donor": "the held-out donor's cells of reference types",
               "random": "the 20% query cells (seed 0, stratified per type)",
               "cross-study": "the query set's cells of the types both sets hold"}[args.split]
    table = markdown(rows, caption)
    print(table)
    (csv.with_suffix(f".{args.split}.table.md" if args.split != "donor" else ".table.md")).write_text(table + "\n")
    log(f"wrote {csv}")
    return 0


def save_rows(rows: list[dict], csv: Path, args) -> None:
    """Write the CSV; with --append, the rows of datasets this run did not write are kept (before ours)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if args.append and csv.exists() and not df.empty:
        old = pd.read_csv(csv)
        old = old[~old["dataset"].isin(set(df["dataset"]))]
        df = pd.concat([old, df], ignore_index=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False)


def run_fold(dataset: str, fold_name: str, fold: dict, fold_dir: Path, tag: str, args) -> list[dict]:
    """Every method on one written fold; its scored rows. fold.json records the wall time once."""
    t0 = time.perf_counter()
    log(f"{tag}: reference {fold['n_ref']} cells of {fold['ref_donors']}, query {fold['n_query']} cells, "
        f"{fold['n_excluded']} not scored {fold['excluded']}; variants {fold['variants']}")
    results = fold_methods(fold, fold_dir, tag, args)
    new = score_rows(dataset, fold, fold_name, results)
    for r in new:
        log(f"{tag}: {r['method']:>12} macro F1 {r['macro_f1']}" + (f" chain {r['chain']}" if r["chain"] else "")
            + (f"  [{r['note']}]" if r["macro_f1"] is None else ""))
    seconds = time.perf_counter() - t0
    recorded = None if args.force else load_json(fold_dir / "fold.json")
    if recorded is None:
        save_json(fold_dir / "fold.json", {"seconds": seconds})
    log(f"{tag}: fold done in {seconds:.0f} s" + (f" (computed in {recorded['seconds']:.0f} s)" if recorded else ""))
    return new


def run_random(args, out_dir: Path, csv: Path) -> list[dict]:
    rows: list[dict] = []
    names = [d.strip() for d in (args.datasets or ",".join(RANDOM_DATASETS)).split(",") if d.strip()]
    fold_name = f"random{round(100 * (1 - args.query_fraction))}/{round(100 * args.query_fraction)}-seed{args.seed}"
    for dataset in names:
        adata, path = load_dataset(dataset, args)
        log(f"{dataset}: {path.name}, {adata.n_obs} cells x {adata.n_vars} genes, "
            f"donors {sorted(adata.obs[DONOR].unique())}")
        fold_dir = out_dir / dataset / f"random_q{round(100 * args.query_fraction)}_seed{args.seed}"
        fold = write_random_fold(adata, fold_dir, args)
        rows += run_fold(dataset, fold_name, fold, fold_dir, f"{dataset}-random", args)
        save_rows(rows, csv, args)
    return rows


def run_cross(args, out_dir: Path, csv: Path) -> list[dict]:
    rows: list[dict] = []
    pairs = [tuple(x.strip().split(":")) for x in args.pairs.split(",") if x.strip()]
    short = {n: n.split("_")[1] if n.startswith("baron_") else n for pair in pairs for n in pair}
    dataset = "cross-study " + " / ".join(dict.fromkeys(f"{a}<->{b}" for a, b in
                                                        (tuple(sorted(p)) for p in pairs)))
    for ref_name, query_name in pairs:
        ref, _ = load_dataset(ref_name, args)
        query, _ = load_dataset(query_name, args)
        fold_name = f"{short[ref_name]}->{short[query_name]}"
        tag = f"{short[ref_name]}_to_{short[query_name]}"
        fold_dir = out_dir / "cross_study" / tag
        fold = write_cross_fold(ref, query, fold_dir)
        log(f"{tag}: genes {fold['genes']}; scored types {fold['score_types']}; reference-only "
            f"{fold['ref_only_types']}; query-only {fold['excluded']}")
        save_json(fold_dir / "genes.json", {**fold["genes"], "score_types": fold["score_types"],
                                            "ref_only_types": fold["ref_only_types"], "query_only": fold["excluded"]})
        rows += run_fold(dataset, fold_name, fold, fold_dir, tag, args)
        save_rows(rows, csv, args)
    return rows


def run_donor(args, out_dir: Path, csv: Path) -> list[dict]:
    rows: list[dict] = []
    for dataset in [d.strip() for d in (args.datasets or "human,mouse,atlas").split(",") if d.strip()]:
        adata, path = load_dataset(dataset, args)
        donors = sorted(adata.obs[DONOR].unique())
        log(f"{dataset}: {path.name}, {adata.n_obs} cells x {adata.n_vars} genes, donors {donors}")
        if args.donors:
            wanted = [d.strip() for d in args.donors.split(",") if d.strip()]
            if unknown := sorted(set(wanted) - set(donors)):
                sys.exit(f"error: --donors {unknown} not in {dataset}'s donors {donors}")
            donors = [d for d in donors if d in wanted]
        fold_times: list[float] = []  # each fold's wall time when it was computed (fold.json on reuse)
        for donor in donors:
            elapsed = sum(fold_times)
            if fold_times and elapsed + sum(fold_times) / len(fold_times) > args.cap_minutes * 60:
                log(f"{dataset}: cap of {args.cap_minutes:.0f} min reached after {len(fold_times)} folds "
                    f"({elapsed / 60:.1f} min); folds left: {donors[donors.index(donor):]}")
                break
            fold_dir = out_dir / dataset / f"heldout_{donor}"
            fold = write_fold(adata, donor, fold_dir)
            rows += run_fold(dataset, donor, fold, fold_dir, f"{dataset}-{donor}", args)
            save_rows(rows, csv, args)
            fold_times.append(load_json(fold_dir / "fold.json")["seconds"])
    return rows


if __name__ == "__main__":
    ARGS = parse()
    sys.exit(scanvi_worker(ARGS) if ARGS.scanvi_worker else main(ARGS))

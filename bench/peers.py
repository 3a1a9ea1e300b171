"""Train the peer annotators on one split's TRAIN cells and score them on its TEST cells.

Runs inside the peers' environment (``make bench-venv``: celltypist 1.7.1 needs scikit-learn
< 1.8, the project needs 1.9):

    .venv-bench/bin/python bench/peers.py --split-dir D [--methods celltypist,svm,logreg,knn] --out D/peers.json \
        [--predictions D/test_predictions.csv]

D is a folder written by ``cellcontrast split`` (train/val/test.h5ad with raw counts and
``obs['cell_type']``, split.json with the class order). Peers, each fit on train only, each with
its own fixed, published defaults (no selection on val, no tuning):

- ``celltypist``: ``celltypist.train`` with its defaults (logistic regression, one-vs-rest,
  L2, C=1; it standardises genes itself) on log1p of counts normalised to 10,000 per cell,
  the input format it checks for; ``celltypist.annotate(..., mode='best match',
  majority_voting=False)``. Top-3 ranks its probability matrix.
- ``svm``: ``CalibratedClassifierCV(LinearSVC(), cv=min(3, smallest train class))`` on the
  same log1p-normalised counts, the best method of Abdelaal et al. (2019). With a class of
  a single training cell calibration is impossible: a plain LinearSVC, ranked by its
  decision function (noted in the JSON).
- ``logreg``: ``LogisticRegression(max_iter=1000)`` (scikit-learn's defaults otherwise: L2,
  C=1, lbfgs, multinomial) on the same log1p-normalised counts, without gene scaling; not run
  unless asked for (``--methods``).
- ``knn``: k=15 nearest neighbours (Euclidean) on principal components, the way scanpy
  prepares them: log1p-normalised counts, each gene zero-centred and scaled to unit variance
  (train mean/sd), clipped at +-10, PCA with min(50, n_train-1, n_genes-1) components. Scaler
  and PCA are fit on train; test cells are projected.

Per peer the JSON holds top-1, top-3 and macro F1 on test (macro over ALL classes of split.json,
``zero_division=0``) and the same on val (for information only: nothing is selected on it),
train and predict seconds (from raw counts: normalisation is part of both), and the per-class
F1 on test in split.json's class order. ``--predictions CSV`` also writes each peer's label for
every test cell (columns ``cell``, ``cell_type``, then one per peer), for metrics computed
elsewhere. A peer that fails is recorded under ``errors`` and the
others still run; the exit status is then 1.

A split made with ``--unseen-types`` (split.json ``unseen_types``) has test cells of types that
train and val lack: they are scored apart (``unseen``) and the JSON adds, from each peer's top
probability, the AUROC of ``1 - top probability`` for unseen against seen test cells and the
share of each group below 0.5 (CellTypist's default ``p_thres``, cellcontrast's default
``--min-confidence``): ``test_unseen_auroc_max_prob``, ``test_unseen_unassigned``,
``test_seen_unassigned``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _limit_threads(n: int) -> None:
    # Before numpy is imported: BLAS and OpenMP read these once. Timings are single-threaded
    # by default, like the cellcontrast grid (1 torch thread per worker).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-dir", required=True, help="folder with train/val/test.h5ad and split.json")
    p.add_argument("--methods", default="celltypist,svm,knn", help="comma-separated: celltypist, svm, logreg, knn")
    p.add_argument("--out", default=None, help="output JSON (default: SPLIT_DIR/peers.json)")
    p.add_argument("--predictions", default=None, help="also write each peer's test-cell labels to this CSV")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (default: 1)")
    p.add_argument("--knn-k", type=int, default=15)
    p.add_argument("--n-pcs", type=int, default=50)
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
    _limit_threads(ARGS.threads)

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

METHODS = ("celltypist", "svm", "logreg", "knn")
LABEL = "cell_type"


# ------------------------------------------------------------------ data


def split_fingerprint(split_dir: Path) -> str:
    """sha256 of split.json: a peers.json made from another split is stale."""
    return hashlib.sha256((split_dir / "split.json").read_bytes()).hexdigest()


def read_split(split_dir: Path) -> tuple[dict, dict]:
    """split.json and {part: (csr raw counts float32, int codes, genes)} for train/val/test."""
    import anndata as ad

    info = json.loads((split_dir / "split.json").read_text())
    classes = [str(c) for c in info["classes"]]
    unseen = [str(c) for c in info.get("unseen_types") or []]
    parts, genes = {}, None
    for name in ("train", "val", "test"):
        path = split_dir / f"{name}.h5ad"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; rebuild the split with `cellcontrast split`")
        a = ad.read_h5ad(path)
        g = a.var_names.astype(str).tolist()
        if genes is None:
            genes = g
        elif g != genes:
            raise ValueError(f"{path} has other genes than train.h5ad; rebuild the split")
        known = classes + (unseen if name == "test" else [])
        codes = pd.Categorical(a.obs[LABEL].astype(str), categories=known).codes.astype(np.int64)
        if (codes < 0).any():
            raise ValueError(f"{path} has labels outside split.json's classes; rebuild the split")
        X = sp.csr_matrix(a.X, dtype=np.float32)
        new = codes >= len(classes)
        if new.any():  # test cells of the unseen types, scored apart
            parts["unseen"] = {"X": X[new], "y": codes[new] - len(classes), "obs_names": a.obs_names[new].astype(str)}
        parts[name] = {"X": X[~new], "y": codes[~new], "obs_names": a.obs_names[~new].astype(str)}
    info["genes"] = genes
    return info, parts


def log_normalise(X: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per cell (scanpy normalize_total + log1p), float32 CSR.

    Scaled in float64 so that expm1 of each row sums to 1e4 to well within celltypist's check
    (tolerance 1); a cell without counts stays zero.
    """
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    X.data *= np.repeat(scale, np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X.astype(np.float32)


# ------------------------------------------------------------------ metrics


def scores(y: np.ndarray, proba: np.ndarray, n_classes: int, pred: np.ndarray | None = None) -> dict:
    """top-1, top-3 (top-min(3, C)), macro F1 over all C classes, per-class F1 list."""
    from sklearn.metrics import f1_score

    pred = proba.argmax(axis=1) if pred is None else pred
    k = min(3, n_classes)
    # ties in proba: the stable argsort keeps the lower class index, like argmax
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    labels = list(range(n_classes))
    return {
        "top1": float(np.mean(pred == y)),
        "top3": float(np.mean((top == y[:, None]).any(axis=1))),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": [float(v) for v in f1_score(y, pred, labels=labels, average=None, zero_division=0)],
    }


def full_proba(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for the classes a model saw, placed at their index among all C classes."""
    out = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    out[:, np.asarray(seen, dtype=int)] = proba
    return out


# ------------------------------------------------------------------ peers
# Each peer: fit(train) -> model, predict(model, part) -> (proba [n, C] in class order, pred codes).
# Both take raw counts: normalisation is timed as part of training and of prediction.


class CellTypist:
    name = "celltypist"

    def __init__(self, info: dict):
        self.genes = np.asarray(info["genes"], dtype=object)
        self.classes = [str(c) for c in info["classes"]]
        self.notes: dict = {}

    def _adata(self, part: dict):
        import anndata as ad

        a = ad.AnnData(X=log_normalise(part["X"]))
        a.var_names = self.genes
        a.obs_names = np.asarray(part["obs_names"], dtype=object)
        return a

    def fit(self, train: dict):
        import celltypist

        a = self._adata(train)
        a.obs[LABEL] = pd.Categorical.from_codes(train["y"], categories=self.classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn: multi_class='ovr' is deprecated
            model = celltypist.train(a, labels=LABEL, n_jobs=1)
        self.notes["n_features"] = int(len(model.classifier.features))
        return model

    def predict(self, model, part: dict):
        import celltypist

        result = celltypist.annotate(self._adata(part), model=model, mode="best match", majority_voting=False)
        prob = result.probability_matrix
        index = {c: i for i, c in enumerate(self.classes)}
        missing = [c for c in prob.columns if str(c) not in index]
        if missing:
            raise ValueError(f"celltypist returned classes outside split.json: {missing[:5]}")
        seen = np.array([index[str(c)] for c in prob.columns])
        proba = full_proba(prob.to_numpy(dtype=np.float64), seen, len(self.classes))
        labels = result.predicted_labels["predicted_labels"].astype(str).to_numpy()
        pred = np.array([index[c] for c in labels])
        return proba, pred


class CalibratedSVM:
    name = "svm"

    def __init__(self, info: dict):
        self.n_classes = len(info["classes"])
        self.notes: dict = {}

    def fit(self, train: dict):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        X = log_normalise(train["X"])
        smallest = int(min(c for c in np.bincount(train["y"]) if c > 0))  # of the classes in train
        cv = min(3, smallest)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if cv >= 2:
                model = CalibratedClassifierCV(LinearSVC(), cv=cv).fit(X, train["y"])
            else:
                model = LinearSVC().fit(X, train["y"])
        self.notes.update(calibrated=cv >= 2, cv=cv if cv >= 2 else None,
                          convergence_warnings=sum(issubclass(w.category, ConvergenceWarning) for w in caught))
        return model

    def predict(self, model, part: dict):
        X = log_normalise(part["X"])
        if hasattr(model, "predict_proba"):
            proba = model.predict_proba(X)
        else:  # uncalibrated: rank by the decision function (softmax only to make it a distribution)
            d = model.decision_function(X)
            d = np.column_stack([-d, d]) if d.ndim == 1 else d
            e = np.exp(d - d.max(axis=1, keepdims=True))
            proba = e / e.sum(axis=1, keepdims=True)
        proba = full_proba(proba, model.classes_, self.n_classes)
        return proba, proba.argmax(axis=1)


class LogReg:
    name = "logreg"

    def __init__(self, info: dict):
        self.n_classes = len(info["classes"])
        self.notes: dict = {}

    def fit(self, train: dict):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(max_iter=1000).fit(log_normalise(train["X"]), train["y"])
        self.notes["convergence_warnings"] = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        return model

    def predict(self, model, part: dict):
        proba = full_proba(model.predict_proba(log_normalise(part["X"])), model.classes_, self.n_classes)
        return proba, proba.argmax(axis=1)


class PcaKnn:
    name = "knn"

    def __init__(self, info: dict, k: int = 15, n_pcs: int = 50):
        self.n_classes = len(info["classes"])
        self.k, self.n_pcs = k, n_pcs
        self.notes: dict = {}

    @staticmethod
    def _scale(X: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
        Z = (X - mean) / sd
        return np.clip(Z, -10, 10, out=Z)  # sc.pp.scale(max_value=10)

    def fit(self, train: dict):
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier

        X = log_normalise(train["X"]).toarray().astype(np.float64)
        mean = X.mean(axis=0)
        sd = X.std(axis=0, ddof=1) if X.shape[0] > 1 else np.ones(X.shape[1])
        sd[sd == 0] = 1.0  # scanpy leaves constant genes at zero
        Z = self._scale(X, mean, sd)
        n_comps = int(min(self.n_pcs, X.shape[0] - 1, X.shape[1] - 1))
        if n_comps < 1:
            raise ValueError(f"too few cells/genes for PCA: {X.shape}")
        solver = "arpack" if n_comps < min(X.shape) else "full"  # scanpy's default on dense data
        pca = PCA(n_components=n_comps, svd_solver=solver, random_state=0).fit(Z)
        k = min(self.k, X.shape[0])
        knn = KNeighborsClassifier(n_neighbors=k).fit(pca.transform(Z), train["y"])
        self.notes.update(n_pcs=n_comps, k=k)
        return {"mean": mean, "sd": sd, "pca": pca, "knn": knn}

    def predict(self, model, part: dict):
        X = log_normalise(part["X"]).toarray().astype(np.float64)
        pcs = model["pca"].transform(self._scale(X, model["mean"], model["sd"]))
        proba = full_proba(model["knn"].predict_proba(pcs), model["knn"].classes_, self.n_classes)
        return proba, proba.argmax(axis=1)


def make_peer(name: str, info: dict, args):
    if name == "celltypist":
        return CellTypist(info)
    if name == "svm":
        return CalibratedSVM(info)
    if name == "logreg":
        return LogReg(info)
    if name == "knn":
        return PcaKnn(info, k=args.knn_k, n_pcs=args.n_pcs)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(METHODS)}")


def run_peer(peer, parts: dict, n_classes: int) -> dict:
    t0 = time.perf_counter()
    model = peer.fit(parts["train"])
    train_seconds = time.perf_counter() - t0
    out: dict = {"train_seconds": train_seconds}
    for part in ("val", "test"):
        t0 = time.perf_counter()
        proba, pred = peer.predict(model, parts[part])
        seconds = time.perf_counter() - t0
        s = scores(parts[part]["y"], proba, n_classes, pred)
        out.update({f"{part}_top1": s["top1"], f"{part}_top3": s["top3"], f"{part}_macro_f1": s["macro_f1"]})
        if part == "test":
            out["test_pred"] = pred
            out["predict_seconds"] = seconds
            out["per_class_f1"] = s["per_class_f1"]
            if not np.array_equal(pred, proba.argmax(axis=1)):
                # celltypist: best match = argmax of decision scores = argmax of expit(scores);
                # only exact ties can differ.
                out["argmax_disagreements"] = int((pred != proba.argmax(axis=1)).sum())
    if "unseen" in parts:
        out.update(open_set(peer, model, parts))
    out["notes"] = peer.notes
    return out


def open_set(peer, model, parts: dict, threshold: float = 0.5) -> dict:
    """How well the peer's top probability flags test cells of types it never trained on."""
    from sklearn.metrics import roc_auc_score

    seen = peer.predict(model, parts["test"])[0].max(axis=1)
    unseen = peer.predict(model, parts["unseen"])[0].max(axis=1)
    truth = np.r_[np.zeros(seen.size), np.ones(unseen.size)]
    return {"test_unseen_auroc_max_prob": float(roc_auc_score(truth, np.r_[1 - seen, 1 - unseen])),
            "test_unseen_unassigned": float((unseen < threshold).mean()),
            "test_seen_unassigned": float((seen < threshold).mean())}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("celltypist", "scikit-learn", "scanpy", "anndata", "numpy"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


def main(args) -> int:
    split_dir = Path(args.split_dir)
    out = Path(args.out) if args.out else split_dir / "peers.json"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    logging.getLogger("celltypist").setLevel(logging.WARNING)
    logging.getLogger("celltypist.logger").setLevel(logging.WARNING)

    info, parts = read_split(split_dir)
    classes = [str(c) for c in info["classes"]]
    result = {
        "split_dir": str(split_dir), "split_sha256": split_fingerprint(split_dir),
        "setting": info.get("setting"), "seed": info.get("seed"), "classes": classes,
        "n_per_type_by_class": info.get("n_per_type_by_class"),
        "test_support": np.bincount(parts["test"]["y"], minlength=len(classes)).tolist(),
        "train_support": np.bincount(parts["train"]["y"], minlength=len(classes)).tolist(),
        "n_cells": {k: int(v["X"].shape[0]) for k, v in parts.items()}, "n_genes": len(info["genes"]),
        "threads": args.threads, "versions": versions(), "methods": {}, "errors": {},
    }
    predictions = pd.DataFrame({"cell": parts["test"]["obs_names"],
                                LABEL: [classes[i] for i in parts["test"]["y"]]})
    for name in methods:
        try:
            row = run_peer(make_peer(name, info, args), parts, len(classes))
            predictions[name] = [classes[i] for i in row.pop("test_pred")]
        except Exception as err:  # noqa: BLE001 - one failing peer must not hide the others
            result["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            print(f"{name}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
            continue
        result["methods"][name] = row
        print(f"{info.get('setting')} seed {info.get('seed')} {name:>10}: test top-1 {row['test_top1']:.3f} "
              f"top-3 {row['test_top3']:.3f} macro F1 {row['test_macro_f1']:.3f}  "
              f"train {row['train_seconds']:.1f} s  predict {row['predict_seconds']:.2f} s", flush=True)
    if args.predictions:
        pred_path = Path(args.predictions)
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pred_path.with_name(f".{pred_path.name}.part.{os.getpid()}")
        predictions.to_csv(tmp, index=False)
        os.replace(tmp, pred_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part.{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))

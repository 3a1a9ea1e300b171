"""A tiny annotator built with onnx.helper (no torch): probabilities = softmax(log1p(1e4 *
counts / total) @ W + b), with a numpy twin as reference, and writers of query files.
Shared by the annotation tests and the bad-input tests."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import onnx
import pandas as pd
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper

N_CLASSES = 4
MODEL_GENES = [f"Gene{i}" for i in range(30)]
CLASSES = ["B cell", "T cell", "NK cell", "Monocyte"]
COLS = [
    "cellcontrast_label", "cellcontrast_confidence", "cellcontrast_raw_label",
    "cellcontrast_top1", "cellcontrast_top2", "cellcontrast_top3",
    "cellcontrast_top1_prob", "cellcontrast_top2_prob", "cellcontrast_top3_prob",
]


def _weights():
    rng = np.random.default_rng(42)
    w = rng.normal(0, 0.6, size=(len(MODEL_GENES), N_CLASSES)).astype(np.float32)
    b = rng.normal(0, 0.1, size=N_CLASSES).astype(np.float32)
    return w, b


def reference_proba(counts: np.ndarray) -> np.ndarray:
    """The numpy twin of the ONNX graph (counts in the model's gene order)."""
    w, b = _weights()
    counts = counts.astype(np.float64)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1.0) * 1e4)
    logits = x @ w + b
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def build_model(path, metadata: bool = True, metrics: dict | None = None):
    w, b = _weights()
    g = len(MODEL_GENES)
    nodes = [
        helper.make_node("ReduceSum", ["counts", "axes"], ["total"], keepdims=1),
        helper.make_node("Max", ["total", "one"], ["safe_total"]),
        helper.make_node("Div", ["counts", "safe_total"], ["frac"]),
        helper.make_node("Mul", ["frac", "target"], ["norm"]),
        helper.make_node("Add", ["norm", "one"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["logged"]),
        helper.make_node("MatMul", ["logged", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(1e4, dtype=np.float32), "target"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "b"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("counts", TensorProto.FLOAT, ["batch", g])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", N_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, {
            "genes": json.dumps(MODEL_GENES), "classes": json.dumps(CLASSES),
            "preprocessing": "log1p(1e4 * x / total)", "base": "lr", "component": "none",
            "run_id": "r1", "metrics": json.dumps(metrics or {"val_macro_f1": 0.9}), "input_name": "counts",
        })
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def make_counts(n_cells: int, n_genes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.6, 2.0, size=(n_cells, n_genes)) * rng.uniform(0.3, 3.0, size=(n_cells, 1))
    return rng.poisson(rates).astype(np.float32)


def write_query(path, counts, genes, sparse=True, obs=None, compression=None, **layers):
    obs = obs if obs is not None else pd.DataFrame(
        {"batch": pd.Categorical(["a", "b"] * (counts.shape[0] // 2) + ["a"] * (counts.shape[0] % 2))},
        index=[f"cell{i}" for i in range(counts.shape[0])],
    )
    x = sp.csr_matrix(counts) if sparse else counts
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(genes)))
    for name, value in layers.items():
        adata.layers[name] = value
    adata.write_h5ad(path, compression=compression)
    return path

"""Export a trained chain to ONE self-contained ONNX file, checked against torch.

The file holds the whole chain `preprocess -> encoder -> component -> head -> softmax` as one
graph with input ``counts`` (float32 ``[batch, n_genes]``, raw counts in the model's gene
order, dynamic batch axis) and output ``probabilities`` (``[batch, n_classes]``), plus
``energy`` (``[batch]``, ``-T logsumexp(logits / T)``), ``expression`` (``[batch]``, the
largest deviance of an over-expressed gene against the predicted class: ``nn.novelty``) and
``embedding`` when the chain exposes them (a head, a temperature, an ``embed(counts)`` method,
a ``novelty`` module). Every tensor is
embedded in the file: there is never an external-data side file. ``metadata_props`` carry
what `cellcontrast annotate` needs without torch: the gene list, the class names, the
preprocessing, the source run id and its metrics (see `METADATA_KEYS`).

Where the chain comes from (a folder, an MLflow run) is ``experiments.registry``'s business.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from cellcontrast.annotation.genes import identifier_kind
from cellcontrast.core.errors import InputError, first_line
from cellcontrast.core.files import atomic_path
from cellcontrast.core.version import __version__

INPUT_NAME = "counts"


PROBABILITIES = "probabilities"
# -T logsumexp(logits / T) per cell, for `annotate --flag-unseen` (train/open_set.py)
ENERGY = "energy"


# the largest NB deviance of a gene above the predicted class's profile (nn/novelty.py)
EXPRESSION = "expression"


EMBEDDING = "embedding"


# [batch, folds]: the energy under each fold model of grouped validation, read by `annotate
# --flag-unseen` against the energies of the cells each fold held out (annotation.conformal)
FOLD_ENERGY = "fold_energy"


# Keys written into the ONNX file's metadata_props (all values are strings; lists/dicts JSON).
METADATA_KEYS = (
    "genes", "classes", "preprocessing", "base", "component", "run_id", "metrics",
    "cellcontrast_version", "input_name", "output_names", "opset", "gene_identifiers", "gene_weights",
    "conformity", "energy_calibration",
)


def _wrap(chain, with_embedding: bool, with_energy: bool, with_expression: bool = False):
    """A module whose forward returns probabilities, then the energy, the expression score and
    the embedding, each if asked (the expression score only with the energy)."""

    class _Export(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, counts):
            if not (with_embedding or with_energy):
                return self.inner(counts)
            if getattr(self.inner, "members", None) is not None:  # an ensemble: no embedding
                probs = self.inner(counts)
                outputs = [probs, self.inner.energy(counts)]
                if with_expression:
                    outputs.append(self.inner.unexplained_expression(counts, probs))
                if self.inner.n_fold_members:
                    outputs.append(self.inner.fold_energies(counts))
                return tuple(outputs)
            embedding = self.inner.embed(counts)
            if with_energy:  # one pass through the head for the probabilities and the energy
                logits = self.inner.head(embedding)
                scaled = logits / self.inner.temperature
                outputs = [torch.softmax(scaled, dim=-1), -self.inner.temperature * torch.logsumexp(scaled, dim=-1)]
                if with_expression:
                    outputs.append(self.inner.unexplained_expression(counts, logits))
            elif hasattr(self.inner, "classify"):  # one pass through the encoder for both outputs
                outputs = [self.inner.classify(embedding)]
            else:
                outputs = [self.inner(counts)]
            return tuple(outputs + ([embedding] if with_embedding else []))

    return _Export(chain).eval()


def _example_counts(n_genes: int, n_cells: int = 5, seed: int = 0):
    """Poisson counts with varied library sizes (and one all-zero cell) to trace and verify."""

    gen = torch.Generator().manual_seed(seed)
    rate = torch.rand(n_cells, 1, generator=gen) * 3.0 + 0.1
    counts = torch.poisson(rate.expand(n_cells, n_genes).contiguous(), generator=gen)
    counts[-1] = 0.0
    return counts.float()


@contextlib.contextmanager
def _quiet_torch_logs():
    """Silence the exporter's INFO/WARNING chatter (e.g. 'torchvision is not installed')."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torch_to_proto(module, example, output_names: list[str], opset: int):
    """Trace `module` to an onnx ModelProto, dynamo exporter first, TorchScript exporter as fallback."""

    dynamo_error: Exception | None = None
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        return program.model_proto
    except Exception as err:  # noqa: BLE001 - any dynamo failure: try the legacy exporter
        dynamo_error = err
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=output_names,
                opset_version=min(opset, 18),
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
            )
    except Exception as err:
        raise RuntimeError(
            f"ONNX export failed with both exporters: dynamo: {dynamo_error}; torchscript: {err}"
        ) from err
    return onnx.load_model_from_string(buffer.getvalue())


def _metadata(config: dict, output_names: list[str], opset: int) -> dict[str, str]:
    metrics = config.get("metrics") or {}
    clean_metrics = {
        str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))
    }
    return {
        "genes": json.dumps([str(g) for g in config["genes"]]),
        "classes": json.dumps([str(c) for c in config["classes"]]),
        "preprocessing": str(config.get("preprocessing", "")),
        "base": str(config.get("base", "")),
        "component": str(config.get("component", "")),
        "run_id": str(config.get("run_id") or ""),
        "metrics": json.dumps(clean_metrics),
        "cellcontrast_version": __version__,
        "input_name": INPUT_NAME,
        "output_names": json.dumps(output_names),
        "opset": str(opset),
        # "ensembl" or "symbol": what a query's genes are matched against (--gene-key)
        "gene_identifiers": identifier_kind(str(g) for g in config["genes"]),
    } | {key: json.dumps(config[key]) for key in ("gene_weights", "conformity", "energy_calibration")
         if config.get(key)}


def normalize_config(config: dict) -> dict:
    """A copy of `config` with "classes" filled from "class_names" (the chain module's key)."""
    config = dict(config)
    if not config.get("classes") and config.get("class_names"):
        config["classes"] = list(config["class_names"])
    return config


def _check_config(config: dict) -> None:
    for key in ("genes", "classes"):
        values = config.get(key)
        if not isinstance(values, list | tuple) or len(values) == 0:
            raise InputError(f"the chain's config has no {key!r} list; re-save the chain with `cellcontrast train`")
    if len(set(map(str, config["genes"]))) != len(config["genes"]):
        raise InputError("the chain's config lists duplicated gene names; re-save the chain with unique genes")


def _verify(proto, module, output_names: list[str], n_genes: int, atol: float = 1e-4) -> None:
    """Run the exported graph with onnxruntime at batch 1 and 7 and compare with torch."""

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for n in (1, 7):
        counts = _example_counts(n_genes, n_cells=n, seed=n)
        with torch.no_grad():
            expected = module(counts)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(output_names, {INPUT_NAME: counts.numpy()})
        for name, want, have in zip(output_names, expected, got, strict=True):
            want = want.detach().numpy()
            if want.shape != have.shape or not np.allclose(want, have, atol=atol, rtol=1e-4):
                diff = float(np.max(np.abs(want - have))) if want.shape == have.shape else float("nan")
                raise RuntimeError(
                    f"ONNX output {name!r} differs from torch at batch {n} (max abs diff {diff:.3g})"
                )


def export_chain_to_onnx(chain, config: dict, out_path: str | os.PathLike, opset: int = 18) -> Path:
    """Export `chain` (counts [B, G] -> probabilities [B, C]) as one self-contained ONNX file.

    Writes `out_path` atomically and returns it. The graph is checked with
    `onnx.checker.check_model` and run once with onnxruntime against torch before writing.
    """

    config = normalize_config(config)
    _check_config(config)
    n_genes = len(config["genes"])
    n_classes = len(config["classes"])
    chain = chain.eval()

    example = _example_counts(n_genes)
    with torch.no_grad():
        try:
            probs = chain(example)
        except Exception as err:
            raise InputError(
                f"the chain does not accept counts of shape [batch, {n_genes}] (its config lists "
                f"{n_genes} genes): {first_line(err)}"
            ) from err
    if tuple(probs.shape) != (example.shape[0], n_classes):
        raise InputError(
            f"the chain outputs shape {tuple(probs.shape)} but its config lists {n_classes} classes; "
            "re-save the chain with a matching config"
        )

    # The embedding and energy outputs only if the chain exposes them and they trace cleanly.
    has_embed = callable(getattr(chain, "embed", None))
    has_energy = has_embed and isinstance(getattr(chain, "head", None), torch.nn.Module) \
        and torch.is_tensor(getattr(chain, "temperature", None)) or callable(getattr(chain, "energy", None))
    has_expression = has_energy and getattr(chain, "novelty", None) is not None
    candidates = [(e, g, x) for e, g, x in ((True, True, True), (True, True, False), (True, False, False),
                                            (False, True, True), (False, True, False), (False, False, False))
                  if (has_embed or not e) and (has_energy or not g) and (has_expression or not x)]
    proto = module = output_names = None
    last_error: Exception | None = None
    for with_embedding, with_energy, with_expression in candidates:
        output_names = [PROBABILITIES] + ([ENERGY] if with_energy else []) \
            + ([EXPRESSION] if with_expression else []) + ([EMBEDDING] if with_embedding else []) \
            + ([FOLD_ENERGY] if with_energy and getattr(chain, "n_fold_members", 0) else [])
        module = _wrap(chain, with_embedding, with_energy, with_expression)
        try:
            proto = _torch_to_proto(module, example, output_names, opset)
            _verify(proto, module, output_names, n_genes)
            break
        except Exception as err:  # noqa: BLE001 - retry with fewer outputs
            last_error = err
            proto = None
    if proto is None:
        raise RuntimeError(f"ONNX export failed: {last_error}") from last_error

    proto.doc_string = (
        "cellcontrast cell-type annotator: raw counts [batch, genes] in the order of metadata "
        "'genes' -> class probabilities [batch, classes] in the order of metadata 'classes'."
    )
    proto.producer_name = "cellcontrast"
    proto.producer_version = __version__
    del proto.metadata_props[:]
    for key, value in _metadata(config, output_names, opset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        # save_as_external_data=False: every initializer inside the one .onnx file.
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return out_path


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of an exported annotator (JSON values parsed)."""

    model = onnx.load_model(str(path), load_external_data=False)
    meta: dict[str, Any] = {p.key: p.value for p in model.metadata_props}
    for key in ("genes", "classes", "metrics", "output_names", "gene_weights", "conformity", "energy_calibration"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta

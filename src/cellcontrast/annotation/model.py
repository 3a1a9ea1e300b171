"""An exported annotator opened with onnxruntime: its genes, classes and metadata, and
probabilities for counts in its gene order. No torch."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellcontrast.annotation.conformal import energy_p_values
from cellcontrast.core.errors import InputError, first_line


@dataclass
class Annotator:
    """An onnxruntime session over an exported annotator, with its decoded metadata.

    Attributes
    ----------
    genes
        The model's input genes, in the order ``predict_proba`` expects its columns.
    classes
        The cell types, in the order of ``predict_proba``'s columns.
    metadata
        What the export recorded: preprocessing, base, component, run id, validation metrics.
    """

    path: Path
    session: Any
    genes: list[str]
    classes: list[str]
    metadata: dict[str, Any]
    input_name: str
    output_name: str
    energy_name: str | None = None
    expression_name: str | None = None
    fold_energy_name: str | None = None

    @property
    def gene_weights(self) -> np.ndarray | None:
        """Each gene's share of what the model draws from it (sums to 1; `cellcontrast fit`
        records it), or None for annotators exported without it."""
        weights = self.metadata.get("gene_weights")
        if not isinstance(weights, list) or len(weights) != len(self.genes):
            return None
        weights = np.asarray(weights, dtype=np.float64)
        return weights / weights.sum() if weights.sum() > 0 else None

    @property
    def novelty_scores(self) -> list[str]:
        """The novelty outputs the model has: ``energy``, ``expression`` (newer exports)."""
        return [name for name in (self.energy_name, self.expression_name) if name]

    @property
    def cross_fitted(self) -> bool:
        """Whether ``--flag-unseen`` (energy) reads a cell against the fold models of grouped
        validation (`annotation.conformal.energy_p_values`) rather than a threshold."""
        return bool(self.fold_energy_name and self.metadata.get("energy_calibration"))

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 0) -> Annotator:
        """Open an exported annotator (``cellcontrast export``, ``Chain.export``).

        Parameters
        ----------
        path
            The ``.onnx`` file.
        threads
            onnxruntime threads; 0 uses every core.

        Raises
        ------
        InputError
            When the file is missing, not ONNX, or not a cellcontrast annotator.
        """
        return load_model(path, threads=threads)

    def predict_proba(self, counts: np.ndarray) -> np.ndarray:
        """Probabilities [n, n_classes] for counts [n, n_genes] in the model's gene order."""
        counts = np.ascontiguousarray(counts, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: counts})[0]

    def predict(self, counts: np.ndarray, novelty: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, with ``novelty`` (one of `novelty_scores`), each cell's score; on a
        `cross_fitted` annotator the energy comes with its p-value under the fold models (lower:
        less familiar), ``[cells, 2]``."""
        if novelty is None or novelty not in self.novelty_scores:
            return self.predict_proba(counts), None
        counts = np.ascontiguousarray(counts, dtype=np.float32)
        if self.with_p_value(novelty):
            probs, score, folds = self.session.run([self.output_name, novelty, self.fold_energy_name],
                                                   {self.input_name: counts})
            p_values = energy_p_values(folds, self.metadata["energy_calibration"])
            return probs, np.stack([score, p_values], axis=1).astype(np.float32)
        probs, score = self.session.run([self.output_name, novelty], {self.input_name: counts})
        return probs, score

    def with_p_value(self, novelty: str | None) -> bool:
        """Whether `predict` gives ``novelty`` with its p-value (``[cells, 2]``): a `cross_fitted`
        annotator's energy."""
        return novelty is not None and novelty == self.energy_name and self.cross_fitted

    def novelty_width(self, novelty: str | None) -> int:
        """How many numbers `predict` gives per cell for ``novelty``."""
        return 2 if self.with_p_value(novelty) else 1


def load_model(path: str | os.PathLike, threads: int = 0) -> Annotator:
    """Open an exported annotator; every kind of bad file is an `InputError`."""
    import onnxruntime as ort  # here: importing the package stays cheap

    path = Path(path)
    hint = "export one with `cellcontrast export`"
    if not path.exists():
        raise InputError(f"model file {path} does not exist; {hint}")
    if not path.is_file():
        raise InputError(f"model {path} is not a file; pass the .onnx file written by `cellcontrast export`")
    if threads < 0:
        raise InputError(f"--threads {threads} must be 0 (all cores) or a positive number")

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    # The CPU arena keeps buffers for reuse: blocks are at most INFERENCE_ROWS rows, so it
    # stays small, and without it every activation is a fresh malloc (about 5% slower).
    opts.enable_cpu_mem_arena = True
    # Idle pool threads sleep instead of spinning: the reader thread needs the core meanwhile
    # (8.7 s against 9.5 s for 200k cells on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_mem_pattern = True
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise InputError(
            f"{path} is not a readable ONNX model (corrupt, truncated or another format): "
            f"{first_line(err, 200)}; {hint}"
        ) from err

    raw = dict(session.get_modelmeta().custom_metadata_map)
    meta: dict[str, Any] = dict(raw)
    for key in ("genes", "classes"):
        try:
            value = json.loads(raw[key])
        except KeyError:
            raise InputError(
                f"{path} is an ONNX model without cellcontrast metadata ({key!r} missing); "
                f"{hint}"
            ) from None
        except ValueError:
            raise InputError(f"{path} has unreadable {key!r} metadata; {hint}") from None
        if not isinstance(value, list) or not value:
            raise InputError(f"{path} has an empty {key!r} metadata list; {hint}")
        meta[key] = [str(v) for v in value]
    for key in ("metrics", "output_names", "gene_weights", "conformity", "energy_calibration"):
        if key in raw:
            try:
                meta[key] = json.loads(raw[key])
            except ValueError:
                meta[key] = raw[key]

    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"{path} has {len(inputs)} inputs; a cellcontrast annotator has one (counts); {hint}")
    input_name = inputs[0].name
    width = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
    if isinstance(width, int) and width != len(meta["genes"]):
        raise InputError(
            f"{path} takes {width} genes but its metadata lists {len(meta['genes'])}; {hint}"
        )
    outputs = [o.name for o in session.get_outputs()]
    output_name = "probabilities" if "probabilities" in outputs else outputs[0]
    if len(set(meta["genes"])) != len(meta["genes"]):
        raise InputError(f"{path} lists duplicated genes in its metadata; {hint}")
    energy_name = "energy" if "energy" in outputs else None  # exported by this version or later
    expression_name = "expression" if "expression" in outputs else None
    fold_energy_name = "fold_energy" if "fold_energy" in outputs else None
    calibration = meta.get("energy_calibration")
    if calibration is not None and not (isinstance(calibration, dict) and isinstance(calibration.get("folds"), list)
                                        and all(isinstance(f, list) and f for f in calibration["folds"])):
        raise InputError(f"{path} has unreadable 'energy_calibration' metadata (the fold models' held-out energies); "
                         "refit it with `cellcontrast fit`")
    return Annotator(path, session, meta["genes"], meta["classes"], meta, input_name, output_name, energy_name,
                     expression_name, fold_energy_name)

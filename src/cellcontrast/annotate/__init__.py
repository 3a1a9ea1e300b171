"""Annotation with an exported ONNX annotator: torch-free, streamed, from files or AnnData.

Imports only ``core`` and ``data`` of cellcontrast (an import-linter contract in
pyproject.toml), and never torch, mlflow, optuna or scikit-learn.
"""

from cellcontrast.annotate.api import annotate, annotate_file, predict_matrix
from cellcontrast.annotate.model import Annotator, load_model
from cellcontrast.annotate.results import PREFIX, UNASSIGNED

__all__ = ["PREFIX", "UNASSIGNED", "Annotator", "annotate", "annotate_file", "load_model", "predict_matrix"]

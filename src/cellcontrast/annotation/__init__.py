"""Annotation with an exported ONNX annotator: torch-free, streamed, from files or AnnData.

Imports only ``core`` and ``data`` of cellcontrast (an import-linter contract in
pyproject.toml), and never torch, mlflow, optuna or scikit-learn.
"""

from cellcontrast.annotation.api import annotate, annotate_file
from cellcontrast.annotation.model import Annotator, load_model
from cellcontrast.annotation.prediction import predict_matrix
from cellcontrast.annotation.results import PREFIX, UNASSIGNED

__all__ = ["PREFIX", "UNASSIGNED", "Annotator", "annotate", "annotate_file", "load_model", "predict_matrix"]

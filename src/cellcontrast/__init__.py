"""cellcontrast: cell-type annotation of single-cell RNA-seq with supervised contrastive learning.

The Python API, AnnData first with keyword-only options::

    import cellcontrast as cc

    cc.fit_annotator(reference, "cell_type", out="annotator.onnx")  # chains, choice, card
    chain = cc.fit(reference, "cell_type", base="lr")   # or train one chain (torch)
    chain.export("annotator.onnx")                       # one ONNX file
    cc.annotate(query, "annotator.onnx")                 # obs["cellcontrast_label"], ... (no torch)

Names are imported when first used, so that ``import cellcontrast`` loads no torch, and
annotating needs only the light install (``pip install cellcontrast[annotate]``). No
subpackage shares a public name (the annotation code lives in ``cellcontrast.annotation``):
importing a subpackage binds its name here and would hide a function of the same name.
"""

from cellcontrast.core.errors import InputError
from cellcontrast.core.version import __version__

# public name -> the module that defines it
_LAZY = {
    "annotate": "cellcontrast.annotation.api",
    "annotate_file": "cellcontrast.annotation.api",
    "Annotator": "cellcontrast.annotation.model",
    "fit": "cellcontrast.model.fit",
    "fit_annotator": "cellcontrast.experiments.fit_annotator",
    "Chain": "cellcontrast.model.chain",
}

__all__ = ["Annotator", "Chain", "InputError", "__version__", "annotate", "annotate_file", "fit", "fit_annotator"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # next time without this function
        return value
    raise AttributeError(f"module 'cellcontrast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

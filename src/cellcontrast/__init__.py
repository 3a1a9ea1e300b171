"""cellcontrast: cell-type annotation of single-cell RNA-seq with supervised contrastive learning.

The Python API, AnnData first with keyword-only options::

    import cellcontrast as cc

    chain = cc.fit(reference, "cell_type", base="lr")   # train (torch)
    chain.export("annotator.onnx")                       # one ONNX file
    cc.annotate(query, "annotator.onnx")                 # obs["cellcontrast_label"], ... (no torch)

Names are imported when first used, so that ``import cellcontrast`` loads no torch, and
annotating needs only the light install (``pip install cellcontrast[annotate]``).
"""

import sys
import types

from cellcontrast.core.errors import InputError
from cellcontrast.core.version import __version__

# public name -> the module that defines it
_LAZY = {
    "annotate": "cellcontrast.annotate.api",
    "annotate_file": "cellcontrast.annotate.api",
    "Annotator": "cellcontrast.annotate.model",
    "fit": "cellcontrast.model.fit",
    "Chain": "cellcontrast.model.chain",
}

__all__ = ["Annotator", "Chain", "InputError", "__version__", "annotate", "annotate_file", "fit"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # next time without this function
        return value
    raise AttributeError(f"module 'cellcontrast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package, whose public names are not replaced by its subpackages of the same name."""

    def __setattr__(self, name: str, value) -> None:
        # Importing the subpackage cellcontrast.annotate (as `cc.fit` or the CLI do) binds it
        # here under its name, the public function's: `cc.annotate(...)` then called a module.
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""The objects a user holds in Python: `Chain` (load, save, export, predict) and `fit`.

Above ``train`` and ``export``, which it ties together; below ``experiments`` (no MLflow here).
"""

from cellcontrast.model.chain import Chain
from cellcontrast.model.fit import fit

__all__ = ["Chain", "fit"]

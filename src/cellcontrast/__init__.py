"""cellcontrast: cell-type annotation with supervised contrastive learning."""

from cellcontrast.core.version import __version__

__all__ = ["__version__"]

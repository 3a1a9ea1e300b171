"""cellcontrast: cell-type annotation with supervised contrastive learning."""

__version__ = "0.1.0"

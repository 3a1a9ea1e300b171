"""The version of cellcontrast, in one place (no import of anything)."""

__version__ = "0.1.0"

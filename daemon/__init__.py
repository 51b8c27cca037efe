"""Baton: a credential rotation daemon. See DESIGN.md for the picture."""

__version__ = "0.1.0"

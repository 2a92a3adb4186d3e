"""Export errors, in a torch-free module so the CLI can name them on every path."""

from __future__ import annotations


class ExportError(ValueError):
    """Bad export input (arguments, destination); the message is one line."""


class ParityError(RuntimeError):
    """An exported graph does not match PyTorch within tolerance."""

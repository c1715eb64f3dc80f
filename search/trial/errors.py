"""The two ways reading a dataset's files fails, raised by every reader (torch-free, imported by all of them)."""
from __future__ import annotations

__all__ = ["DatasetNotFoundError", "CorruptDatasetError"]


class DatasetNotFoundError(FileNotFoundError):
    """On-disk dataset files are missing; the one-line message says which files, where, and how to get them."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be read; the one-line message names the file."""

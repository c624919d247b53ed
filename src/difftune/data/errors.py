"""Errors of the data pipeline; each names the dataset or file and says how to fix it."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A dataset cannot be used as configured; the message says what to change."""


class UnreadableImage(DataError):
    """An image file could not be opened or decoded; the caller skips it and reports it once."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class SampleRejected(DataError):
    """A readable sample that the dataset's size or aspect rules leave out."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetTooSmall(DataError):
    """The datasets cannot fill one optimizer step with bucket-consistent batches."""

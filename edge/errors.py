"""Exceptions with messages meant for the person at the terminal."""

from __future__ import annotations


class EdgebrainError(Exception):
    """Base class: the CLI prints the message and exits non-zero (no traceback)."""


class ImageLoadError(EdgebrainError):
    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataError(EdgebrainError):
    pass


class ModelError(EdgebrainError):
    pass


class WeightsUnavailableError(ModelError):
    pass


class IntegrityError(EdgebrainError):
    """An artifact whose hash does not match its manifest."""

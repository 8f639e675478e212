"""Typed errors for bad dataset files. Each names the file and the reason."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file that cannot be used.

    Attributes:
        path: the file (local path or filesystem URI) at fault.
        reason: why, in a few words a person can act on.
        stage: the step that found it (``read``, ``decode``, ``label``, ...), for quarantine tables.
    """

    stage = "read"

    def __init__(self, path: str, reason: str, stage: str | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        if stage is not None:
            self.stage = stage

    def __reduce__(self) -> tuple:
        # Rebuilt from its fields: a Ray task's error reaches the driver pickled.
        return type(self), (self.path, self.reason, self.stage)


class MissingFileError(DatasetError):
    """An expected file (e.g. the .mat beside a .jpg) does not exist."""


class CorruptImageError(DatasetError):
    """An image that does not decode, or is truncated."""

    stage = "decode"


class CorruptAnnotationError(DatasetError):
    """A .mat file that cannot be parsed (truncated, not a MAT file)."""


class MissingFieldError(DatasetError):
    """A .mat file without a field the label needs."""


class InvalidValueError(DatasetError):
    """A field with the wrong shape, NaN/inf values, or degenerate geometry."""

    stage = "label"

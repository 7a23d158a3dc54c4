"""The error raised for model files that cannot be used."""

from __future__ import annotations

__all__ = ["ModelFileError"]


class ModelFileError(ValueError):
    """A model file or directory is unreadable, truncated, corrupt or inconsistent.

    The message names the file (or tensor, or config field), says what is wrong and how to
    fix it. A path that does not exist raises :class:`FileNotFoundError` instead.

    Examples:
        >>> from lorajax._src.models.errors import ModelFileError
        >>> issubclass(ModelFileError, ValueError)
        True
    """

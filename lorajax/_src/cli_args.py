"""Argument types shared by ``lorajax finetune`` and ``tpu_scripts/finetune.py``.

Each parses one command-line value and raises ``argparse.ArgumentTypeError`` with the
value and what was expected, so argparse reports it before any work starts.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["changed_settings", "fraction", "non_negative_int", "positive_float", "positive_int"]


def _int(text: str, expected: str, ok) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The settings of ``current`` that ``saved`` holds with another value.

    Each as ``"--flag was X, now Y"``: what a resumed run must not change.
    """
    return [
        f"--{key.replace('_', '-')} was {saved.get(key)!r}, now {value!r}"
        for key, value in current.items()
        if key in saved and saved[key] != value
    ]

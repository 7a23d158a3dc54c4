"""Argument checks shared by the transforms: clear errors, raised before any work."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["check_choice", "check_positive", "is_traced", "static_int"]


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (a value known only inside a transformation)."""
    return isinstance(x, jax.core.Tracer)


def static_int(value: Any, name: str, allow_zero: bool = False) -> int | None:
    """An int from a Python or concrete integer; ``None`` for a traced value."""
    what = "a non-negative int" if allow_zero else "a positive int"
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be {what}, got {value!r}.")
    if is_traced(value):
        return None
    if isinstance(value, float) or (
        hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise TypeError(f"`{name}` must be {what}, got {value!r}.")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be {what}, got {value!r}.") from None
    if out < 0 or (out == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {what}, got {out}.")
    return out


def check_positive(value: Any, name: str) -> None:
    """Raises unless ``value`` is a positive number (tracers pass).

    A schedule (a callable) is refused with the fix: ``optax.inject_hyperparams``
    evaluates schedules and hands the transform plain numbers.
    """
    if is_traced(value):
        return
    if callable(value):
        raise TypeError(
            f"`{name}` must be a positive number, got the callable {value!r}. To schedule "
            f"it, wrap the factory: optax.inject_hyperparams(factory)({name}=schedule, ...)."
        )
    try:
        ok = float(value) > 0
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}.") from None
    if not ok:
        raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def check_choice(value: Any, name: str, options: Sequence[str]) -> None:
    """Raises unless ``value`` is one of ``options``, listing them."""
    if value not in options:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(o) for o in options)}; got {value!r}."
        )

"""Sharding-aware primitives for the core maths.

Under a mesh with ``Explicit`` axes, JAX asks the program to say how the result of a
contraction over a sharded axis is laid out, and refuses QR or SVD on sharded matrix
axes. These helpers make the projection code mesh-agnostic:

- :func:`einsum` derives the output sharding from the operands (each output axis keeps
  the mesh axis its letter has in the inputs; contracted letters become an all-reduce);
- :func:`gather_matrix` replicates the two matrix axes of a skinny array before a
  factorisation (batch axes stay sharded);
- :func:`like` reshards a freshly computed array to the layout of the array it replaces,
  so that both branches of a ``lax.cond`` agree.

With no mesh or with ``Auto`` axes they are plain ``jnp`` calls and XLA decides.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

__all__ = ["einsum", "explicit_spec", "gather_matrix", "like", "normal", "zeros"]

Spec = tuple[Any, ...]


def _explicit_axes(mesh: Any) -> set[str]:
    names = getattr(mesh, "axis_names", ()) or ()
    types = getattr(mesh, "axis_types", ()) or ()
    return {name for name, kind in zip(names, types) if kind == AxisType.Explicit}


def explicit_spec(x: Any) -> Spec | None:
    """Returns ``x``'s partition spec (one entry per axis) when it is explicitly sharded.

    Works on arrays, tracers and ``jax.ShapeDtypeStruct``. Returns ``None`` when no axis
    of ``x`` is sharded over an ``Explicit`` mesh axis.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
    else:
        try:
            sharding = jax.typeof(x).sharding
        except (TypeError, AttributeError):
            return None
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    explicit = _explicit_axes(getattr(sharding, "mesh", None))
    if not explicit:
        return None
    ndim = len(x.shape)
    entries = tuple(spec) + (None,) * (ndim - len(spec))

    def keep(entry: Any) -> Any:
        if entry is None:
            return None
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n in explicit)
        if not kept:
            return None
        return kept if len(kept) > 1 else kept[0]

    entries = tuple(keep(e) for e in entries[:ndim])
    return entries if any(e is not None for e in entries) else None


def _expand(subscripts: str, operands: Sequence[jax.Array]) -> tuple[list[str], str]:
    """Replaces ``...`` by explicit capital letters (all operands share one batch rank)."""
    lhs, out = subscripts.split("->")
    ins = lhs.split(",")
    n_batch = 0
    for sub, op in zip(ins, operands):
        if "..." in sub:
            n_batch = max(n_batch, op.ndim - (len(sub) - 3))
    letters = string.ascii_uppercase[:n_batch]
    ins = [s.replace("...", letters) for s in ins]
    return ins, out.replace("...", letters)


def einsum(subscripts: str, *operands: jax.Array, precision: Any = None) -> jax.Array:
    """``jnp.einsum`` that propagates explicit shardings from operands to the result.

    Each letter takes the first mesh axis that any operand shards it over. An operand
    that leaves such a letter unsharded is sliced to match (no communication); a letter
    that is contracted over a sharded axis becomes an all-reduce of the (small) result.
    """
    specs = [explicit_spec(op) for op in operands]
    if all(s is None for s in specs):
        return jnp.einsum(subscripts, *operands, precision=precision)
    ins, out = _expand(subscripts, operands)
    chosen: dict[str, Any] = {}
    for sub, spec in zip(ins, specs):
        if spec is None:
            continue
        for letter, entry in zip(sub, spec):
            if entry is not None and letter not in chosen:
                chosen[letter] = entry
    fixed = []
    for sub, op, spec in zip(ins, operands, specs):
        want = tuple(chosen.get(letter) for letter in sub)
        have = spec if spec is not None else (None,) * len(sub)
        if have != want and len(set(e for e in want if e is not None)) == sum(
            e is not None for e in want
        ):
            op = jax.sharding.reshard(op, P(*want))
        fixed.append(op)
    used: set[Any] = set()
    out_spec = []
    for letter in out:
        entry = chosen.get(letter)
        if entry is not None and entry in used:
            entry = None
        if entry is not None:
            used.add(entry)
        out_spec.append(entry)
    return jnp.einsum(
        ",".join(ins) + "->" + out, *fixed, precision=precision, out_sharding=P(*out_spec)
    )


def gather_matrix(x: jax.Array) -> jax.Array:
    """Replicates the last two axes of an explicitly sharded ``x`` (batch axes kept).

    Factorisations (QR, SVD) need whole matrices. Use this only on skinny arrays, or
    where gathering is documented (exact SVD).
    """
    spec = explicit_spec(x)
    if spec is None or (spec[-1] is None and spec[-2] is None):
        return x
    return jax.sharding.reshard(x, P(*spec[:-2], None, None))


def like(x: jax.Array, reference: Any) -> jax.Array:
    """Reshards ``x`` to ``reference``'s explicit layout, if it has one."""
    want = explicit_spec(reference)
    have = explicit_spec(x)
    if want == have:
        return x
    if want is None:
        return jax.sharding.reshard(x, P(*((None,) * x.ndim)))
    return jax.sharding.reshard(x, P(*want))


def zeros(shape: Sequence[int], dtype: Any, spec: Spec | None) -> jax.Array:
    """``jnp.zeros`` laid out by ``spec`` when it is an explicit spec."""
    if spec is None:
        return jnp.zeros(shape, dtype)
    return jnp.zeros(shape, dtype, out_sharding=P(*spec))


def normal(key: jax.Array, shape: Sequence[int], dtype: Any, spec: Spec | None) -> jax.Array:
    """Standard normal draws laid out by ``spec`` when it is an explicit spec."""
    if spec is None:
        return jax.random.normal(key, tuple(shape), dtype)
    return jax.random.normal(key, tuple(shape), dtype, out_sharding=P(*spec))

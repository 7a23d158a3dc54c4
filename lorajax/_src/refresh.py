r"""What happens to the inner optimizer's state when the bases change.

The inner optimizer's state holds trees shaped like the projected coordinates (Adam's
``mu`` and ``nu``, a momentum ``trace``, ...). When the basis moves from ``P_old`` to
``P_new`` those coordinates no longer describe the same directions. The policies:

- ``"keep"`` leaves the state as it is, as GaLore does (arXiv:2403.03507). It is cheap
  and the mismatch decays with the moments' horizons.
- ``"rotate"`` maps first-moment-like state exactly, as Flora does (arXiv:2402.03293):
  for a left projection ``M ← P_newᵀ P_old M``; for a right projection
  ``M ← M P_oldᵀ P_new``. A second moment (``nu``) has no exact rotation; with
  ``Q = P_newᵀ P_old`` it is mapped as ``ν ← (Q ∘ Q) ν``, the variance of the mapped
  coordinates if the old ones are independent. That keeps it non-negative, is exact
  for a permutation or sign flip of the basis, and reduces to ``keep``-like behaviour
  when the subspace does not move.
- ``"reset"`` zeroes the coordinate-shaped state of the projected leaves. The inner
  step count is not reset (it is shared with the leaves that are not projected), so
  Adam's bias correction does not undo the zeros: the first steps after a reset are
  damped, which acts as a short warm-up.

Which state is "second-moment-like" is decided by the field name (``nu``, ``nu_max`` and
``sum_of_squares`` by default, the names optax uses); everything else that is shaped
like the coordinates is mapped linearly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorajax._src import shard
from lorajax._src.state import Projector, TwoSidedCoords

__all__ = [
    "ON_REFRESH",
    "basis_maps",
    "dot_t",
    "identity_maps",
    "left_map",
    "map_coordinate_trees",
    "remap_state",
    "right_map",
]

ON_REFRESH = ("keep", "rotate", "reset")


class _Slot:
    """An empty pytree that stands in for the coordinates when probing ``inner.init``."""


jax.tree_util.register_pytree_node(_Slot, lambda s: ((), None), lambda aux, children: _Slot())


def _field_name(path: Sequence[Any]) -> str | None:
    for key in reversed(path):
        if isinstance(key, jax.tree_util.GetAttrKey):
            return key.name
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
    return None


def map_coordinate_trees(
    inner: optax.GradientTransformation,
    inner_state: Any,
    fn: Callable[[str | None, Any], Any],
) -> Any:
    """Applies ``fn(field_name, subtree)`` to every coordinate-shaped tree in the state.

    The trees are found as optax's ``tree_map_params`` finds params-shaped state: by
    initialising ``inner`` on an empty placeholder and seeing where it lands.

    Raises:
        ValueError: if ``inner.init`` cannot run on the placeholder.
    """
    try:
        skeleton = inner.init(_Slot())
    except Exception as e:
        raise ValueError(
            "on_refresh='rotate'/'reset' needs to find the coordinate-shaped parts of the "
            "inner optimizer's state, but `inner.init` failed on a placeholder tree "
            f"({type(e).__name__}: {e}). Use on_refresh='keep' with this inner optimizer."
        ) from e

    def visit(path: Sequence[Any], skeleton_node: Any, real: Any) -> Any:
        if isinstance(skeleton_node, _Slot):
            return fn(_field_name(path), real)
        return real

    return jax.tree_util.tree_map_with_path(
        visit, skeleton, inner_state, is_leaf=lambda x: isinstance(x, _Slot)
    )


def left_map(q: jax.Array, c: jax.Array, quadratic: bool) -> jax.Array:
    """Maps left coordinates ``(*b, r, m)`` by ``Q = P_newᵀ P_old`` ``(*b, r, r)``."""
    if quadratic:
        q = q * q
    return shard.einsum("...st,...tm->...sm", q, c)


def right_map(q: jax.Array, c: jax.Array, quadratic: bool) -> jax.Array:
    """Maps right coordinates ``(*b, n, r)`` by ``Q = P_oldᵀ P_new`` ``(*b, r, r)``."""
    if quadratic:
        q = q * q
    return shard.einsum("...nt,...ts->...ns", c, q)


def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ b`` over the matrix axes of two ``(*b, d, r)`` bases."""
    return shard.einsum("...dr,...ds->...rs", a, b).astype(jnp.float32)


def basis_maps(projectors: Sequence[Any], old: Sequence[Any], new: Sequence[Any]) -> list[Any]:
    """Per projector, ``(Q_left, Q_right)``: ``U_newᵀ U_old`` and ``V_oldᵀ V_new``.

    ``old`` and ``new`` hold ``(U, V)`` per projector (``None`` where not projected).
    """
    maps: list[Any] = []
    for p, o, nw in zip(projectors, old, new):
        if p is None:
            maps.append(None)
            continue
        q_left = dot_t(nw[0], o[0]) if p.uses_left else None
        q_right = dot_t(o[1], nw[1]) if p.uses_right else None
        maps.append((q_left, q_right))
    return maps


def identity_maps(projectors: Sequence[Any]) -> list[Any]:
    """The maps of a step whose bases do not move: identities, so rotating is exact."""

    def eye(p: Projector) -> jax.Array:
        return jnp.broadcast_to(
            jnp.eye(p.rank, dtype=jnp.float32), (*p.layout.batch_shape, p.rank, p.rank)
        )

    return [
        None if p is None else (eye(p) if p.uses_left else None, eye(p) if p.uses_right else None)
        for p in projectors
    ]


def remap_state(
    inner: optax.GradientTransformation,
    inner_state: Any,
    treedef: Any,
    projectors: Sequence[Any],
    maps: Sequence[Any],
    moved: Sequence[Any],
    *,
    on_refresh: str,
    second_moments: frozenset[str],
) -> Any:
    r"""Applies the ``on_refresh`` policy to every coordinate-shaped tree of the state.

    - ``"rotate"``: a first moment ``M`` maps as ``Q M`` (left) or ``M Q`` (right),
      a second moment (a field named in ``second_moments``) as ``(Q ∘ Q) ν``;
    - ``"reset"``: coordinates of the matrices whose ``moved`` flag is true become zero;
    - ``"keep"``: nothing (the caller skips this function).

    It runs at every step, with identity maps (and false flags) where nothing moved:
    mapping a few ``r × r`` matrices is cheaper than carrying the whole inner state
    through a ``lax.cond``, which XLA may copy.

    Args:
        inner: The inner optimizer (to find its coordinate-shaped trees).
        inner_state: Its state.
        treedef: The structure of the coordinates tree.
        projectors: Per leaf, a :class:`~lorajax.Projector` or ``None``.
        maps: Per leaf, ``(Q_left, Q_right)`` (``"rotate"``), else ignored.
        moved: Per leaf, a boolean scalar: whether its bases changed this step.
        on_refresh: ``"rotate"`` or ``"reset"``.
        second_moments: Field names mapped quadratically.

    Returns:
        The remapped inner state.
    """

    def remap_leaf(p: Projector, qs: Any, flag: Any, c: Any, quadratic: bool) -> Any:
        if on_refresh == "reset":
            return jax.tree.map(lambda x: jnp.where(flag, jnp.zeros_like(x), x), c)

        def lm(x: jax.Array) -> jax.Array:
            return left_map(qs[0].astype(x.dtype), x, quadratic)

        def rm(x: jax.Array) -> jax.Array:
            return right_map(qs[1].astype(x.dtype), x, quadratic)

        if p.side == "left":
            return lm(c)
        if p.side == "right":
            return rm(c)
        return TwoSidedCoords(a=rm(c.a), b=lm(c.b))

    def remap_tree(name: str | None, tree: Any) -> Any:
        quadratic = name in second_moments
        entries = treedef.flatten_up_to(tree)
        out = [
            c if p is None else remap_leaf(p, qs, flag, c, quadratic)
            for p, qs, flag, c in zip(projectors, maps, moved, entries)
        ]
        return treedef.unflatten(out)

    return map_coordinate_trees(inner, inner_state, remap_tree)

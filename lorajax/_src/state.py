"""The state of :func:`lorajax.low_rank` and the bases it holds or regenerates."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import optax

from lorajax._src import bases as bases_lib
from lorajax._src.matrices import MatrixLayout

__all__ = [
    "SALT_BASES",
    "SALT_SKETCH",
    "LowRankState",
    "Projector",
    "TwoSidedCoords",
    "bases_of",
    "basis_spec",
    "coord_spec",
    "current_bases",
    "is_projector_leaf",
    "matrix_spec",
    "phase_key",
    "random_bases",
]


class TwoSidedCoords(NamedTuple):
    """The two coordinate blocks of a two-sided projection.

    Attributes:
        a: ``G V`` with shape ``(*batch, n, r)``: the direction of LoRA's ``g_a``.
        b: ``Uᵀ G`` with shape ``(*batch, r, m)``: the direction of LoRA's ``g_b``.
    """

    a: jax.Array
    b: jax.Array


@dataclasses.dataclass(frozen=True)
class Projector:
    """Per-matrix projection state: stored bases plus static layout.

    Attributes:
        u: Left basis ``(*batch, n, r)`` when it is stored, else ``None``.
        v: Right basis ``(*batch, m, r)`` when it is stored, else ``None``.
        layout: How the leaf is read as matrices.
        side: ``"left"``, ``"right"`` or ``"both"``.
        rank: The rank ``r`` used for this leaf (after clamping).
        basis: The basis family.
        dtype: dtype of the bases and coordinates.
        oversample: Randomized-SVD oversampling (``"randomized_svd"`` only).
        power_iters: Randomized-SVD power iterations (``"randomized_svd"`` only).
        refresh_every: Steps between refreshes of the bases (``T``): they change at step
            counts ``0, T, 2T, …``.
    """

    u: jax.Array | None
    v: jax.Array | None
    layout: MatrixLayout
    side: str
    rank: int
    basis: str
    dtype: Any
    oversample: int = 0
    power_iters: int = 0
    refresh_every: int = 1

    @property
    def uses_left(self) -> bool:
        """Whether the projection has a left basis ``U``."""
        return self.side in ("left", "both")

    @property
    def uses_right(self) -> bool:
        """Whether the projection has a right basis ``V``."""
        return self.side in ("right", "both")


jax.tree_util.register_dataclass(
    Projector,
    data_fields=["u", "v"],
    meta_fields=[
        "layout",
        "side",
        "rank",
        "basis",
        "dtype",
        "oversample",
        "power_iters",
        "refresh_every",
    ],
)


class LowRankState(NamedTuple):
    """State of :func:`low_rank`.

    Attributes:
        count: Number of updates taken (int32).
        key: Raw ``uint32[2]`` key of the current basis period. Random bases are
            regenerated from it; it advances at every refresh.
        projectors: A tree like the params with a :class:`Projector` at each projected
            leaf and ``None`` elsewhere.
        inner_state: The inner optimizer's state over the coordinates.
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    inner_state: optax.OptState


def is_projector_leaf(x: Any) -> bool:
    """Leaves of a projectors tree: a :class:`Projector` or ``None``."""
    return x is None or isinstance(x, Projector)


def _merge_axes(entries: Sequence[Any]) -> Any:
    names: list[Any] = []
    for e in entries:
        if e is None:
            continue
        names.extend(e if isinstance(e, tuple) else (e,))
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def matrix_spec(layout: MatrixLayout, leaf_spec: tuple | None) -> tuple | None:
    """The explicit spec of the matrix view ``(*batch, n, m)`` of a leaf."""
    if leaf_spec is None:
        return None
    return (
        *(leaf_spec[a] for a in layout.batch_axes),
        _merge_axes([leaf_spec[a] for a in layout.in_axes]),
        _merge_axes([leaf_spec[a] for a in layout.out_axes]),
    )


SALT_BASES, SALT_SKETCH = 0, 1


def basis_spec(spec: tuple | None, axis: int) -> tuple | None:
    """Layout of a ``(*batch, d, r)`` basis on matrix axis ``axis`` (-2: d_in, -1: d_out)."""
    return None if spec is None else (*spec[:-2], spec[axis], None)


def coord_spec(spec: tuple | None, side: str) -> tuple | None:
    """Layout of left ``(*batch, r, m)`` or right ``(*batch, n, r)`` coordinates."""
    if spec is None:
        return None
    return (*spec[:-2], None, spec[-1]) if side == "left" else (*spec[:-2], spec[-2], None)


def phase_key(key: jax.Array, salt: int) -> jax.Array:
    """The raw key of one kind of draw (bases or sketches) within a basis period."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), salt))


def random_bases(
    projectors: Sequence[Projector | None], key: jax.Array, specs: Sequence[tuple | None]
) -> list[tuple[Any, Any] | None]:
    """Regenerates the key-only bases of every projector that has them.

    ``specs`` are the explicit layouts of the matrix views. All bases come from one draw
    (see :func:`~lorajax._src.bases.grouped_normals`).
    """
    requests, slots = [], []
    for j, (p, spec) in enumerate(zip(projectors, specs)):
        if p is None or p.basis in bases_lib.STORED_BASES:
            continue
        kind = "orthonormal" if p.basis == "random_orthogonal" else "basis"
        batch, r = p.layout.batch_shape, p.rank
        if p.uses_left:
            requests.append(((*batch, p.layout.n, r), p.dtype, basis_spec(spec, -2), kind))
            slots.append((j, 0))
        if p.uses_right:
            requests.append(((*batch, p.layout.m, r), p.dtype, basis_spec(spec, -1), kind))
            slots.append((j, 1))
    out: list[Any] = [None if p is None else [None, None] for p in projectors]
    draws = bases_lib.grouped_normals(phase_key(key, SALT_BASES), requests)
    for (j, side), draw in zip(slots, draws):
        out[j][side] = draw
    return [None if o is None else tuple(o) for o in out]


def bases_of(
    projectors: Sequence[Projector | None], key: jax.Array, specs: Sequence[tuple | None]
) -> list[tuple[Any, Any] | None]:
    """``(U, V)`` per projector: stored bases from the state, random ones regenerated."""
    random = random_bases(projectors, key, specs)
    return [
        None if p is None else ((p.u, p.v) if p.basis in bases_lib.STORED_BASES else rnd)
        for p, rnd in zip(projectors, random)
    ]


def current_bases(state: LowRankState) -> Any:
    """The bases used by the latest update, as a tree like the params.

    Stored bases are read from the state; random ones are regenerated from its key.
    Before the first update, stored bases are zero and random ones are those of a key
    that the first update will advance.

    Args:
        state: A :class:`LowRankState` (e.g. ``opt_state[0]`` of a chain).

    Returns:
        A tree with ``(U, V)`` at each projected leaf (``None`` for an unused side) and
        ``None`` elsewhere. ``U: (*batch, n, r)``, ``V: (*batch, m, r)``.

    Examples:
        >>> import jax.numpy as jnp, optax, lorajax
        >>> tx = lorajax.low_rank(optax.sgd(1.0), rank=2, basis="random")
        >>> state = tx.init({"w": jnp.ones((8, 6))})
        >>> u, v = lorajax.current_bases(state)["w"]
        >>> u.shape, v
        ((8, 2), None)
    """
    if not isinstance(state, LowRankState):
        raise TypeError(
            f"`state` must be a LowRankState, got {type(state).__name__}. In a chain, pass "
            "the element that belongs to low_rank (e.g. opt_state[0])."
        )

    leaves, treedef = jax.tree.flatten(state.projectors, is_leaf=is_projector_leaf)
    return treedef.unflatten(bases_of(leaves, state.key, [None] * len(leaves)))

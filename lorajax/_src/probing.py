r"""The probes a model applies so that its backward pass yields ``low_rank``'s inputs.

:func:`probes` reads a :func:`lorajax.low_rank` state and returns, for every projected
leaf, the :class:`~lorajax.Probe` of the *next* update:

- between refreshes, the bases that update will use (``P_ℓ = U``, ``P_r = V``; a side
  the projection does not use has width 0), so the backward pass gives exactly the
  coordinates ``Uᵀ G`` and ``G V``;
- random bases (``"random"``, ``"random_orthogonal"``) are regenerated from the key of
  the next update, which advances at the refresh counts: nothing else changes there;
- at a refresh of ``"randomized_svd"`` bases, the Gaussian test matrices of a
  single-pass sketch (``P_ℓ = Ψᵀ``, ``P_r = Ω``): one backward pass refreshes the bases;
- at a refresh of exact ``"svd"`` bases, :data:`FULL_GRADIENT`: that step needs the
  leaf's full gradient (an exact SVD needs ``G`` itself). This is the only case in which
  the projected backward forms ``G``, once every ``T`` steps.

:func:`coordinate_zeros` gives the zero coordinates to differentiate, and
:func:`refresh_due` tells, outside ``jit``, whether the next update refreshes stored
bases (the probes then have other shapes, so a training step compiles a second program
for those steps).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src import bases as bases_lib
from lorajax._src import fresh_bases, shard
from lorajax._src import state as state_lib
from lorajax._src.probe import Coordinates, Probe
from lorajax._src.state import LowRankState, Projector, is_projector_leaf

__all__ = ["FULL_GRADIENT", "coordinate_zeros", "probes", "refresh_due"]


class _FullGradient:
    """The marker of a leaf whose next update needs its full gradient."""

    _instance: _FullGradient | None = None

    def __new__(cls) -> _FullGradient:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "lorajax.FULL_GRADIENT"

    def __reduce__(self) -> str:
        return "FULL_GRADIENT"


#: In a tree of :func:`probes`: differentiate this leaf itself at this step (an exact-SVD
#: refresh), and pass its full gradient to the update.
FULL_GRADIENT = _FullGradient()


def _low_rank_states(opt_state: Any) -> list[LowRankState]:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LowRankState))
        if isinstance(s, LowRankState)
    ]
    if not found:
        raise ValueError(
            "`opt_state` holds no lorajax.low_rank state, so there is nothing to probe. Pass "
            "the state of an optimizer built on lorajax.low_rank (galore, flora, lora, or "
            "low_rank in a chain)."
        )
    return found


def _projector_entries(state: LowRankState) -> list[tuple[tuple, Projector | None]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(state.projectors, is_leaf=is_projector_leaf)
    return [(tuple(path), p) for path, p in flat]


def _concrete_count(state: LowRankState) -> int | None:
    try:
        return int(state.count)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def _refresh_every(entries: list[tuple[tuple, Projector | None]]) -> int:
    return next(p.refresh_every for _, p in entries if p is not None)


def refresh_due(opt_state: Any) -> bool:
    """Whether the next update refreshes stored (gradient-derived) bases.

    At such a step :func:`probes` hands out sketches (or :data:`FULL_GRADIENT` for exact
    SVD bases) instead of the bases, so the probes have other shapes. Call it outside
    ``jit`` (it reads the step count) and pass the result to :func:`probes` as
    ``refresh`` inside.

    Args:
        opt_state: An optimizer state holding one or more :class:`~lorajax.LowRankState`.

    Returns:
        ``True`` when some state with stored bases is at a refresh count.

    Examples:
        >>> import jax.numpy as jnp, optax, lorajax
        >>> tx = lorajax.low_rank(optax.sgd(1.0), rank=2, refresh_every=10)
        >>> lorajax.refresh_due(tx.init({"w": jnp.ones((8, 6))}))  # count 0 refreshes
        True
    """
    due = False
    for state in _low_rank_states(opt_state):
        entries = _projector_entries(state)
        if not any(p is not None and p.basis in bases_lib.STORED_BASES for _, p in entries):
            continue
        count = _concrete_count(state)
        if count is None:
            raise ValueError(
                "lorajax.refresh_due reads the step count, which is traced here. Call it "
                "outside jax.jit and pass the result into the jitted step as a static "
                "argument (probes(..., refresh=...))."
            )
        due = due or count % _refresh_every(entries) == 0
    return due


def _empty(shape: tuple[int, ...], dtype: Any, spec: Any) -> jax.Array:
    return shard.zeros(shape, dtype, spec)


def _bases_probe(p: Projector, pair: tuple[Any, Any], spec: Any) -> Probe:
    batch, n, m = p.layout.batch_shape, p.layout.n, p.layout.m
    u, v = pair
    if u is None:
        u = _empty((*batch, n, 0), p.dtype, state_lib.basis_spec(spec, -2))
    if v is None:
        v = _empty((*batch, m, 0), p.dtype, state_lib.basis_spec(spec, -1))
    return Probe(left=u, right=v)


def _state_probes(
    state: LowRankState, leaf_of: dict[tuple, Any], refresh: bool | None
) -> dict[tuple, Any]:
    entries = _projector_entries(state)
    live = [(path, p) for path, p in entries if p is not None]
    if not live:
        return {}
    projectors = [p for _, p in entries]
    specs = []
    for path, p in entries:
        leaf = leaf_of.get(path)
        if p is not None and leaf is None:
            raise ValueError(
                f"`params` has no leaf at {jax.tree_util.keystr(path)}, which the optimizer "
                "state projects. Pass the params the optimizer was initialised with."
            )
        spec = None if p is None else state_lib.matrix_spec(p.layout, shard.explicit_spec(leaf))
        specs.append(spec)
    period = _refresh_every(entries)
    stored = any(p.basis in bases_lib.STORED_BASES for _, p in live)
    count = _concrete_count(state)
    due = None if count is None else count % period == 0
    if stored:
        if refresh is None and due is None:
            raise ValueError(
                "lorajax.probes needs to know whether this update refreshes the stored bases "
                "(the probes then change shape), but the step count is traced. Pass "
                "refresh=lorajax.refresh_due(opt_state), computed outside jax.jit, as a "
                "static argument."
            )
        if refresh is not None and due is not None and bool(refresh) != due:
            raise ValueError(
                f"`refresh`={refresh!r}, but the update at step count {count} "
                f"{'does' if due else 'does not'} refresh the bases (every {period} steps). "
                "Pass refresh=lorajax.refresh_due(opt_state) or leave it None."
            )
        refresh = due if refresh is None else bool(refresh)
    next_key = jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
    )
    key = jnp.where(state.count % period == 0, next_key, state.key)
    pairs = state_lib.bases_of(projectors, key, specs)
    tests: list[Any] = [None] * len(projectors)
    if stored and refresh:
        tests = fresh_bases.sketch_probes(projectors, specs, key)
    out: dict[tuple, Any] = {}
    for (path, p), pair, spec, test in zip(entries, pairs, specs, tests):
        if p is None:
            continue
        if p.basis in bases_lib.STORED_BASES and refresh:
            out[path] = test if p.basis == "randomized_svd" else FULL_GRADIENT
        else:
            out[path] = _bases_probe(p, pair, spec)
    return out


def probes(opt_state: Any, params: Any, *, refresh: bool | None = None) -> Any:
    r"""The probes of the next update, as a tree like ``params``.

    A model that computes each targeted matmul as
    ``y = x W + (x P_ℓ) Z_ℓ + (x Z_r) P_rᵀ`` and differentiates the zero coordinates
    ``Z`` (:func:`coordinate_zeros`) gets, as their gradients, the
    :class:`~lorajax.Coordinates` that ``low_rank``'s update takes in place of the full
    gradients:

    .. math::

        \partial L/\partial Z_\ell = P_\ell^\top G, \qquad
        \partial L/\partial Z_r = G P_r .

    Args:
        opt_state: The optimizer state (a :class:`~lorajax.LowRankState`, or any state
            that holds some, e.g. a chain's or a ``multi_transform``'s).
        params: The params the optimizer updates (used for their paths and layouts).
        refresh: Whether the next update refreshes stored bases. ``None`` reads it
            from the step count, which must then be concrete when stored bases are
            used; inside ``jit`` pass ``lorajax.refresh_due(opt_state)`` computed
            outside. Random bases never need it.

    Returns:
        A tree like ``params``: a :class:`~lorajax.Probe` (``left (*batch, n, a)``,
        ``right (*batch, m, b)``, in the leaf's matrix view) at each projected leaf,
        :data:`FULL_GRADIENT` where the update needs the full gradient, ``None``
        elsewhere.

    Raises:
        ValueError: If ``opt_state`` holds no ``low_rank`` state, if ``params`` lacks a
            projected leaf, or if ``refresh`` is needed but unknown or wrong.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> params = {"w": jnp.ones((8, 6))}
        >>> tx = lorajax.low_rank(optax.sgd(1.0), rank=2, side="both", basis="random")
        >>> state = tx.init(params)
        >>> probe = lorajax.probes(state, params)["w"]
        >>> probe.left.shape, probe.right.shape  # U (n, r) and V (m, r)
        ((8, 2), (6, 2))
        >>> x, dy = jnp.ones((5, 8)), jnp.ones((5, 6))  # y = x @ w, dL/dy = dy
        >>> coords = lorajax.Coordinates(
        ...     left=(x @ probe.left).T @ dy, right=x.T @ (dy @ probe.right))
        >>> full, _ = tx.update({"w": x.T @ dy}, state, params)
        >>> projected, _ = tx.update({"w": coords}, state, params)
        >>> bool(jnp.allclose(full["w"], projected["w"], atol=1e-5))
        True
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaf_of = {tuple(path): leaf for path, leaf in flat}
    found: dict[tuple, Any] = {}
    for state in _low_rank_states(opt_state):
        for path, probe in _state_probes(state, leaf_of, refresh).items():
            if path in found:
                raise ValueError(
                    f"Two lorajax.low_rank states project {jax.tree_util.keystr(path)}; each "
                    "leaf may be projected by one of them only."
                )
            found[path] = probe
    return treedef.unflatten([found.get(tuple(path)) for path, _ in flat])


def coordinate_zeros(probe_tree: Any, dtype: Any = jnp.float32) -> Any:
    """The zero coordinates ``Z`` to differentiate, one :class:`~lorajax.Coordinates` per probe.

    For ``Probe(left (*batch, n, a), right (*batch, m, b))`` the zeros are
    ``Coordinates(left (*batch, a, m), right (*batch, n, b))``, laid out like the probes'
    ``m`` and ``n`` axes. Other leaves (``None``, :data:`FULL_GRADIENT`) stay as they are.

    Args:
        probe_tree: A tree from :func:`probes`.
        dtype: The coordinates' dtype (float32 by default, also for bf16 models).

    Returns:
        A tree like ``probe_tree``.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> probe = lorajax.Probe(left=jnp.ones((8, 2)), right=jnp.ones((6, 0)))
        >>> zeros = lorajax.coordinate_zeros({"w": probe})["w"]
        >>> zeros.left.shape, zeros.right.shape
        ((2, 6), (8, 0))
    """

    def zeros(probe: Any) -> Any:
        if not isinstance(probe, Probe):
            return probe
        left, right = probe.left, probe.right
        *batch, n, a = left.shape
        *_, m, b = right.shape
        lspec, rspec = shard.explicit_spec(left), shard.explicit_spec(right)
        batch_spec = None if lspec is None else lspec[:-2]
        left_spec = right_spec = None
        if lspec is not None or rspec is not None:
            bs = tuple(batch_spec) if batch_spec is not None else (None,) * len(batch)
            m_axis = None if rspec is None else rspec[-2]
            n_axis = None if lspec is None else lspec[-2]
            left_spec, right_spec = (*bs, None, m_axis), (*bs, n_axis, None)
        return Coordinates(
            left=shard.zeros((*batch, a, m), dtype, left_spec),
            right=shard.zeros((*batch, n, b), dtype, right_spec),
        )

    return jax.tree.map(zeros, probe_tree, is_leaf=lambda x: isinstance(x, Probe))

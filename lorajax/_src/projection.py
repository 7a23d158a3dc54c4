r"""``low_rank``: run any optax transform on low-rank projections of the gradients.

For a kernel ``W: (n, m)`` (``d_in × d_out``) with gradient ``G``:

- left (``U: (n, r)``): coordinates ``R = Uᵀ G`` ``(r, m)``, update ``ΔW = U N``;
- right (``V: (m, r)``): coordinates ``R = G V`` ``(n, r)``, update ``ΔW = N Vᵀ``;
- both (adapter-free LoRA): coordinates ``C_b = Uᵀ G`` (LoRA's ``g_b``) and
  ``C_a = G V`` (LoRA's ``g_a``), and

  .. math::

     \Delta W = \lambda\, U N_b + (I - U U^\top)\, N_a V^\top  \quad\text{(LoRA-Pro)},
     \qquad \Delta W = \lambda\, U N_b + N_a V^\top \quad\text{(sum)},

where ``N = inner(R)`` and ``λ`` is the LoRA+ ratio. With an identity inner optimizer
and ``λ = 1``, LoRA-Pro alignment gives ``P_U G + G P_V - P_U G P_V``: the orthogonal
projection of ``G`` onto the tangent space ``{U Y + Z Vᵀ}`` of rank-r adapters.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorajax._src import bases as bases_lib
from lorajax._src import checks, shard
from lorajax._src import refresh as refresh_lib
from lorajax._src import state as state_lib
from lorajax._src.matrices import MatrixLayout
from lorajax._src.randomized_svd import sketched_svd
from lorajax._src.state import LowRankState, Projector, TwoSidedCoords
from lorajax._src.targets import Targets, select_targets

__all__ = ["ALIGNS", "SIDES", "alias_options", "full_space_chain", "low_rank"]

SIDES = ("auto", "left", "right", "both")
ALIGNS = ("lora_pro", "sum")
ON_SMALL_MATRIX = ("clamp", "skip", "error")
SECOND_MOMENT_NAMES = ("nu", "nu_max", "sum_of_squares")


def low_rank(
    inner: optax.GradientTransformation | None = None,
    *,
    rank: int,
    side: str = "auto",
    basis: str = "randomized_svd",
    refresh_every: int = 200,
    on_refresh: str = "rotate",
    targets: Targets = None,
    align: str = "lora_pro",
    lora_plus_ratio: float = 1.0,
    seed: int = 0,
    scale: float = 1.0,
    oversample: int = 16,
    power_iters: int = 2,
    on_small_matrix: str = "clamp",
    state_dtype: str | Any | None = "float32",
    second_moment_names: Sequence[str] = SECOND_MOMENT_NAMES,
    precision: jax.lax.PrecisionLike = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` on rank-``r`` projections of the targeted matrix gradients.

    Each targeted gradient ``G`` (read as ``(*batch, n, m)`` matrices through its
    :class:`~lorajax.MatrixSpec`) is projected onto rank-``r`` bases, ``inner`` runs on
    the small coordinates (so its state is small), and the result is mapped back:

    .. math::

       \text{left: } \Delta W = U\,\mathrm{inner}(U^\top G), \qquad
       \text{right: } \Delta W = \mathrm{inner}(G V)\,V^\top, \\
       \text{both: } \Delta W = \lambda\,U N_b + (I - U U^\top) N_a V^\top,\quad
       (N_a, N_b) = \mathrm{inner}(G V,\ U^\top G).

    The returned update is multiplied by ``scale`` (GaLore's ``α``). Leaves that are not
    targeted go through ``inner`` at full shape, in the same call, so an optimizer with
    global statistics still sees one tree. Bases are refreshed at step counts
    ``0, T, 2T, …`` (``T = refresh_every``) under ``jax.lax.cond``: no retracing.

    Args:
        inner: The optimizer to run on the coordinates; it must not need ``params``.
            Default: ``optax.scale_by_adam()``.
        rank: The rank ``r`` (a static positive int).
        side: ``"left"`` (project ``d_in``), ``"right"`` (project ``d_out``),
            ``"auto"`` (the side with the smaller state: left when ``m <= n``) or
            ``"both"`` (adapter-free LoRA, with state of LoRA's size).
        basis: ``"randomized_svd"`` (default; warm-started from the previous basis),
            ``"svd"`` (exact, as GaLore; gathers sharded matrices), ``"random"``
            (Gaussian ``N(0, 1/r)``, regenerated from a key: only the key is stored) or
            ``"random_orthogonal"`` (orthonormalised Gaussian, also key-only).
        refresh_every: Steps between basis refreshes.
        on_refresh: ``"rotate"`` (map moments into the new basis), ``"keep"`` (leave
            them, as GaLore) or ``"reset"`` (zero them). See :mod:`lorajax` docs.
        targets: Which leaves to project (see :func:`~lorajax.resolve_targets`).
        align: With ``side="both"``: ``"lora_pro"`` (tangent-space projection) or
            ``"sum"`` (vanilla LoRA's equivalent gradient).
        lora_plus_ratio: With ``side="both"``: the ``U N_b`` block (LoRA's ``b``)
            steps ``λ`` times further (LoRA+).
        seed: Seed of the random bases and sketches.
        scale: Multiplies the projected updates (GaLore's ``α``).
        oversample: Randomized SVD oversampling ``p``.
        power_iters: Randomized SVD power iterations ``q``.
        on_small_matrix: When ``rank > min(n, m)``: ``"clamp"`` the rank to
            ``min(n, m)`` (as optax's GaLore), ``"skip"`` the leaf (full-shape
            ``inner``) whenever ``rank >= min(n, m)``, or raise (``"error"``).
        state_dtype: dtype of bases, coordinates and inner state (``"float32"`` by
            default, also for bf16 params); ``None`` keeps the gradients' dtype.
        second_moment_names: Inner-state fields treated as second moments by
            ``on_refresh="rotate"``.
        precision: Matmul precision of the projections.

    Returns:
        An ``optax.GradientTransformationExtraArgs``; ``update`` returns updates in the
        gradients' dtype.

    Raises:
        ValueError / TypeError: at construction for bad arguments; at ``init`` for
            targets that select nothing, ill-fitting specs, an oversized rank with
            ``on_small_matrix="error"`` or an ``inner`` that needs ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
        >>> tx = optax.chain(
        ...     lorajax.low_rank(optax.scale_by_adam(), rank=4),
        ...     optax.scale_by_learning_rate(1e-2),
        ... )
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = tx.update(grads, state, params)
        >>> jax.tree.map(jnp.shape, updates)
        {'b': (32,), 'w': (64, 32)}
        >>> state[0].inner_state.mu["w"].shape  # Adam's moment on U^T G only
        (4, 32)

    References:
        - Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024.
        - Hao et al., `Flora <https://arxiv.org/abs/2402.03293>`_, 2024.
        - Wang et al., `LoRA-Pro <https://arxiv.org/abs/2407.18242>`_, 2024.
        - Hayou et al., `LoRA+ <https://arxiv.org/abs/2402.12354>`_, 2024.
        - Halko, Martinsson and Tropp, `Finding structure with randomness
          <https://arxiv.org/abs/0909.4061>`_, 2011.
    """
    if inner is None:
        inner = optax.scale_by_adam()
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"`inner` must be an optax GradientTransformation (with init/update), got "
            f"{inner!r}. For example: lorajax.low_rank(optax.scale_by_adam(), rank=8)."
        )
    static_rank = checks.static_int(rank, "rank")
    checks.check_choice(side, "side", SIDES)
    checks.check_choice(basis, "basis", bases_lib.BASES)
    checks.check_choice(on_refresh, "on_refresh", refresh_lib.ON_REFRESH)
    checks.check_choice(align, "align", ALIGNS)
    checks.check_choice(on_small_matrix, "on_small_matrix", ON_SMALL_MATRIX)
    checks.static_int(refresh_every, "refresh_every")
    checks.check_positive(lora_plus_ratio, "lora_plus_ratio")
    checks.check_positive(scale, "scale")
    static_oversample = checks.static_int(oversample, "oversample", allow_zero=True)
    static_power_iters = checks.static_int(power_iters, "power_iters", allow_zero=True)
    if side != "both" and not checks.is_traced(lora_plus_ratio) and float(lora_plus_ratio) != 1.0:
        raise ValueError(
            f"`lora_plus_ratio`={lora_plus_ratio!r} only applies with side='both' (it scales "
            "LoRA's b block); pass side='both' or leave the ratio at 1.0."
        )
    try:
        fixed_dtype = None if state_dtype is None else jnp.dtype(state_dtype)
    except TypeError:
        raise TypeError(
            f"`state_dtype` must be a dtype name such as 'float32', or None; got {state_dtype!r}."
        ) from None
    if fixed_dtype is not None and not jnp.issubdtype(fixed_dtype, jnp.floating):
        raise ValueError(f"`state_dtype` must be a floating dtype, got {fixed_dtype}.")
    inner = optax.with_extra_args_support(inner)
    second_moments = frozenset(second_moment_names)

    def dtype_of(x: Any) -> Any:
        return x.dtype if fixed_dtype is None else fixed_dtype

    def make_projector(layout: MatrixLayout, leaf: Any, path: str):
        n, m = layout.n, layout.m
        r = static_rank
        for name, value in (
            ("rank", r),
            ("oversample", static_oversample),
            ("power_iters", static_power_iters),
        ):
            if value is None:
                raise TypeError(
                    f"`{name}` must be a static Python int, but it is traced (is `init` "
                    f"jitted under optax.inject_hyperparams?). Pass static_args=({name!r},) "
                    "to optax.inject_hyperparams, or call init outside jit."
                )
        if r > min(n, m) and on_small_matrix == "error":
            raise ValueError(
                f"`rank`={r} exceeds min(d_in, d_out)={min(n, m)} for leaf {path!r} "
                f"(matrix {n}x{m}). Lower the rank, exclude the leaf from `targets`, or pass "
                "on_small_matrix='clamp' or 'skip'."
            )
        if r >= min(n, m) and on_small_matrix == "skip":
            return None
        r = min(r, n, m)
        leaf_side = side if side != "auto" else ("left" if m <= n else "right")
        kind = basis
        if kind == "random" and leaf_side == "both" and align == "lora_pro":
            kind = "random_orthogonal"  # I - U Uᵀ is a projector only for orthonormal U
        spec = state_lib.matrix_spec(layout, shard.explicit_spec(leaf))
        batch = layout.batch_shape
        dt = dtype_of(leaf)
        stored = kind in bases_lib.STORED_BASES
        u = v = None
        if stored and leaf_side in ("left", "both"):
            u = shard.zeros((*batch, n, r), dt, state_lib.basis_spec(spec, -2))
        if stored and leaf_side in ("right", "both"):
            v = shard.zeros((*batch, m, r), dt, state_lib.basis_spec(spec, -1))
        sketch = kind == "randomized_svd"
        return Projector(
            u,
            v,
            layout,
            leaf_side,
            r,
            kind,
            jnp.dtype(dt),
            oversample=static_oversample if sketch else 0,
            power_iters=static_power_iters if sketch else 0,
        )

    def coord_zeros(p: Projector, leaf: Any) -> Any:
        spec = state_lib.matrix_spec(p.layout, shard.explicit_spec(leaf))
        batch, n, m, r = p.layout.batch_shape, p.layout.n, p.layout.m, p.rank
        dt = dtype_of(leaf)
        left = shard.zeros((*batch, r, m), dt, state_lib.coord_spec(spec, "left"))
        right = shard.zeros((*batch, n, r), dt, state_lib.coord_spec(spec, "right"))
        if p.side == "left":
            return left
        if p.side == "right":
            return right
        return TwoSidedCoords(a=right, b=left)

    def init_fn(params: optax.Params) -> LowRankState:
        count = jnp.zeros([], jnp.int32)
        key = jax.random.key_data(jax.random.key(seed))
        leaves, treedef = jax.tree.flatten(params)
        if not leaves:  # e.g. the placeholder of optax.tree_map_params
            return LowRankState(count, key, params, inner.init(params))
        specs, paths = select_targets(params, targets)
        projectors: list[Projector | None] = []
        coords = []
        for spec, path, leaf in zip(specs, paths, leaves):
            p = None
            if spec is not None:
                p = make_projector(spec.resolve(leaf.shape, path), leaf, path)
            projectors.append(p)
            if p is None:
                coords.append(shard.zeros(leaf.shape, dtype_of(leaf), shard.explicit_spec(leaf)))
            else:
                coords.append(coord_zeros(p, leaf))
        coord_tree = treedef.unflatten(coords)
        inner_state = inner.init(coord_tree)
        try:
            jax.eval_shape(lambda c, s: inner.update(c, s, None), coord_tree, inner_state)
        except Exception as e:
            raise ValueError(
                "`inner` failed when called without params on the projected coordinates. "
                "lorajax runs `inner` on low-rank coordinates, so it cannot see params: "
                "transforms such as optax.adamw or optax.add_decayed_weights do not fit "
                "there. Use a gradient-only transform (optax.scale_by_adam()) and put weight "
                "decay after low_rank in the chain (the aliases' `weight_decay` does this). "
                f"The inner error was {type(e).__name__}: {e}"
            ) from e
        return LowRankState(count, key, treedef.unflatten(projectors), inner_state)

    def fresh_stored(p: Projector, g: jax.Array, sketch: Any, count: jax.Array) -> Projector:
        """New stored bases from the gradient matrix ``g`` (run at refresh steps)."""
        if p.basis == "svd":
            u, v = bases_lib.exact_svd(g, p.rank)
        else:
            # Continue the subspace iteration from the previous basis; at the first
            # refresh it is still zero, so start from the Gaussian columns instead.
            prev, mat = (p.v, jnp.swapaxes(g, -1, -2)) if p.side == "right" else (p.u, g)
            head = jnp.where(count > 0, prev, sketch[..., : p.rank])
            start = jnp.concatenate([head, sketch[..., p.rank :]], axis=-1)
            left, _, right = sketched_svd(
                mat, p.rank, start, warm=True, power_iters=p.power_iters, precision=precision
            )
            u, v = (right, left) if p.side == "right" else (left, right)
        new_u = shard.like(u.astype(p.u.dtype), p.u) if p.u is not None else None
        new_v = shard.like(v.astype(p.v.dtype), p.v) if p.v is not None else None
        return dataclasses.replace(p, u=new_u, v=new_v)

    def sketches(projectors: Sequence[Any], mats: Sequence[Any], key: jax.Array) -> list[Any]:
        """Gaussian starting blocks ``(*batch, d, k)`` for every randomized-SVD refresh."""
        requests, slots = [], []
        for j, (p, g) in enumerate(zip(projectors, mats)):
            if p is None or p.basis != "randomized_svd":
                continue
            n, m = p.layout.n, p.layout.m
            rows, axis = (m, -1) if p.side == "right" else (n, -2)
            k = max(min(p.rank + p.oversample, n, m), p.rank)
            shape = (*p.layout.batch_shape, rows, k)
            spec = state_lib.basis_spec(shard.explicit_spec(g), axis)
            requests.append((shape, p.dtype, spec, "gaussian"))
            slots.append(j)
        out: list[Any] = [None] * len(projectors)
        draws = bases_lib.grouped_normals(state_lib.phase_key(key, state_lib.SALT_SKETCH), requests)
        for j, draw in zip(slots, draws):
            out[j] = draw
        return out

    def bases_in_use(projectors: Sequence[Any], key: jax.Array, mats: Sequence[Any]) -> list:
        """``(U, V)`` per projector, laid out like the gradient matrices ``mats``."""
        specs = [None if g is None else shard.explicit_spec(g) for g in mats]
        return state_lib.bases_of(projectors, key, specs)

    def project(p: Projector, u: Any, v: Any, g: jax.Array) -> Any:
        left = right = None
        if p.uses_left:
            left = shard.einsum("...nr,...nm->...rm", u, g, precision=precision)
        if p.uses_right:
            right = shard.einsum("...nm,...mr->...nr", g, v, precision=precision)
        if p.side == "both":
            return TwoSidedCoords(a=right, b=left)
        return left if p.side == "left" else right

    def project_back(p: Projector, u: Any, v: Any, c: Any) -> jax.Array:
        if p.side == "left":
            return shard.einsum("...nr,...rm->...nm", u, c, precision=precision)
        if p.side == "right":
            return shard.einsum("...nr,...mr->...nm", c, v, precision=precision)
        a = c.a
        if align == "lora_pro":
            inside = shard.einsum("...nr,...ns->...rs", u, a, precision=precision)
            a = a - shard.einsum("...nr,...rs->...ns", u, inside, precision=precision)
        # λ U N_b + a Vᵀ as one product [a | λU] [Vᵀ ; N_b]: ΔW is written once.
        left = jnp.concatenate([a, u * jnp.asarray(lora_plus_ratio, u.dtype)], axis=-1)
        right = jnp.concatenate([jnp.swapaxes(v, -1, -2), c.b], axis=-2)
        return shard.einsum("...nk,...km->...nm", left, right, precision=precision)

    def basis_maps(projectors: list[Any], old: list[Any], new: list[Any]) -> list[Any]:
        """Per projector, ``(Q_left, Q_right)``: ``U_newᵀ U_old`` and ``V_oldᵀ V_new``."""
        maps = []
        for p, o, nw in zip(projectors, old, new):
            if p is None:
                maps.append(None)
                continue
            q_left = refresh_lib.dot_t(nw[0], o[0]) if p.uses_left else None
            q_right = refresh_lib.dot_t(o[1], nw[1]) if p.uses_right else None
            maps.append((q_left, q_right))
        return maps

    def identity_maps(projectors: list[Any]) -> list[Any]:
        """The maps of a step that does not refresh: identities, so rotating is exact."""

        def eye(p: Projector) -> jax.Array:
            return jnp.broadcast_to(
                jnp.eye(p.rank, dtype=jnp.float32), (*p.layout.batch_shape, p.rank, p.rank)
            )

        return [
            None
            if p is None
            else (eye(p) if p.uses_left else None, eye(p) if p.uses_right else None)
            for p in projectors
        ]

    def remap_state(
        inner_state: Any, treedef: Any, projectors: list[Any], maps: list[Any], flag: jax.Array
    ) -> Any:
        """Applies the on_refresh policy to every coordinate-shaped tree of the state.

        It runs at every step: ``maps`` are identities and ``flag`` is false except at a
        refresh. Mapping a few r x r matrices is cheaper than carrying the whole inner
        state through a ``lax.cond``, which XLA may copy.
        """

        def remap_leaf(p: Projector, qs: Any, c: Any, quadratic: bool) -> Any:
            if on_refresh == "reset":
                return jax.tree.map(lambda x: jnp.where(flag, jnp.zeros_like(x), x), c)

            def lm(x):
                return refresh_lib.left_map(qs[0].astype(x.dtype), x, quadratic)

            def rm(x):
                return refresh_lib.right_map(qs[1].astype(x.dtype), x, quadratic)

            if p.side == "left":
                return lm(c)
            if p.side == "right":
                return rm(c)
            return TwoSidedCoords(a=rm(c.a), b=lm(c.b))

        def remap_tree(name: str | None, tree: Any) -> Any:
            quadratic = name in second_moments
            entries = treedef.flatten_up_to(tree)
            out = [
                c if p is None else remap_leaf(p, qs, c, quadratic)
                for p, qs, c in zip(projectors, maps, entries)
            ]
            return treedef.unflatten(out)

        return refresh_lib.map_coordinate_trees(inner, inner_state, remap_tree)

    def update_fn(
        updates: optax.Updates,
        state: LowRankState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LowRankState]:
        del params
        g_leaves, treedef = jax.tree.flatten(updates)
        if not g_leaves:
            new_updates, inner_state = inner.update(updates, state.inner_state, None, **extra_args)
            count = optax.safe_int32_increment(state.count)
            return new_updates, state._replace(count=count, inner_state=inner_state)
        old_projectors = treedef.flatten_up_to(state.projectors)
        count = state.count
        refresh = (count % refresh_every) == 0
        next_key = jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        )
        key = jnp.where(refresh, next_key, state.key)
        mats = [
            None if p is None else p.layout.to_matrix(g).astype(dtype_of(g))
            for g, p in zip(g_leaves, old_projectors)
        ]

        projectors = old_projectors
        if any(p is not None and p.basis in bases_lib.STORED_BASES for p in projectors):

            def do_refresh() -> list[Any]:
                drawn = sketches(old_projectors, mats, key)
                return [
                    p
                    if p is None or p.basis not in bases_lib.STORED_BASES
                    else fresh_stored(p, g, sk, count)
                    for p, g, sk in zip(old_projectors, mats, drawn)
                ]

            projectors = jax.lax.cond(refresh, do_refresh, lambda: old_projectors)

        pairs = bases_in_use(projectors, key, mats)

        inner_state = state.inner_state
        if on_refresh != "keep" and any(p is not None for p in projectors):
            moved = refresh & (count > 0)
            maps = None
            if on_refresh == "rotate":

                def refreshed_maps() -> list[Any]:
                    old_pairs = bases_in_use(old_projectors, state.key, mats)
                    return basis_maps(projectors, old_pairs, pairs)

                maps = jax.lax.cond(moved, refreshed_maps, lambda: identity_maps(projectors))
            inner_state = remap_state(
                inner_state, treedef, projectors, maps or [None] * len(projectors), moved
            )

        coords = [
            g.astype(dtype_of(g)) if p is None else project(p, *uv, mat)
            for g, p, uv, mat in zip(g_leaves, projectors, pairs, mats)
        ]
        steps, inner_state = inner.update(
            treedef.unflatten(coords), inner_state, None, **extra_args
        )
        step_leaves = treedef.flatten_up_to(steps)
        out = []
        for g, p, uv, c in zip(g_leaves, projectors, pairs, step_leaves):
            if p is None:
                out.append(c.astype(g.dtype))
                continue
            full = p.layout.from_matrix(project_back(p, *uv, c))
            out.append((full * jnp.asarray(scale, full.dtype)).astype(g.dtype))
        new_state = LowRankState(
            count=optax.safe_int32_increment(count),
            key=key,
            projectors=treedef.unflatten(projectors),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def full_space_chain(
    projected: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """``chain(projected, add_decayed_weights, scale_by_learning_rate)``: the aliases' form.

    Weight decay and the learning rate act on the full-shape update, after projecting
    back, as in AdamW.
    """
    return optax.chain(
        projected,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def alias_options(alias: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Merges an alias's defaults with the extra keyword arguments meant for low_rank.

    ``optax.inject_hyperparams`` hands a factory's ``**kwargs`` over as one argument
    named ``kwargs``; it is unpacked here. Unknown names raise a ``TypeError``.
    """
    options = dict(options)
    nested = options.pop("kwargs", None)
    if isinstance(nested, dict):
        options = nested | options
    valid = set(inspect.signature(low_rank).parameters) - {"inner"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"lorajax.{alias}() got unknown keyword argument(s) {unknown}. Extra keywords go "
            f"to lorajax.low_rank, which accepts: {', '.join(sorted(valid))}."
        )
    return defaults | options

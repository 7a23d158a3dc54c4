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

import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorajax._src import bases as bases_lib
from lorajax._src import checks, fresh_bases, shard
from lorajax._src import project as project_lib
from lorajax._src import refresh as refresh_lib
from lorajax._src import state as state_lib
from lorajax._src.matrices import MatrixLayout
from lorajax._src.probe import Coordinates
from lorajax._src.state import LowRankState, Projector, TwoSidedCoords
from lorajax._src.targets import Targets, path_str, select_targets

__all__ = ["ALIGNS", "SIDES", "alias_options", "full_space_chain", "low_rank"]

SIDES = ("auto", "left", "right", "both")
ALIGNS = project_lib.ALIGNS
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

    def is_coordinates(x: Any) -> bool:
        return isinstance(x, Coordinates)

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
            refresh_every=refresh_every,
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

    def check_coordinates(p: Projector | None, c: Coordinates, path: str) -> bool:
        """Validates a Coordinates leaf; returns whether it holds refresh sketches."""
        if p is None:
            raise ValueError(
                f"Got lorajax.Coordinates for leaf {path!r}, which low_rank does not "
                "project (it is not among `targets`, or it was skipped). Pass its full "
                "gradient instead, or add it to `targets`."
            )
        batch, n, m, r = p.layout.batch_shape, p.layout.n, p.layout.m, p.rank
        sketch = fresh_bases.is_sketch(p, c)
        if sketch:
            a, b = fresh_bases.sketch_widths(p)
        else:
            a = r if p.uses_left else 0
            b = r if p.uses_right else 0
        want_left, want_right = (*batch, a, m), (*batch, n, b)
        if tuple(c.left.shape) != want_left or tuple(c.right.shape) != want_right:
            raise ValueError(
                f"lorajax.Coordinates for leaf {path!r} have shapes left "
                f"{tuple(c.left.shape)} and right {tuple(c.right.shape)}; the {p.side}-sided "
                f"rank-{r} projection of this (*batch, n, m) = {(*batch, n, m)} matrix needs "
                f"left {want_left} and right {want_right}. Take the probes from "
                "lorajax.probes(opt_state, params) for this very update."
            )
        return sketch

    def leaf_paths(updates: Any) -> list[str]:
        flat, _ = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_coordinates)
        return [path_str(path) for path, _ in flat]

    def matrix_specs(projectors: Sequence[Any], mats: Sequence[Any], params: Any) -> list:
        """Explicit layouts of the matrix views, from the gradients or else the params."""
        p_leaves = params if params is not None else [None] * len(projectors)
        specs = []
        for p, g, w in zip(projectors, mats, p_leaves):
            if p is None:
                specs.append(None)
            elif g is not None:
                specs.append(shard.explicit_spec(g))
            else:
                specs.append(state_lib.matrix_spec(p.layout, shard.explicit_spec(w)))
        return specs

    def update_fn(
        updates: optax.Updates,
        state: LowRankState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LowRankState]:
        g_leaves, treedef = jax.tree.flatten(updates, is_leaf=is_coordinates)
        if not g_leaves:
            new_updates, inner_state = inner.update(updates, state.inner_state, None, **extra_args)
            count = optax.safe_int32_increment(state.count)
            return new_updates, state._replace(count=count, inner_state=inner_state)
        old_projectors = treedef.flatten_up_to(state.projectors)
        param_leaves = treedef.flatten_up_to(params) if params is not None else None
        probed = [isinstance(g, Coordinates) for g in g_leaves]
        sketched = [False] * len(g_leaves)
        if any(probed):
            paths = leaf_paths(updates)
            for j, (g, p) in enumerate(zip(g_leaves, old_projectors)):
                if probed[j]:
                    sketched[j] = check_coordinates(p, g, paths[j])
        count = state.count
        refresh = (count % refresh_every) == 0
        next_key = jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        )
        key = jnp.where(refresh, next_key, state.key)
        mats = [
            None if p is None or probe else p.layout.to_matrix(g).astype(dtype_of(g))
            for g, p, probe in zip(g_leaves, old_projectors, probed)
        ]
        specs = matrix_specs(old_projectors, mats, param_leaves)

        # Stored bases refresh from the full gradient under a cond on the count; from the
        # sketches of a projected backward pass whenever sketches arrive (probes() hands
        # out sketches exactly at the refresh counts).
        def from_full_gradient(j: int, p: Any) -> bool:
            return p is not None and p.basis in bases_lib.STORED_BASES and mats[j] is not None

        projectors = list(old_projectors)
        if any(from_full_gradient(j, p) for j, p in enumerate(old_projectors)):

            def do_refresh() -> list[Any]:
                starts = fresh_bases.gaussian_starts(old_projectors, specs, key)
                return [
                    fresh_bases.from_gradient(p, mats[j], starts[j], count, precision=precision)
                    if from_full_gradient(j, p)
                    else p
                    for j, p in enumerate(old_projectors)
                ]

            projectors = jax.lax.cond(refresh, do_refresh, lambda: list(old_projectors))
        sketch_coords: dict[int, Any] = {}
        if any(sketched):
            tests = fresh_bases.sketch_probes(old_projectors, specs, key)
            for j, p in enumerate(old_projectors):
                if sketched[j]:
                    projectors[j], sketch_coords[j] = fresh_bases.from_sketch(
                        p, g_leaves[j], tests[j], precision=precision
                    )

        pairs = state_lib.bases_of(projectors, key, specs)

        inner_state = state.inner_state
        if on_refresh != "keep" and any(p is not None for p in projectors):
            started = count > 0
            moved = [started if sketched[j] else refresh & started for j in range(len(projectors))]
            maps = [None] * len(projectors)
            if on_refresh == "rotate":
                # Leaves whose bases change at the refresh counts take their maps under a
                # cond (random bases are regenerated for the old key only then);
                # sketch-refreshed leaves map from the stored bases they replace.
                by_count = [None if sketched[j] else p for j, p in enumerate(projectors)]
                by_sketch = [p if sketched[j] else None for j, p in enumerate(projectors)]

                def refreshed() -> list[Any]:
                    old = [None if sketched[j] else p for j, p in enumerate(old_projectors)]
                    old_pairs = state_lib.bases_of(old, state.key, specs)
                    return refresh_lib.basis_maps(by_count, old_pairs, pairs)

                maps = jax.lax.cond(
                    refresh & started, refreshed, lambda: refresh_lib.identity_maps(by_count)
                )
                if any(sketched):
                    stored = [None if p is None else (p.u, p.v) for p in old_projectors]
                    direct = refresh_lib.basis_maps(by_sketch, stored, pairs)
                    eye = refresh_lib.identity_maps(by_sketch)
                    for j in range(len(projectors)):
                        if sketched[j]:
                            maps[j] = jax.tree.map(
                                lambda d, i: jnp.where(started, d, i), direct[j], eye[j]
                            )
            inner_state = refresh_lib.remap_state(
                inner,
                inner_state,
                treedef,
                projectors,
                maps,
                moved,
                on_refresh=on_refresh,
                second_moments=second_moments,
            )

        coords = []
        for j, (g, p, uv) in enumerate(zip(g_leaves, projectors, pairs)):
            if p is None:
                coords.append(g.astype(dtype_of(g)))
            elif sketched[j]:
                coords.append(sketch_coords[j])
            elif probed[j]:
                c = Coordinates(g.left.astype(p.dtype), g.right.astype(p.dtype))
                coords.append(project_lib.from_probes(p.side, c))
            else:
                coords.append(project_lib.project(p.side, *uv, mats[j], precision=precision))
        steps, inner_state = inner.update(
            treedef.unflatten(coords), inner_state, None, **extra_args
        )
        step_leaves = treedef.flatten_up_to(steps)
        out = []
        for j, (g, p, uv, c) in enumerate(zip(g_leaves, projectors, pairs, step_leaves)):
            if p is None:
                out.append(c.astype(g.dtype))
                continue
            back = project_lib.project_back(
                p.side,
                *uv,
                c,
                align=align,
                lora_plus_ratio=lora_plus_ratio,
                precision=precision,
            )
            full = p.layout.from_matrix(back)
            if probed[j]:
                out_dtype = param_leaves[j].dtype if param_leaves is not None else p.dtype
            else:
                out_dtype = g.dtype
            out.append((full * jnp.asarray(scale, full.dtype)).astype(out_dtype))
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

"""The shared contract every lorajax transform must honour.

A transform joins the suite by adding a :class:`Case` to :data:`CASES` (or by calling
the ``check_*`` functions from its own test module with its own case). Each check is an
oracle: it compares against an independent computation, not against itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax
from lorajax._src.matrices import MatrixSpec
from lorajax._src.targets import path_str
from lorajax.adapters import LoRA, is_lora
from tests.util import assert_trees_close, grad_stream, mixed_params
from tests.util import run as _run

SHARD_SPECS = {
    "tall": P("x", None),
    "wide": P(None, "x"),
    "bias": P("x"),
    "stacked": P(None, "x", None),
}


def adapter_params(key=0, dtype=jnp.float32):
    """An adapter tree with the keys of ``mixed_params``, covering every adapter path.

    ``tall`` has a frozen ``a`` (LoRA-FA); ``wide`` has ``b = 0`` (a first step) and a DoRA
    magnitude; ``stacked`` holds three layers; ``bias`` is a plain trainable array.
    """
    ks = jax.random.split(jax.random.key(key), 8)
    r = 4

    def lora(ka, kb, shape, spec, scale, zero_b=False, magnitude=None, frozen=False):
        layout = spec.resolve(shape)
        *batch, n, m = layout.matrix_shape
        a = jax.random.normal(ka, (*batch, n, r), dtype) * jnp.asarray(n**-0.5, dtype)
        b = jnp.zeros((*batch, r, m), dtype) if zero_b else jax.random.normal(kb, (*batch, r, m))
        mag = None if magnitude is None else jax.random.normal(magnitude, (*batch, m), dtype)
        return LoRA(a, b.astype(dtype), mag, scale, scale * r, r, frozen_a=frozen, layout=layout)

    return {
        "tall": lora(ks[0], ks[1], (96, 32), MatrixSpec(), 2.0, frozen=True),
        "wide": lora(ks[2], ks[3], (32, 80), MatrixSpec(), 0.5, zero_b=True, magnitude=ks[4]),
        "bias": jax.random.normal(ks[5], (80,), dtype),
        "stacked": lora(ks[6], ks[7], (3, 48, 64), MatrixSpec(batch_axes=(0,)), 1.0),
    }


def adapter_shard_specs(params):
    """Factors sharded along d_in (``a``) and d_out (``b``, magnitude); rank replicated."""

    def spec(x):
        if not isinstance(x, LoRA):
            return P("x")
        batch = (None,) * (x.a.ndim - 2)
        return x.replace(
            a=P(*batch, "x", None),
            b=P(*batch, None, "x"),
            magnitude=None if x.magnitude is None else P(*batch, "x"),
        )

    return jax.tree.map(spec, params, is_leaf=is_lora)


def stripe_mask(params):
    """A fixed b-shaped mask (every third entry masked out) for each adapter."""

    def mask(x):
        if not isinstance(x, LoRA):
            return None
        size = int(np.prod(x.b.shape))
        return jnp.asarray(np.arange(size).reshape(x.b.shape) % 3 != 0)

    return jax.tree.map(mask, params, is_leaf=is_lora)


@dataclasses.dataclass(frozen=True)
class Case:
    """A transform under test.

    Attributes:
        name: Test id.
        factory: A function returning the transform (an alias or ``low_rank``).
        kwargs: Arguments for ``factory``.
        schedule_arg: A float argument of ``factory`` that multiplies the updates of
            ``scaled`` leaves linearly; the inject_hyperparams check schedules it. ``None``
            when no argument acts linearly: the check then injects every numeric argument
            (so the transform runs on traced hyperparameters) and compares with the
            plain run.
        scaled: Which leaves ``schedule_arg`` scales: ``"all"``, ``"targeted"``, or a
            callable ``(path, leaf) -> bool`` over the leaves of the update tree.
        refresh_every: Steps between basis refreshes (the checks cross several).
        gathers_weights: Whether the transform gathers whole sharded matrices by design
            (exact SVD); otherwise the HLO check forbids W-sized all-gathers.
        params: Builds the parameter tree (arrays, or adapters with LoRA nodes).
        param_kwargs: Arguments of ``factory`` that depend on the params (e.g. masks),
            built from the tree the transform will see.
        shard_specs: The partition specs of ``params`` on the 8-device mesh ``("x",)``.
        float_state: Whether the transform keeps floating state (which must be f32);
            without it, the bf16 check only asserts that no state is bf16.
        notes: Why a check has a different form for this transform, if it does.
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    schedule_arg: str | None = "learning_rate"
    scaled: str | Callable[[str, Any], bool] = "all"
    refresh_every: int = 3
    gathers_weights: bool = False
    params: Callable[..., Any] = mixed_params
    param_kwargs: Callable[[Any], dict[str, Any]] | None = None
    shard_specs: Callable[[Any], Any] = lambda params: SHARD_SPECS
    float_state: bool = True
    notes: str = ""

    def kwargs_for(self, params: Any = None) -> dict[str, Any]:
        if self.param_kwargs is None:
            return self.kwargs
        if params is None:
            raise ValueError(f"Case {self.name!r} builds arguments from the params; pass them.")
        return self.kwargs | self.param_kwargs(params)

    def make(self, params: Any = None, **overrides: Any) -> optax.GradientTransformation:
        return self.factory(**(self.kwargs_for(params) | overrides))


CASES = [
    Case(
        "galore",
        lorajax.galore,
        {"learning_rate": 1e-2, "rank": 4, "update_proj_gap": 3},
        gathers_weights=True,
    ),
    Case("flora", lorajax.flora, {"learning_rate": 1e-2, "rank": 4, "refresh_every": 3}),
    Case("lora", lorajax.lora, {"learning_rate": 1e-2, "rank": 4, "refresh_every": 3}),
    Case(
        "low_rank_default",
        lorajax.low_rank,
        {"inner": optax.scale_by_adam(), "rank": 4, "refresh_every": 3},
        schedule_arg="scale",
        scaled="targeted",
    ),
    Case(
        "low_rank_both_sum_reset",
        lorajax.low_rank,
        {
            "inner": optax.scale_by_adam(),
            "rank": 4,
            "side": "both",
            "align": "sum",
            "lora_plus_ratio": 4.0,
            "on_refresh": "reset",
            "refresh_every": 3,
        },
        schedule_arg="scale",
        scaled="targeted",
    ),
    Case(
        "lora_pro_sgd",
        lorajax.lora_pro,
        {},
        schedule_arg=None,
        params=adapter_params,
        shard_specs=adapter_shard_specs,
        float_state=False,
        notes="No argument scales the updates linearly; the inject check runs on traced "
        "eps/b1/b2 instead. Stateless apart from its count.",
    ),
    Case(
        "lora_pro_adam",
        lorajax.lora_pro,
        {"mode": "adam", "x_mode": "symmetry"},
        schedule_arg=None,
        params=adapter_params,
        shard_specs=adapter_shard_specs,
        notes="No argument scales the updates linearly (Adam normalises them).",
    ),
    Case(
        "lora_plus",
        lorajax.lora_plus,
        {"ratio": 4.0, "embedding_ratio": 0.5, "embedding_pattern": "^wide"},
        schedule_arg="ratio",
        # The ratio scales the b leaves, except those of the "embedding" (wide).
        scaled=lambda path, leaf: path.endswith("/b") and not path.startswith("wide"),
        params=adapter_params,
        shard_specs=adapter_shard_specs,
        float_state=False,
    ),
    Case(
        "freeze",
        lorajax.adapters.freeze,
        {},
        schedule_arg=None,
        params=adapter_params,
        param_kwargs=lambda params: {"mask": stripe_mask(params)},
        shard_specs=adapter_shard_specs,
        float_state=False,
        notes="No numeric argument; the inject check verifies it runs wrapped. Its mask "
        "is built from the params each run sees (a subset in the partition check).",
    ),
]

STEPS = 7  # crosses refreshes at steps 0, 3 and 6


def _targeted(case: Case, params: Any) -> Any:
    """True at the leaves the transform projects (every >= 2-D leaf here)."""
    if case.factory is lorajax.galore:
        return jax.tree.map(lambda x: x.ndim == 2, params)
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _scaled_leaves(case: Case, params: Any) -> Any:
    """True at the update leaves that ``case.schedule_arg`` multiplies."""
    if callable(case.scaled):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: bool(case.scaled(path_str(p), x)), params
        )
    if case.scaled == "targeted":
        return _targeted(case, params)
    return jax.tree.map(lambda x: True, params)


def check_jit(case: Case) -> None:
    params = case.params()
    grads = grad_stream(params, STEPS)
    eager, s1 = _run(case.make(params), params, grads, jit=False)
    jitted, s2 = _run(case.make(params), params, grads, jit=True)
    assert_trees_close(eager, jitted, atol=1e-5, rtol=1e-5)
    assert_trees_close(s1, s2, atol=1e-5, rtol=1e-5)


def check_inject_hyperparams(case: Case) -> None:
    """A scheduled factor equals the unscheduled run scaled by the schedule's value.

    Without a linear argument, the injected (traced) hyperparameters reproduce the plain
    run instead.
    """
    params = case.params()
    grads = grad_stream(params, STEPS)
    kwargs = case.kwargs_for(params)
    schedule = optax.linear_schedule(1.0, 0.25, STEPS)
    scheduled_kwargs = (
        kwargs if case.schedule_arg is None else kwargs | {case.schedule_arg: schedule}
    )
    tx = optax.inject_hyperparams(case.factory)(**scheduled_kwargs)
    scheduled, _ = _run(tx, params, grads)
    if case.schedule_arg is None:
        plain, _ = _run(case.make(params), params, grads)
        schedule = lambda t: 1.0  # noqa: E731
    else:
        plain, _ = _run(case.make(params, **{case.schedule_arg: 1.0}), params, grads)
    scaled = _scaled_leaves(case, params)
    for t, (u_s, u_p) in enumerate(zip(scheduled, plain)):
        factor = float(schedule(t))
        expect = jax.tree.map(lambda u, hit, f=factor: u * f if hit else u, u_p, scaled)
        assert_trees_close(u_s, expect, atol=1e-6, rtol=1e-5)
    # Under a jitted init, every int argument must be static (they size the state).
    bound = inspect.signature(case.factory).bind_partial(**kwargs)
    bound.apply_defaults()
    static = [
        k for k, v in bound.arguments.items() if isinstance(v, int) and not isinstance(v, bool)
    ]
    tx = optax.inject_hyperparams(case.factory, static_args=static)(**scheduled_kwargs)
    state = jax.jit(tx.init)(params)
    u, _ = jax.jit(tx.update)(grads[0], state, params)
    assert_trees_close(u, scheduled[0], atol=1e-6, rtol=1e-5)


def check_multisteps(case: Case) -> None:
    """MultiSteps over k micro-batches equals one step on their mean."""
    k = 2
    params = case.params()
    micro = grad_stream(params, 2 * STEPS)
    accumulated = optax.MultiSteps(case.make(params), every_k_schedule=k)
    got, _ = _run(accumulated, params, micro)
    # MultiSteps averages with Welford's update, acc + (g - acc) / n; so does the oracle.
    means = [
        jax.tree.map(lambda a, b: a + (b - a) / 2, micro[2 * i], micro[2 * i + 1])
        for i in range(STEPS)
    ]
    want, _ = _run(case.make(params), params, means)
    for i in range(STEPS):
        assert_trees_close(got[2 * i], jax.tree.map(jnp.zeros_like, want[i]), atol=0, rtol=0)
        assert_trees_close(got[2 * i + 1], want[i], atol=1e-6, rtol=1e-6)


def check_apply_if_finite(case: Case) -> None:
    """A NaN step leaves params and state untouched; the run then goes on as without it."""
    params = case.params()
    grads = grad_stream(params, STEPS)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[2])
    tx = optax.apply_if_finite(case.make(params), max_consecutive_errors=5)
    state = tx.init(params)
    step = jax.jit(tx.update)
    got = []
    for t, g in enumerate(grads):
        if t == 4:
            before = state.inner_state
            u, state = step(bad, state, params)
            assert not bool(state.last_finite)
            assert_trees_close(u, jax.tree.map(jnp.zeros_like, u), atol=0, rtol=0)
            assert_trees_close(state.inner_state, before, atol=0, rtol=0)
        u, state = step(g, state, params)
        got.append(u)
    want, _ = _run(case.make(params), params, grads)
    assert_trees_close(got, want, atol=1e-6, rtol=1e-6)


def check_chain_and_partition(case: Case) -> None:
    """Inside optax.partition, the transform's leaves match running it on them alone.

    Labels are given per top-level key (a prefix of the tree, so an adapter is labelled
    as a whole).
    """
    params = case.params()
    grads = grad_stream(params, STEPS)
    mine = {"tall", "stacked", "bias"}
    labels = {k: ("lorajax" if k in mine else "sgd") for k in params}
    tx = optax.partition({"lorajax": case.make(params), "sgd": optax.sgd(0.1)}, labels)
    got, _ = _run(optax.chain(optax.identity(), tx), params, grads)
    sub = {k: params[k] for k in mine}
    alone, _ = _run(case.make(sub), sub, [{k: g[k] for k in mine} for g in grads])
    for u, a, g in zip(got, alone, grads):
        assert_trees_close({k: u[k] for k in mine}, a, atol=1e-6, rtol=1e-6)
        sgd = jax.tree.map(lambda x: -0.1 * x, g["wide"])
        assert_trees_close(u["wide"], sgd, atol=0, rtol=1e-6)


def _floating_state_dtypes(state: Any) -> set[Any]:
    return {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}


def check_bf16_params_f32_state(case: Case) -> None:
    """bf16 params keep bf16 updates while every floating state leaf is f32."""
    params = case.params()
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    grads16 = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in grad_stream(params, 4)]
    got, state = _run(case.make(params16), params16, grads16)
    assert {x.dtype for x in jax.tree.leaves(got[-1])} == {jnp.dtype(jnp.bfloat16)}
    for s in (case.make(params16).init(params16), state):
        if case.float_state:
            assert _floating_state_dtypes(s) == {jnp.dtype(jnp.float32)}
        else:
            assert _floating_state_dtypes(s) <= {jnp.dtype(jnp.float32)}
    # The f32 pipeline on the same (bf16-rounded) gradients and params agrees to bf16
    # precision.
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
    grads32 = [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in grads16]
    want, _ = _run(case.make(params32), params32, grads32)
    for u16, u32 in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(want[-1])):
        u16 = np.asarray(u16, np.float32)
        u32 = np.asarray(u32, np.float32)
        assert np.linalg.norm(u16 - u32) <= 2e-2 * np.linalg.norm(u32) + 1e-6


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)


def check_init_from_shape_dtype_struct(case: Case) -> None:
    params = case.params()
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    real = case.make(params).init(params)
    direct = case.make(params).init(sds)
    traced = jax.eval_shape(case.make(params).init, sds)
    assert jax.tree.structure(direct) == jax.tree.structure(real)
    assert jax.tree.structure(traced) == jax.tree.structure(real)
    assert _abstract(direct) == _abstract(real)
    assert _abstract(traced) == _abstract(real)


def check_stable_state(case: Case) -> None:
    """Identical tree structure, shapes, dtypes and weak types after init and updates."""
    params = case.params()
    tx = case.make(params)
    state = tx.init(params)
    types0 = jax.tree.map(jax.typeof, state)
    step = jax.jit(tx.update)
    for g in grad_stream(params, 4):
        _, state = step(g, state, params)
        assert jax.tree.structure(state) == jax.tree.structure(types0)
        assert jax.tree.map(jax.typeof, state) == types0


def check_no_retrace(case: Case) -> None:
    chex.clear_trace_counter()
    params = case.params()
    tx = case.make(params)
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, s, p):
        return tx.update(g, s, p)

    for g in grad_stream(params, 3 * case.refresh_every + 1):
        _, state = step(g, state, params)


# --- 8 fake devices -------------------------------------------------------------------

_ALL_GATHER = re.compile(r"=\s*\w+\[([\d,]*)\][^\n]*?\ball-gather(?:-start)?\(")


def full_matrix_gathers(hlo: str, params: Any) -> list[str]:
    """All-gathers in ``hlo`` whose result has as many elements as a weight matrix.

    A weight is a leaf with at least two axes, or the kernel an adapter adapts; each
    matrix of a stacked leaf counts too. Skinny blocks (bases, sketches, coordinates,
    adapter factors) never have that size here.
    """
    sizes = set()
    for x in jax.tree.leaves(params, is_leaf=is_lora):
        if isinstance(x, LoRA):
            *batch, n, _ = x.a.shape
            matrix = n * x.b.shape[-1]
            sizes.update({matrix, matrix * int(np.prod(batch))})
        elif x.ndim >= 2:
            sizes.update({int(np.prod(x.shape)), int(np.prod(x.shape[-2:]))})
    found = []
    for dims in _ALL_GATHER.findall(hlo):
        size = int(np.prod([int(d) for d in dims.split(",")])) if dims else 1
        if size in sizes:
            found.append(dims)
    return found


def assert_scaled_close(actual, expected, tol=1e-5):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        y = np.asarray(y, np.float32)
        scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=tol * scale, rtol=tol)


def check_sharded(case: Case, axis_type: AxisType) -> None:
    """On 8 devices the results equal the unsharded run, the update keeps the params'
    sharding, and (unless documented) no all-gather moves a whole weight matrix."""
    params = case.params()
    specs = case.shard_specs(params)
    grads = grad_stream(params, STEPS)
    want, want_state = _run(case.make(params), params, grads)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        place = lambda tree: jax.tree.map(  # noqa: E731
            lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
        )
        sharded_params = place(params)
        tx = case.make(sharded_params)
        state = jax.jit(tx.init)(sharded_params)
        out_shardings = (jax.tree.map(lambda s: NamedSharding(mesh, s), specs), None)
        step = jax.jit(tx.update, out_shardings=out_shardings)
        got = []
        for g in grads:
            u, state = step(place(g), state, sharded_params)
            got.append(u)
        hlo = step.lower(place(grads[0]), state, sharded_params).compile().as_text()
    # Sharded contractions sum in another order, and the bases come from an SVD of those
    # sums: a refresh rotates each basis by float32 rounding, which Adam's 1/sqrt(v)
    # then rescales per coordinate. Measured across machines the two runs differ by up to
    # 2.2e-5 of a leaf's scale (side="both" with a reset); 1e-4 of that scale is still
    # four orders below any algorithmic difference (a wrong basis or ratio moves O(1)).
    assert_scaled_close(got, want, tol=1e-4)
    assert_scaled_close(state, want_state, tol=1e-4)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(got[-1])
    wrong = [
        path_str(path)
        for (path, u), spec in zip(leaves, treedef.flatten_up_to(specs))
        if u.sharding.spec != spec
    ]
    assert not wrong, f"updates not laid out like the params: {wrong}"
    big = full_matrix_gathers(hlo, params)
    if case.gathers_weights:
        assert big, "exact SVD is documented to gather; the HLO check found no gather"
    else:
        assert not big, f"all-gathers of W-sized arrays: {big}"

"""lorajax.galore against optax.contrib.galore, update for update."""

import jax
import jax.numpy as jnp
import optax
import pytest
from optax.contrib import GaLoreDimensionNumbers as DimNums

import lorajax
from tests.util import assert_trees_close, grad_stream


def _params():
    ks = jax.random.split(jax.random.key(3), 5)
    return {
        "square": jax.random.normal(ks[4], (24, 24)),  # a tie: optax projects the left side
        "tall": jax.random.normal(ks[0], (40, 24)),  # d_in >= d_out: left projection
        "wide": jax.random.normal(ks[1], (16, 36)),  # d_in < d_out: right projection
        "bias": jax.random.normal(ks[2], (36,)),  # 1-D: full-shape Adam
        "heads": jax.random.normal(ks[3], (20, 4, 6)),  # (d, heads, head_dim)
    }


DIMS = {
    "square": DimNums(),
    "tall": DimNums(),
    "wide": DimNums(),
    "bias": None,
    "heads": DimNums(reduction_axis=0, output_axis=(1, 2)),
}


def _compare(ours, theirs, params, steps=24, atol=1e-5):
    """Runs both optimizers on the same gradients, applying their own updates."""
    grads = grad_stream(params, steps, key=11)
    s1, s2 = ours.init(params), theirs.init(params)
    p1 = p2 = params
    f1, f2 = jax.jit(ours.update), jax.jit(theirs.update)
    for g in grads:
        u1, s1 = f1(g, s1, p1)
        u2, s2 = f2(g, s2, p2)
        assert_trees_close(u1, u2, atol=atol, rtol=atol)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert_trees_close(p1, p2, atol=atol, rtol=atol)
    return s1, s2


def test_matches_optax_over_refreshes_on_a_mixed_tree():
    # 24 steps with update_proj_gap=7 refresh at steps 0, 7, 14 and 21.
    kwargs = dict(learning_rate=3e-2, rank=5, update_proj_gap=7, weight_dimension_numbers=DIMS)
    s1, s2 = _compare(lorajax.galore(**kwargs), optax.contrib.galore(**kwargs), _params())
    # Same state sizes: Adam moments on (r, d_out) for tall, (d_in, r) for wide.
    mu1 = s1[0].inner_state.mu
    mu2 = s2[0].base_optimizer_state.mu
    assert jax.tree.map(jnp.shape, mu1) == jax.tree.map(jnp.shape, mu2)
    assert mu1["tall"].shape == (5, 24) and mu1["wide"].shape == (16, 5)
    assert mu1["heads"].shape == (20, 5)  # 20 x 24: right side


def test_matches_optax_with_weight_decay_mask_scale_and_base_optimizer():
    mask = {"square": True, "tall": True, "wide": False, "bias": False, "heads": True}
    kwargs = dict(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, 20),
        rank=3,
        update_proj_gap=5,
        scale=0.25,
        base_optimizer=optax.scale_by_adam(b1=0.8, b2=0.95),
        weight_decay=0.1,
        mask=mask,
        weight_dimension_numbers=DIMS,
    )
    _compare(lorajax.galore(**kwargs), optax.contrib.galore(**kwargs), _params(), steps=20)


def test_matches_optax_with_default_and_callable_dimension_numbers():
    params = _params()
    kwargs = dict(learning_rate=1e-2, rank=4, update_proj_gap=6)
    # Default: only 2-D leaves are projected (the 3-D one gets full-shape Adam).
    _compare(lorajax.galore(**kwargs), optax.contrib.galore(**kwargs), params, steps=13)
    # A single spec for every >= 2-D leaf, and a callable params -> pytree.
    single = {k: v for k, v in params.items() if k != "heads"}
    one = dict(kwargs, weight_dimension_numbers=DimNums())
    _compare(lorajax.galore(**one), optax.contrib.galore(**one), single, steps=8)
    fn = dict(kwargs, weight_dimension_numbers=lambda p: DIMS)
    _compare(lorajax.galore(**fn), optax.contrib.galore(**fn), params, steps=8)


def test_rank_is_clamped_like_optax():
    params = {"small": jnp.ones((6, 3)), "big": jnp.ones((30, 20))}
    kwargs = dict(learning_rate=1e-2, rank=8, update_proj_gap=4)
    s1, _ = _compare(lorajax.galore(**kwargs), optax.contrib.galore(**kwargs), params, steps=6)
    assert s1[0].projectors["small"].rank == 3


def test_extra_keywords_reach_low_rank():
    params = _params()
    grads = grad_stream(params, 1, key=2)[0]
    exact = lorajax.galore(1e-2, rank=4)
    sketched = lorajax.galore(1e-2, rank=4, basis="randomized_svd", power_iters=3)
    state = sketched.init(params)
    assert state[0].projectors["tall"].basis == "randomized_svd"
    assert state[0].projectors["tall"].power_iters == 3
    u1, _ = exact.update(grads, exact.init(params), params)
    u2, _ = sketched.update(grads, state, params)
    # Same subspace (the gradient is nearly low rank), reached without a full SVD.
    assert_trees_close(u1, u2, atol=1e-4, rtol=1e-3)
    with pytest.raises(TypeError, match="unknown keyword argument.*'basiss'"):
        lorajax.galore(1e-2, basiss="svd")

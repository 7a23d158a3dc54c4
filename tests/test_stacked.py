"""N-D leaves: stacked layers get one basis per layer; head layouts flatten correctly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from tests.util import assert_trees_close, lowrank_grad
from tests.util import run as _run

L, N, M, R = 3, 32, 24, 4


@pytest.mark.parametrize("basis", ["svd", "randomized_svd"])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_stacked_layers_equal_running_each_layer_alone(side, basis):
    grads = [lowrank_grad(jax.random.key(t), (L, N, M)) for t in range(5)]
    opts = dict(rank=R, side=side, basis=basis, refresh_every=2)
    stacked, state = _run(
        lorajax.low_rank(targets={"w": lorajax.MatrixSpec(batch_axes=(0,))}, **opts),
        {"w": jnp.zeros((L, N, M))},
        [{"w": g} for g in grads],
    )
    assert state.projectors["w"].layout.batch_shape == (L,)
    alone, _ = _run(
        lorajax.low_rank(**opts),
        {f"w{i}": jnp.zeros((N, M)) for i in range(L)},
        [{f"w{i}": g[i] for i in range(L)} for g in grads],
    )
    for s, a in zip(stacked, alone):
        assert_trees_close(s["w"], jnp.stack([a[f"w{i}"] for i in range(L)]), atol=1e-5)


def test_stacked_layers_get_independent_random_bases():
    tx = lorajax.low_rank(optax.sgd(1.0), rank=R, basis="random_orthogonal")
    state = tx.init({"w": jnp.zeros((L, N, M))})  # default: leading axis is a batch axis
    u, _ = lorajax.current_bases(state)["w"]
    assert u.shape == (L, N, R)
    for i in range(L):
        np.testing.assert_allclose(u[i].T @ u[i], np.eye(R), atol=1e-5)
    assert not np.allclose(u[0], u[1])


def test_head_layouts_equal_the_flattened_matrix():
    """(d, heads, head_dim) with in_axes=0, out_axes=(1, 2) is the (d, h*hd) matrix."""
    d, h, hd = 20, 4, 6
    grads = [lowrank_grad(jax.random.key(t), (d, h * hd)) for t in range(4)]
    opts = dict(rank=R, basis="svd", refresh_every=2)
    spec = lorajax.MatrixSpec(in_axes=0, out_axes=(1, 2))
    heads, _ = _run(
        lorajax.low_rank(targets={"q": spec}, **opts),
        {"q": jnp.zeros((d, h, hd))},
        [{"q": g.reshape(d, h, hd)} for g in grads],
    )
    flat, _ = _run(
        lorajax.low_rank(**opts), {"q": jnp.zeros((d, h * hd))}, [{"q": g} for g in grads]
    )
    for a, b in zip(heads, flat):
        assert_trees_close(a["q"].reshape(d, h * hd), b["q"])
    # The output projection (heads, head_dim, d): in_axes=(0, 1).
    out_spec = lorajax.MatrixSpec(in_axes=(0, 1), out_axes=2)
    grads_t = [g.T for g in grads]  # (h*hd, d)
    outs, _ = _run(
        lorajax.low_rank(targets={"o": out_spec}, **opts),
        {"o": jnp.zeros((h, hd, d))},
        [{"o": g.reshape(h, hd, d)} for g in grads_t],
    )
    flat_t, _ = _run(
        lorajax.low_rank(**opts), {"o": jnp.zeros((h * hd, d))}, [{"o": g} for g in grads_t]
    )
    for a, b in zip(outs, flat_t):
        assert_trees_close(a["o"].reshape(h * hd, d), b["o"])


def test_axes_in_any_order():
    """A transposed kernel (d_out, d_in) with in_axes=1 equals the (d_in, d_out) one."""
    grads = [lowrank_grad(jax.random.key(t), (N, M)) for t in range(3)]
    opts = dict(rank=R, basis="svd", side="left")
    normal, _ = _run(lorajax.low_rank(**opts), {"w": jnp.zeros((N, M))}, [{"w": g} for g in grads])
    spec = lorajax.MatrixSpec(in_axes=1, out_axes=0)
    flipped, _ = _run(
        lorajax.low_rank(targets={"w": spec}, **opts),
        {"w": jnp.zeros((M, N))},
        [{"w": g.T} for g in grads],
    )
    for a, b in zip(normal, flipped):
        assert_trees_close(a["w"], b["w"].T)

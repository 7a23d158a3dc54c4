"""Shared helpers for the tests: parameter trees, gradient streams, comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mixed_params(key=0, dtype=jnp.float32):
    """2-D with d_in >= d_out and d_in < d_out, 1-D, and 3-D stacked leaves."""
    ks = jax.random.split(jax.random.key(key), 4)
    return {
        "tall": jax.random.normal(ks[0], (96, 32), dtype),
        "wide": jax.random.normal(ks[1], (32, 80), dtype),
        "bias": jax.random.normal(ks[2], (80,), dtype),
        "stacked": jax.random.normal(ks[3], (3, 48, 64), dtype),
    }


def lowrank_grad(key, shape, dtype=jnp.float32, rank=6, noise=1e-3):
    """A gradient with a clearly decaying spectrum (well-separated singular values)."""
    if len(shape) < 2:
        return jax.random.normal(key, shape, dtype)
    k1, k2, k3 = jax.random.split(key, 3)
    *batch, n, m = shape
    a = jax.random.normal(k1, (*batch, n, rank))
    b = jax.random.normal(k2, (*batch, rank, m))
    s = 2.0 ** -jnp.arange(rank, dtype=jnp.float32)
    g = jnp.einsum("...nr,r,...rm->...nm", a, s, b)
    return (g + noise * jax.random.normal(k3, shape)).astype(dtype)


def grad_stream(params, steps, key=1):
    """``steps`` gradient trees shaped like ``params``, with decaying spectra."""
    out = []
    for t in range(steps):
        k = jax.random.fold_in(jax.random.key(key), t)
        leaves, treedef = jax.tree.flatten(params)
        ks = jax.random.split(k, len(leaves))
        out.append(
            treedef.unflatten([lowrank_grad(kk, x.shape, x.dtype) for kk, x in zip(ks, leaves)])
        )
    return out


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    assert ta == tb, f"structures differ: {ta} vs {tb}"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=rtol
        )


def tree_bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(tx, params, grads, jit=True):
    """Applies ``tx`` to a gradient stream at fixed params; returns updates and final state."""
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    updates_seq = []
    for g in grads:
        updates, state = step(g, state, params)
        updates_seq.append(updates)
    return updates_seq, state

"""Every lorajax code path under strict dtype promotion, with f32 and bf16 params.

Strict promotion turns any implicit f32/bf16 (or int/float) mixing into an error, so a
silent upcast or downcast inside lorajax cannot hide. The inner transforms used here are
strict-clean themselves (optax's Adam is not: see conftest.py).
"""

import itertools

import jax
import jax.numpy as jnp
import optax
import pytest

import lorajax
from tests.util import grad_stream, mixed_params


def _inner():
    """A second moment (nu, rotated quadratically) and a momentum (trace, linearly)."""
    return optax.chain(optax.scale_by_rms(), optax.trace(decay=0.9))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_paths_are_strict_clean(dtype):
    params = mixed_params(dtype=jnp.dtype(dtype))
    grads = grad_stream(params, 4)
    combos = itertools.product(
        ["svd", "randomized_svd", "random", "random_orthogonal"],
        [("left", "lora_pro"), ("right", "lora_pro"), ("both", "lora_pro"), ("both", "sum")],
    )
    with jax.numpy_dtype_promotion("strict"):
        for i, (basis, (side, align)) in enumerate(combos):
            on_refresh = ("rotate", "reset")[i % 2]
            ratio = 2.0 if side == "both" else 1.0
            tx = optax.chain(
                lorajax.low_rank(
                    _inner(),
                    rank=3,
                    side=side,
                    basis=basis,
                    align=align,
                    on_refresh=on_refresh,
                    refresh_every=2,
                    lora_plus_ratio=ratio,
                    scale=0.5,
                ),
                optax.add_decayed_weights(1e-2),
                optax.scale_by_learning_rate(1e-2),
            )
            state = tx.init(params)
            step = jax.jit(tx.update)
            for g in grads:
                updates, state = step(g, state, params)
            assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))

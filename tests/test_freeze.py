"""freeze: frozen a and masked b entries are exactly immune when it comes last."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.adapters import LoRA

N, M, R = 10, 8, 3


def _adapters():
    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    return {
        "fa": LoRA(
            a=jax.random.normal(ka, (N, R)) / np.sqrt(N),
            b=jnp.zeros((R, M)),
            scale=1.0,
            alpha=R,
            rank=R,
            frozen_a=True,
        ),
        "plain": LoRA(
            a=jax.random.normal(kb, (M, R)) / np.sqrt(M),
            b=jnp.zeros((R, M)),
            magnitude=jnp.ones(M),
            scale=1.0,
            alpha=R,
            rank=R,
        ),
        "head": jax.random.normal(kc, (M,)),
    }


def _mask():
    keep = (np.arange(R * M).reshape(R, M) % 3) != 0
    return {"fa": jnp.asarray(keep), "plain": None, "head": None}


def _loss(ad, x, y):
    h = x @ (jnp.eye(N, M) + ad["fa"].delta())
    out = h @ (jnp.eye(M) + ad["plain"].delta()) * ad["plain"].magnitude[None, :]
    return jnp.mean((out + ad["head"][None, :] - y) ** 2)


def _train(tx, steps=30):
    kx, ky = jax.random.split(jax.random.key(1))
    x, y = jax.random.normal(kx, (32, N)), jax.random.normal(ky, (32, M))
    params = _adapters()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_frozen_and_masked_entries_never_move_when_freeze_is_last():
    start = _adapters()
    keep = np.asarray(_mask()["fa"])
    got = _train(optax.chain(optax.adamw(1e-2, weight_decay=0.1), lorajax.adapters.freeze(_mask())))
    np.testing.assert_array_equal(np.asarray(got["fa"].a), np.asarray(start["fa"].a))
    b = np.asarray(got["fa"].b)
    assert np.all(b[~keep] == 0.0)
    assert np.all(b[keep] != 0.0)
    # Everything else trains.
    assert not np.allclose(got["plain"].a, start["plain"].a)
    assert np.all(np.asarray(got["plain"].b) != 0.0)
    assert not np.allclose(got["plain"].magnitude, start["plain"].magnitude)
    assert not np.allclose(got["head"], start["head"])


def test_without_freeze_or_before_weight_decay_they_move():
    start = _adapters()
    keep = np.asarray(_mask()["fa"])
    free = _train(optax.adamw(1e-2, weight_decay=0.1), steps=3)
    assert np.any(np.asarray(free["fa"].b)[~keep] != 0.0)
    assert not np.array_equal(np.asarray(free["fa"].a), np.asarray(start["fa"].a))
    # Placed first, weight decay (which reads the params) still shrinks the frozen a.
    early = _train(
        optax.chain(lorajax.adapters.freeze(_mask()), optax.adamw(1e-2, weight_decay=0.1)), 3
    )
    assert not np.array_equal(np.asarray(early["fa"].a), np.asarray(start["fa"].a))


def test_without_a_mask_only_frozen_a_is_zeroed():
    ad = _adapters()
    grads = jax.tree.map(jnp.ones_like, ad)
    tx = lorajax.adapters.freeze()
    out, _ = tx.update(grads, tx.init(ad), ad)
    assert np.all(np.asarray(out["fa"].a) == 0.0)
    assert out["fa"].b is grads["fa"].b
    assert out["plain"] is grads["plain"]
    assert out["head"] is grads["head"]


def test_masked_b_is_exact_even_for_non_finite_updates():
    ad = _adapters()
    grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), ad)
    tx = lorajax.adapters.freeze(_mask())
    keep = np.asarray(_mask()["fa"])
    for update in (tx.update, jax.jit(tx.update)):
        out, _ = update(grads, tx.init(ad), ad)
        b = np.asarray(out["fa"].b)
        assert np.all(b[~keep] == 0.0) and np.all(np.isinf(b[keep]))


def test_inside_a_partition():
    ad = _adapters()
    labels = {"fa": "adapters", "plain": "sgd", "head": "sgd"}
    tx = optax.partition(
        {"adapters": lorajax.adapters.freeze(_mask()), "sgd": optax.sgd(1.0)}, labels
    )
    grads = jax.tree.map(jnp.ones_like, ad)
    out, _ = tx.update(grads, tx.init(ad), ad)
    keep = np.asarray(_mask()["fa"])
    assert np.all(np.asarray(out["fa"].a) == 0.0)
    np.testing.assert_array_equal(np.asarray(out["fa"].b), keep.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["head"]), -np.ones(M, np.float32))


def test_mask_errors():
    ad = _adapters()
    keep = _mask()["fa"]
    bad_masks = {
        "structure": ({"fa": keep, "other": None}, "structure of the adapters"),
        "shape": ({"fa": keep[:, :2], "plain": None, "head": None}, r"has shape \(3, 2\)"),
        "dtype": ({"fa": keep.astype(jnp.float32), "plain": None, "head": None}, "boolean"),
        "not a lora": ({"fa": keep, "plain": None, "head": jnp.ones(M, bool)}, "not a LoRA"),
    }
    for mask, message in bad_masks.values():
        tx = lorajax.adapters.freeze(mask)
        with pytest.raises(ValueError, match=message):
            tx.init(ad)
    with pytest.raises(TypeError, match="must hold boolean arrays"):
        lorajax.adapters.freeze({"fa": ad["fa"]})
    with pytest.raises(TypeError, match="must hold boolean arrays"):
        lorajax.adapters.freeze({"fa": True})

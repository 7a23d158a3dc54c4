"""LoRA+: exactly the b updates are scaled; embeddings get their own factor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.adapters import LoRA


def _lora(key, n, m, r=2, magnitude=False, dtype=jnp.float32):
    ka, kb, km = jax.random.split(jax.random.key(key), 3)
    return LoRA(
        a=jax.random.normal(ka, (n, r), dtype),
        b=jax.random.normal(kb, (r, m), dtype),
        magnitude=jax.random.normal(km, (m,), dtype) if magnitude else None,
        scale=2.0,
        alpha=2.0 * r,
        rank=r,
    )


def _tree(dtype=jnp.float32):
    return {
        "embed_tokens": _lora(0, 10, 6, dtype=dtype),
        "wte": jax.random.normal(jax.random.key(1), (10, 6), dtype),
        "layers": {
            "q_proj": _lora(2, 6, 4, magnitude=True, dtype=dtype),
            "bias": jax.random.normal(jax.random.key(3), (4,), dtype),
            "frozen": None,
        },
    }


def _apply(tx, updates):
    out, _ = tx.update(updates, tx.init(updates))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exactly_the_b_leaves_are_multiplied(dtype):
    dt = jnp.dtype(dtype)
    updates = _tree(dt)
    out = _apply(lorajax.lora_plus(3.3), updates)  # 3.3 is not a bfloat16 number
    for name in ("embed_tokens",):
        u, o = updates[name], out[name]
        assert o.a is u.a
        want = (np.asarray(u.b, np.float32) * np.float32(3.3)).astype(dt)
        np.testing.assert_array_equal(np.asarray(o.b), want)
    q, oq = updates["layers"]["q_proj"], out["layers"]["q_proj"]
    assert oq.a is q.a and oq.magnitude is q.magnitude
    np.testing.assert_array_equal(
        np.asarray(oq.b), (np.asarray(q.b, np.float32) * np.float32(3.3)).astype(dt)
    )
    assert oq.b.dtype == dt
    assert out["wte"] is updates["wte"]
    assert out["layers"]["bias"] is updates["layers"]["bias"]
    assert out["layers"]["frozen"] is None
    assert jax.tree.structure(out) == jax.tree.structure(updates)


def test_embeddings_get_their_own_ratio():
    updates = _tree()
    out = _apply(lorajax.lora_plus(16.0, embedding_ratio=0.1), updates)
    emb, oemb = updates["embed_tokens"], out["embed_tokens"]
    np.testing.assert_array_equal(oemb.a, emb.a * np.float32(0.1))
    np.testing.assert_array_equal(oemb.b, emb.b * np.float32(0.1))
    np.testing.assert_array_equal(out["wte"], updates["wte"] * np.float32(0.1))
    q, oq = updates["layers"]["q_proj"], out["layers"]["q_proj"]
    np.testing.assert_array_equal(oq.b, q.b * np.float32(16.0))
    assert oq.a is q.a
    assert out["layers"]["bias"] is updates["layers"]["bias"]
    # A custom pattern: only the q projection counts as an embedding now.
    out = _apply(
        lorajax.lora_plus(16.0, embedding_ratio=0.5, embedding_pattern=r"q_proj$"), updates
    )
    np.testing.assert_array_equal(out["layers"]["q_proj"].a, q.a * np.float32(0.5))
    np.testing.assert_array_equal(out["layers"]["q_proj"].magnitude, q.magnitude * np.float32(0.5))
    np.testing.assert_array_equal(out["embed_tokens"].b, emb.b * np.float32(16.0))
    assert out["wte"] is updates["wte"]


def test_without_embedding_ratio_embeddings_are_ordinary():
    updates = _tree()
    out = _apply(lorajax.lora_plus(4.0), updates)
    np.testing.assert_array_equal(out["embed_tokens"].b, updates["embed_tokens"].b * 4.0)
    assert out["embed_tokens"].a is updates["embed_tokens"].a


def test_chain_equals_adam_with_a_larger_learning_rate_on_b():
    lr, ratio, b1, b2, eps = 1e-2, 16.0, 0.9, 0.999, 1e-8
    params = {"w": _lora(5, 8, 5), "c": jnp.zeros(5)}
    tx = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        lorajax.lora_plus(ratio),
        optax.scale_by_learning_rate(lr),
    )
    state = tx.init(params)
    start = {"a": params["w"].a, "b": params["w"].b, "c": params["c"]}
    leaves = {k: np.asarray(v, np.float64) for k, v in start.items()}
    mom = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in leaves.items()}
    rates = {"a": lr, "b": lr * ratio, "c": lr}
    for t in range(1, 6):
        leaves_t, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(100 + t), len(leaves_t))
        grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves_t)])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        g = {"a": grads["w"].a, "b": grads["w"].b, "c": grads["c"]}
        for k in leaves:
            gk = np.asarray(g[k], np.float64)
            m, v = mom[k]
            m = b1 * m + (1 - b1) * gk
            v = b2 * v + (1 - b2) * gk**2
            mom[k] = (m, v)
            step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            leaves[k] = leaves[k] - rates[k] * step
    for k, got in (("a", params["w"].a), ("b", params["w"].b), ("c", params["c"])):
        np.testing.assert_allclose(np.asarray(got, np.float64), leaves[k], atol=1e-5, rtol=1e-5)


def test_scheduled_ratio_under_jit():
    updates = _tree()
    tx = optax.inject_hyperparams(lorajax.lora_plus)(ratio=optax.linear_schedule(2.0, 4.0, 2))
    state = tx.init(updates)
    step = jax.jit(tx.update)
    for factor in (2.0, 3.0, 4.0):
        out, state = step(updates, state)
        q = updates["layers"]["q_proj"]
        np.testing.assert_allclose(out["layers"]["q_proj"].b, q.b * factor, rtol=1e-6)
        np.testing.assert_array_equal(out["layers"]["q_proj"].a, q.a)


def test_strict_dtype_promotion():
    updates = _tree(jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):
        tx = optax.inject_hyperparams(lorajax.lora_plus, hyperparam_dtype=jnp.float32)(
            ratio=16.0, embedding_ratio=0.1
        )
        out, _ = jax.jit(tx.update)(updates, tx.init(updates))
    assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


def test_errors():
    for bad in (0.0, -16.0):
        with pytest.raises(ValueError, match="`ratio` must be > 0"):
            lorajax.lora_plus(bad)
    with pytest.raises(TypeError, match="`ratio` must be a positive number"):
        lorajax.lora_plus("16")
    with pytest.raises(ValueError, match="`embedding_ratio` must be > 0"):
        lorajax.lora_plus(16.0, embedding_ratio=0.0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lorajax.lora_plus(16.0, embedding_ratio=0.1, embedding_pattern="embed(")
    with pytest.raises(TypeError, match="`embedding_pattern` must be a regular expression"):
        lorajax.lora_plus(16.0, embedding_pattern=None)

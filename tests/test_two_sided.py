"""Two-sided projection: the gradient view of LoRA, LoRA-Pro alignment, LoRA+ ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax

N, M, R = 14, 10, 3


def _setup(key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    w0 = jax.random.normal(k1, (N, M))
    x = jax.random.normal(k2, (32, N))
    y = jax.random.normal(k3, (32, M))
    return w0, x, y


def _loss(w, x, y):
    return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))


def _update(grad, **kwargs):
    """One low_rank step with an identity inner optimizer; returns update and (U, V)."""
    tx = lorajax.low_rank(optax.identity(), rank=R, side="both", **kwargs)
    state = tx.init({"w": grad})
    update, state = tx.update({"w": grad}, state)
    u, v = lorajax.current_bases(state)["w"]
    return np.asarray(update["w"], np.float64), np.asarray(u, np.float64), np.asarray(v, np.float64)


@pytest.mark.parametrize("basis", ["random_orthogonal", "randomized_svd", "svd"])
def test_gradient_view_equals_first_order_change_of_explicit_lora(basis):
    """align="sum": the update is -(d/dη) of (a - η g_a)(b - η g_b) at η = 0, a=U, b=Vᵀ."""
    w0, x, y = _setup()
    # The bases are chosen at the first step; get them, then build explicit factors.
    g_probe = jax.grad(_loss)(w0, x, y)
    _, u, v = _update(g_probe, align="sum", basis=basis)
    a, b = jnp.asarray(u, jnp.float32), jnp.asarray(v.T, jnp.float32)
    base = w0 - a @ b  # so that W = base + a b is the same point as w0

    def lora_loss(a, b):
        return _loss(base + a @ b, x, y)

    g_a, g_b = jax.grad(lora_loss, argnums=(0, 1))(a, b)
    _, first_order = jax.jvp(lambda eta: (a - eta * g_a) @ (b - eta * g_b), (0.0,), (1.0,))
    update, _, _ = _update(g_probe, align="sum", basis=basis)
    np.testing.assert_allclose(-update, np.asarray(first_order), atol=1e-5, rtol=1e-5)
    # ... and it is U Uᵀ G + G V Vᵀ.
    g = np.asarray(g_probe, np.float64)
    np.testing.assert_allclose(update, u @ u.T @ g + g @ v @ v.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("basis", ["random", "random_orthogonal", "randomized_svd", "svd"])
def test_lora_pro_is_the_tangent_space_projection(basis):
    g = np.asarray(jax.random.normal(jax.random.key(5), (N, M)), np.float64)
    update, u, v = _update(jnp.asarray(g, jnp.float32), align="lora_pro", basis=basis)
    # Orthonormal bases (random draws are orthonormalised for LoRA-Pro).
    np.testing.assert_allclose(u.T @ u, np.eye(R), atol=1e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(R), atol=1e-5)
    pu, pv = u @ u.T, v @ v.T
    np.testing.assert_allclose(update, pu @ g + g @ pv - pu @ g @ pv, atol=1e-5, rtol=1e-5)
    # Brute force: the least-squares fit of G by U Y + Z Vᵀ over all Y (r x m), Z (n x r).
    # vec(U Y) = (I_m ⊗ U) vec(Y) and vec(Z Vᵀ) = (V ⊗ I_n) vec(Z), column-major vec.
    system = np.concatenate([np.kron(np.eye(M), u), np.kron(v, np.eye(N))], axis=1)
    coef, *_ = np.linalg.lstsq(system, g.reshape(-1, order="F"), rcond=None)
    best = (system @ coef).reshape(N, M, order="F")
    np.testing.assert_allclose(update, best, atol=1e-5, rtol=1e-5)
    # It is the best such fit: a perturbation inside the tangent space does worse.
    y_dir = np.random.default_rng(0).normal(size=(R, M))
    assert np.linalg.norm(g - update) < np.linalg.norm(g - update - 1e-2 * u @ y_dir)


@pytest.mark.parametrize("align", ["lora_pro", "sum"])
def test_lora_plus_ratio_scales_exactly_the_u_block(align):
    g = jax.random.normal(jax.random.key(9), (N, M))
    base, u, _ = _update(g, align=align, basis="svd")
    scaled, _, _ = _update(g, align=align, basis="svd", lora_plus_ratio=16.0)
    gn = np.asarray(g, np.float64)
    # The b block U (Uᵀ G) is multiplied by λ = 16; the rest is unchanged.
    np.testing.assert_allclose(scaled - base, 15.0 * u @ u.T @ gn, atol=1e-4, rtol=1e-5)


def test_lora_plus_ratio_with_adam_inner_is_linear_in_ratio():
    """With Adam the inner steps do not depend on λ, so the update is affine in λ."""
    params = {"w": jnp.zeros((N, M))}
    grads = [jax.random.normal(jax.random.key(i), (N, M)) for i in range(4)]

    def last_update(ratio):
        tx = lorajax.low_rank(rank=R, side="both", basis="random", lora_plus_ratio=ratio)
        state = tx.init(params)
        for g in grads:
            update, state = tx.update({"w": g}, state)
        return np.asarray(update["w"], np.float64)

    u1, u2, u5 = last_update(1.0), last_update(2.0), last_update(5.0)
    np.testing.assert_allclose(u5 - u1, 4.0 * (u2 - u1), atol=1e-5, rtol=1e-5)
    assert np.linalg.norm(u2 - u1) > 1e-3

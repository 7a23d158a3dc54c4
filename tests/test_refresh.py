"""on_refresh policies: rotate maps moments exactly; keep and reset as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax

N, M, R, T = 24, 16, 3, 3
BETA = 0.8


def _grads(steps):
    return [jax.random.normal(jax.random.key(100 + t), (N, M)) for t in range(steps)]


def _trajectory(on_refresh, side, basis, inner):
    """States and bases just before and just after the refresh at step T."""
    tx = lorajax.low_rank(
        inner, rank=R, side=side, basis=basis, refresh_every=T, on_refresh=on_refresh
    )
    state = tx.init({"w": jnp.zeros((N, M))})
    grads = _grads(T + 1)
    for g in grads[:T]:
        _, state = tx.update({"w": g}, state)
    before = state
    _, after = tx.update({"w": grads[T]}, state)
    old = [
        None if x is None else np.asarray(x, np.float64) for x in lorajax.current_bases(before)["w"]
    ]
    new = [
        None if x is None else np.asarray(x, np.float64) for x in lorajax.current_bases(after)["w"]
    ]
    return before, after, old, new, np.asarray(grads[T], np.float64)


def _coords(side, u, v, g):
    if side == "left":
        return u.T @ g
    if side == "right":
        return g @ v
    return lorajax.TwoSidedCoords(a=g @ v, b=u.T @ g)


def _np(x):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), x)


BASES = ["random", "random_orthogonal", "svd", "randomized_svd"]


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_rotate_maps_the_first_moment_exactly(side, basis):
    inner = optax.ema(BETA, debias=False)  # m ← β m + (1 - β) c
    before, after, (uo, vo), (un, vn), g = _trajectory("rotate", side, basis, inner)
    m_old = _np(before.inner_state.ema["w"])
    m_new = _np(after.inner_state.ema["w"])
    c = _coords(side, un, vn, g)

    def left(m):  # M ← U_newᵀ U_old M
        return un.T @ uo @ m

    def right(m):  # M ← M V_oldᵀ V_new
        return m @ vo.T @ vn

    if side == "left":
        rotated = left(m_old)
    elif side == "right":
        rotated = right(m_old)
    else:
        rotated = lorajax.TwoSidedCoords(a=right(m_old.a), b=left(m_old.b))
    want = jax.tree.map(lambda r, cc: BETA * r + (1 - BETA) * cc, rotated, c)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5), m_new, want)
    # The refresh really moved the basis (else the test could not tell the policies apart).
    moved = uo if uo is not None else vo
    assert not np.allclose(moved, un if uo is not None else vn)


@pytest.mark.parametrize("basis", ["random", "svd"])
def test_rotate_maps_adams_second_moment_by_squared_overlaps(basis):
    b1, b2 = 0.9, 0.99
    inner = optax.scale_by_adam(b1=b1, b2=b2)
    before, after, (uo, _), (un, _), g = _trajectory("rotate", "left", basis, inner)
    q = un.T @ uo
    c = un.T @ g
    nu_old = np.asarray(before.inner_state.nu["w"], np.float64)
    mu_old = np.asarray(before.inner_state.mu["w"], np.float64)
    want_nu = b2 * (q * q) @ nu_old + (1 - b2) * c**2
    want_mu = b1 * q @ mu_old + (1 - b1) * c
    np.testing.assert_allclose(after.inner_state.nu["w"], want_nu, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(after.inner_state.mu["w"], want_mu, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(after.inner_state.nu["w"]) >= 0)


@pytest.mark.parametrize("side", ["left", "both"])
def test_keep_leaves_the_moments_in_place(side):
    inner = optax.ema(BETA, debias=False)
    before, after, _, (un, vn), g = _trajectory("keep", side, "svd", inner)
    want = jax.tree.map(
        lambda m, cc: BETA * m + (1 - BETA) * cc,
        _np(before.inner_state.ema["w"]),
        _coords(side, un, vn, g),
    )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
        _np(after.inner_state.ema["w"]),
        want,
    )


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_reset_zeroes_the_projected_moments_but_not_the_others(side):
    params = {"w": jnp.zeros((N, M)), "b": jnp.zeros(M)}
    tx = lorajax.low_rank(
        optax.scale_by_adam(), rank=R, side=side, basis="svd", refresh_every=T, on_refresh="reset"
    )
    state = tx.init(params)
    for t, g in enumerate(_grads(T)):
        _, state = tx.update({"w": g, "b": jnp.full((M,), 0.1 * (t + 1))}, state)
    b_mu, b_nu = state.inner_state.mu["b"], state.inner_state.nu["b"]
    g = _grads(T + 1)[T]
    _, after = tx.update({"w": g, "b": jnp.zeros(M)}, state)
    un, vn = lorajax.current_bases(after)["w"]
    c = _np(_coords(side, un, vn, np.asarray(g, np.float64)))
    # Zeroed, then one Adam update: mu = (1 - b1) c, nu = (1 - b2) c².
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, 0.1 * y, atol=1e-5, rtol=1e-5),
        _np(after.inner_state.mu["w"]),
        c,
    )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, 0.001 * y**2, atol=1e-6, rtol=1e-5),
        _np(after.inner_state.nu["w"]),
        c,
    )
    # The bias is not projected: its moments just decay.
    np.testing.assert_allclose(after.inner_state.mu["b"], 0.9 * b_mu, rtol=1e-6)
    np.testing.assert_allclose(after.inner_state.nu["b"], 0.999 * b_nu, rtol=1e-6)
    assert int(after.inner_state.count) == T + 1  # the step count is not reset


def test_rotate_finds_moments_inside_wrapped_inner_optimizers():
    inner = optax.chain(
        optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.trace)(decay=BETA)
    )
    tx = lorajax.low_rank(inner, rank=R, basis="random", refresh_every=T, on_refresh="rotate")
    state = tx.init({"w": jnp.zeros((N, M))})
    for g in _grads(T):
        _, state = tx.update({"w": g}, state)
    uo = np.asarray(lorajax.current_bases(state)["w"][0], np.float64)
    m_old = np.asarray(state.inner_state[1].inner_state.trace["w"], np.float64)
    g = _grads(T + 1)[T]
    _, after = tx.update({"w": g}, state)
    un = np.asarray(lorajax.current_bases(after)["w"][0], np.float64)
    c = un.T @ np.asarray(g, np.float64)
    c = c * min(1.0, 1.0 / np.linalg.norm(c))  # clip_by_global_norm(1.0)
    want = BETA * (un.T @ uo @ m_old) + c  # optax.trace: t ← decay t + g
    np.testing.assert_allclose(after.inner_state[1].inner_state.trace["w"], want, atol=1e-5)

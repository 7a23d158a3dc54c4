"""Basis families: random bases are key-only and reproducible; randomized SVD is accurate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from tests.util import tree_bytes

N, M, R = 48, 20, 4


def _with_spectrum(n, m, spectrum, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    d = min(n, m)
    a = jnp.linalg.qr(jax.random.normal(k1, (n, d)))[0]
    b = jnp.linalg.qr(jax.random.normal(k2, (m, d)))[0]
    return a @ jnp.diag(spectrum) @ b.T


def test_random_basis_state_holds_a_key_not_the_matrix():
    params = {"w": jnp.zeros((N, M))}  # left side (m <= n): coordinates (r, m)
    random = lorajax.low_rank(optax.scale_by_adam(), rank=R, basis="random").init(params)
    stored = lorajax.low_rank(optax.scale_by_adam(), rank=R, basis="svd").init(params)
    assert random.projectors["w"].u is None and random.projectors["w"].v is None
    adam = 4 + 2 * R * M * 4  # count + mu + nu of shape (r, m), f32
    assert tree_bytes(random) == 4 + 8 + adam  # count, uint32[2] key, Adam
    assert tree_bytes(stored) == tree_bytes(random) + N * R * 4  # plus U: (n, r)
    both = lorajax.low_rank(rank=R, side="both", basis="random_orthogonal").init(params)
    assert tree_bytes(both) == 4 + 8 + 4 + 2 * R * (N + M) * 4  # LoRA-sized moments only


def _bases_over_time(seed, steps=7, refresh_every=3, basis="random"):
    tx = lorajax.low_rank(
        optax.sgd(1.0), rank=R, basis=basis, refresh_every=refresh_every, seed=seed
    )
    params = {"w": jnp.zeros((N, M))}
    state = tx.init(params)
    out = []
    for _ in range(steps):
        _, state = tx.update({"w": jnp.ones((N, M))}, state)
        out.append(np.asarray(lorajax.current_bases(state)["w"][0]))
    return out


@pytest.mark.parametrize("basis", ["random", "random_orthogonal"])
def test_random_basis_is_reproducible_and_changes_at_each_refresh(basis):
    a = _bases_over_time(0, basis=basis)
    b = _bases_over_time(0, basis=basis)
    c = _bases_over_time(1, basis=basis)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], c[0])
    # Refreshes at steps 0, 3 and 6: constant within a period, new at each refresh.
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[1], a[2])
    assert not np.allclose(a[2], a[3])
    np.testing.assert_array_equal(a[3], a[5])
    assert not np.allclose(a[5], a[6])


def test_random_basis_regeneration_is_what_the_update_uses():
    """The update with an identity inner is exactly P Pᵀ G for the regenerated P."""
    g = jax.random.normal(jax.random.key(2), (N, M))
    tx = lorajax.low_rank(optax.identity(), rank=R, basis="random", side="left")
    update, state = tx.update({"w": g}, tx.init({"w": g}))
    p = np.asarray(lorajax.current_bases(state)["w"][0], np.float64)
    np.testing.assert_allclose(update["w"], p @ p.T @ np.asarray(g), atol=1e-5, rtol=1e-5)


def test_gaussian_basis_is_unbiased_like_the_gradient_view_of_lora():
    """Entries are N(0, 1/r), so the projected gradient P Pᵀ G is unbiased: E = G."""
    g = jax.random.normal(jax.random.key(4), (16, 8))
    tx = lorajax.low_rank(optax.identity(), rank=R, basis="random", side="left")

    @jax.jit
    def projected(seed):
        state = tx.init({"w": g})
        state = state._replace(key=jax.random.key_data(jax.random.key(seed)))
        return tx.update({"w": g}, state)[0]["w"]

    mean = jnp.mean(jax.vmap(projected)(jnp.arange(4000)), axis=0)
    assert float(jnp.linalg.norm(mean - g) / jnp.linalg.norm(g)) < 0.06
    p = lorajax.current_bases(tx.init({"w": jnp.zeros((4096, 8))}))["w"][0]
    assert abs(float(jnp.std(p)) * R**0.5 - 1.0) < 0.02


@pytest.mark.parametrize(
    "spectrum",
    [lambda i: 1.0 / i, lambda i: 0.95**i, lambda i: i**-2.0],
    ids=["1/i", "0.95^i", "i^-2"],
)
def test_randomized_svd_reaches_the_exact_subspace_on_decaying_spectra(spectrum):
    n, m, r = 256, 128, 16
    g = _with_spectrum(n, m, spectrum(jnp.arange(1.0, m + 1)))
    u_exact, s_exact, vt_exact = jnp.linalg.svd(g, full_matrices=False)
    u, s, v = jax.jit(lambda g: lorajax.randomized_svd(g, r, key=jax.random.key(7)))(g)
    assert float(lorajax.subspace_overlap(u_exact[:, :r], u)) >= 0.99
    assert float(lorajax.subspace_overlap(vt_exact[:r].T, v)) >= 0.99
    np.testing.assert_allclose(s, s_exact[:r], rtol=2e-2)
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-5)


def test_randomized_svd_is_batched():
    spectrum = 0.8 ** jnp.arange(24.0)
    g = jnp.stack([_with_spectrum(40, 24, spectrum, key=k) for k in range(3)])
    u, _, v = lorajax.randomized_svd(g, 4, key=jax.random.key(0))
    assert u.shape == (3, 40, 4) and v.shape == (3, 24, 4)
    for i in range(3):
        exact = jnp.linalg.svd(g[i])[0][:, :4]
        assert float(lorajax.subspace_overlap(exact, u[i])) > 0.999


def test_randomized_svd_warm_start_uses_the_previous_basis():
    n, m, r = 128, 96, 8
    g = _with_spectrum(n, m, jnp.arange(1.0, m + 1) ** -0.5)  # slow decay: hard cold
    exact = jnp.linalg.svd(g)[0][:, :r]
    opts = dict(oversample=0, power_iters=0, key=jax.random.key(3))
    cold = lorajax.randomized_svd(g, r, **opts)[0]
    warm = lorajax.randomized_svd(g, r, warm_start=exact, **opts)[0]
    assert float(lorajax.subspace_overlap(exact, cold)) < 0.9
    assert float(lorajax.subspace_overlap(exact, warm)) > 0.9999


def test_low_rank_refresh_warm_starts_from_the_previous_basis():
    """Each refresh continues the subspace iteration of the previous one.

    With no power iterations and no oversampling, one cold sketch of a slowly decaying
    spectrum is poor; refreshing on a gradient whose subspace stays put converges, and
    then a refresh on the final gradient starts from a good basis. Starting from an
    unrelated subspace instead leaves the final basis poor: the previous basis is used.
    """
    n, m, r = 128, 96, 8
    spectrum = jnp.arange(1.0, m + 1) ** -0.5
    g_late = _with_spectrum(n, m, spectrum, key=1)
    g_good = g_late + 1e-3 * _with_spectrum(n, m, spectrum, key=2)  # same subspace
    g_bad = _with_spectrum(n, m, spectrum, key=3)  # unrelated subspace
    exact = jnp.linalg.svd(g_late)[0][:, :r]

    def final_basis(g_first):
        tx = lorajax.low_rank(
            optax.sgd(1.0), rank=r, side="left", refresh_every=1, oversample=0, power_iters=0
        )
        state = tx.init({"w": g_late})
        for g in [g_first] * 8 + [g_late]:
            _, state = tx.update({"w": g}, state)
        return lorajax.current_bases(state)["w"][0]

    from_good = final_basis(g_good)
    from_bad = final_basis(g_bad)
    one_cold_sketch = lorajax.randomized_svd(
        g_late, r, key=jax.random.key(0), oversample=0, power_iters=0
    )[0]
    assert float(lorajax.subspace_overlap(exact, one_cold_sketch)) < 0.9
    assert float(lorajax.subspace_overlap(exact, from_good)) > 0.99
    assert float(lorajax.subspace_overlap(exact, from_bad)) < 0.95


def test_stored_bases_are_orthonormal_and_follow_the_gradient():
    g = _with_spectrum(N, M, 0.5 ** jnp.arange(float(M)))
    exact_u, _, exact_vt = jnp.linalg.svd(g, full_matrices=False)
    for basis in ("svd", "randomized_svd"):
        tx = lorajax.low_rank(optax.sgd(1.0), rank=R, side="both", basis=basis)
        _, state = tx.update({"w": g}, tx.init({"w": g}))
        u, v = lorajax.current_bases(state)["w"]
        np.testing.assert_allclose(u.T @ u, np.eye(R), atol=1e-5)
        np.testing.assert_allclose(v.T @ v, np.eye(R), atol=1e-5)
        assert float(lorajax.subspace_overlap(exact_u[:, :R], u)) > 0.9999
        assert float(lorajax.subspace_overlap(exact_vt[:R].T, v)) > 0.9999


def test_subspace_overlap_of_random_subspaces_is_about_s_over_d():
    d, r = 400, 20
    a = jax.random.normal(jax.random.key(0), (d, r))
    b = jax.random.normal(jax.random.key(1), (d, r))
    assert abs(float(lorajax.subspace_overlap(a, b)) - r / d) < 0.02

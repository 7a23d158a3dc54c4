"""The numerical parts of the fast randomized-SVD refresh, each by its defining property.

- ``lower_triangular_inverse``: ``L⁻¹ L = I`` and the result is lower triangular.
- ``gram_orthonormalize``: ``Q`` spans the columns of ``X``; it is orthonormal when
  ``X`` is well conditioned, and still orthonormal (Householder fallback) when not.
- ``cholesky_qr``: ``X = Q R`` with orthonormal ``Q`` and upper-triangular ``R``, also
  for ill-conditioned and rank-deficient ``X``.
- ``sketched_svd(..., transpose=True)`` decomposes ``gᵀ`` exactly as the explicit
  transpose does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax._src.bases import cholesky_qr, gram_orthonormalize, lower_triangular_inverse
from lorajax._src.randomized_svd import sketched_svd


def _block(d, k, cond, key=0, batch=()):
    """A ``(*batch, d, k)`` block with singular values spread log-uniformly over ``cond``."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    left = jnp.linalg.qr(jax.random.normal(k1, (*batch, d, k)))[0]
    right = jnp.linalg.qr(jax.random.normal(k2, (*batch, k, k)))[0]
    sigma = jnp.logspace(0.0, -np.log10(cond), k) * jax.random.uniform(k3, (), minval=0.5)
    return jnp.einsum("...dk,k,...lk->...dl", left, sigma, right)


def _orthonormality_error(q):
    q = np.asarray(q, np.float64)
    k = q.shape[-1]
    return np.max(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(k)))


def _span_distance(x, q):
    """‖(I − P_Q) X‖ / ‖X‖ in float64, with P_Q the orthogonal projector on span(Q)."""
    x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
    qo = np.linalg.qr(q)[0]
    rest = x - qo @ (np.swapaxes(qo, -1, -2) @ x)
    return np.linalg.norm(rest) / np.linalg.norm(x)


@pytest.mark.parametrize("k", [1, 2, 3, 8, 13, 32, 33])
def test_lower_triangular_inverse_inverts(k):
    a = np.asarray(_block(3 * k + 4, k, cond=30.0, key=k, batch=(2,)), np.float64)
    lower = np.linalg.cholesky(np.swapaxes(a, -1, -2) @ a).astype(np.float32)
    noise = np.triu(np.full((k, k), 7.0), 1).astype(np.float32)  # the upper part is ignored
    inv = np.asarray(lower_triangular_inverse(jnp.asarray(lower + noise)))
    assert inv.shape == (2, k, k) and inv.dtype == np.float32
    assert np.all(np.triu(inv, 1) == 0.0)
    exact = np.linalg.inv(lower.astype(np.float64))
    np.testing.assert_allclose(inv, exact, rtol=0, atol=2e-5 * np.max(np.abs(exact)))
    identity = np.broadcast_to(np.eye(k), (2, k, k))
    np.testing.assert_allclose(inv.astype(np.float64) @ lower, identity, atol=2e-5)


def test_gram_orthonormalize_keeps_the_span_and_is_orthonormal_when_well_conditioned():
    x = _block(512, 32, cond=10.0, batch=(3,))
    q = gram_orthonormalize(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert _span_distance(x, q) < 1e-6
    # One pass is orthonormal up to the shift: QᵀQ = I − s (XᵀX + sI)⁻¹, so within
    # s / σ_min², with s = (√d + k) ε ‖X‖²_F; rounding adds O(ε κ²).
    x64 = np.asarray(x, np.float64)
    sigma = np.linalg.svd(x64, compute_uv=False)
    shift = (512**0.5 + 32) * np.finfo(np.float32).eps * np.sum(sigma**2, axis=-1)
    bound = np.max(shift / sigma[..., -1] ** 2)
    error = _orthonormality_error(q)
    assert 0.2 * bound < error < 1.2 * bound + 1e-5, (error, bound)
    overlap = lorajax.subspace_overlap(x, q)
    np.testing.assert_allclose(overlap, np.ones(3), atol=2e-6)


@pytest.mark.parametrize("cond", [1e4, 1e7])
def test_gram_orthonormalize_falls_back_to_householder_when_ill_conditioned(cond):
    x = _block(300, 16, cond=cond, key=3)
    q = gram_orthonormalize(x)
    # Householder: orthonormal to rounding, and every direction of X kept.
    assert _orthonormality_error(q) < 5e-6
    assert _span_distance(x, q) < 1e-6


def test_gram_orthonormalize_of_zero_is_finite():
    q = gram_orthonormalize(jnp.zeros((64, 8)))
    assert np.all(np.isfinite(np.asarray(q)))


def test_gram_orthonormalize_rows_and_transpose_are_transposes():
    x = _block(200, 12, cond=20.0, key=5)
    cols = np.asarray(gram_orthonormalize(x))
    # The same maths summed in another order: equal to rounding amplified by κ² = 400.
    tol = 400 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(gram_orthonormalize(x.T, rows=True), cols.T, atol=tol)
    np.testing.assert_allclose(gram_orthonormalize(x, transpose=True), cols.T, atol=tol)
    both = gram_orthonormalize(x.T, rows=True, transpose=True)
    np.testing.assert_allclose(both, cols, atol=tol)


@pytest.mark.parametrize(
    "cond", [1.0, 1e2, 1e4, 1e6], ids=["cond=1", "cond=1e2", "cond=1e4", "cond=1e6"]
)
def test_cholesky_qr_is_a_thin_qr(cond):
    x = _block(1024, 32, cond=cond, key=7, batch=(2,))
    q, r = cholesky_qr(x)
    assert q.shape == x.shape and r.shape == (2, 32, 32)
    assert _orthonormality_error(q) < 5e-6
    assert np.all(np.tril(np.asarray(r), -1) == 0.0)
    qr = np.asarray(q, np.float64) @ np.asarray(r, np.float64)
    x64 = np.asarray(x, np.float64)
    assert np.linalg.norm(qr - x64) / np.linalg.norm(x64) < 5e-6


def test_cholesky_qr_completes_a_rank_deficient_block():
    k1, k2 = jax.random.split(jax.random.key(11))
    x = jax.random.normal(k1, (200, 3)) @ jax.random.normal(k2, (3, 8))  # rank 3 < k = 8
    q, r = cholesky_qr(x)
    assert _orthonormality_error(q) < 5e-6
    qr = np.asarray(q, np.float64) @ np.asarray(r, np.float64)
    np.testing.assert_allclose(
        qr, np.asarray(x, np.float64), atol=1e-5 * float(jnp.max(jnp.abs(x)))
    )


def test_cholesky_qr_rows_and_transpose():
    x = _block(256, 16, cond=50.0, key=13)
    q, r = cholesky_qr(x)
    q_rows, r_rows = cholesky_qr(x.T, rows=True)
    np.testing.assert_allclose(q_rows, np.asarray(q).T, atol=1e-6)
    np.testing.assert_allclose(r_rows, r, atol=1e-6 * float(jnp.max(jnp.abs(r))))
    q_t, _ = cholesky_qr(x, transpose=True)
    np.testing.assert_allclose(q_t, np.asarray(q).T, atol=1e-6)


def _with_spectrum(n, m, spectrum, key):
    k1, k2 = jax.random.split(jax.random.key(key))
    a = jnp.linalg.qr(jax.random.normal(k1, (n, m)))[0]
    b = jnp.linalg.qr(jax.random.normal(k2, (m, m)))[0]
    return (a * spectrum[None, :]) @ b.T


@pytest.mark.parametrize("warm", [False, True])
def test_sketched_svd_of_the_transpose_without_forming_it(warm):
    n, m, r, k = 96, 160, 6, 14
    a = _with_spectrum(m, n, 0.8 ** jnp.arange(float(n)), key=17)  # the matrix A: (m, n)
    g = a.T  # stored as its transpose
    u_exact, s_exact, vt_exact = jnp.linalg.svd(a, full_matrices=False)
    rows = m if warm else n
    sketch = jax.random.normal(jax.random.key(19), (rows, k))
    opts = dict(warm=warm, power_iters=2)
    u, s, v = sketched_svd(g + 0.0, r, sketch, transpose=True, **opts)
    u_ref, s_ref, v_ref = sketched_svd(a, r, sketch, **opts)
    assert u.shape == (m, r) and v.shape == (n, r) and s.shape == (r,)
    # The same subspaces and values as the explicit transpose, and as the exact SVD.
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    np.testing.assert_allclose(s, s_exact[:r], rtol=1e-4)
    for basis, ref, exact in ((u, u_ref, u_exact[:, :r]), (v, v_ref, vt_exact[:r].T)):
        assert _orthonormality_error(basis) < 5e-6
        assert float(lorajax.subspace_overlap(ref, basis)) > 1 - 1e-6
        assert float(lorajax.subspace_overlap(exact, basis)) > 1 - 1e-5

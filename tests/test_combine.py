"""Combining adapters: hand-built updates with answers computed by hand or in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax._src.adapters.tree import lora_leaves
from lorajax.adapters import LoRA


def _lora(a, b, scale=1.0, spec=None):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    spec = lorajax.MatrixSpec(batch_axes=tuple(range(a.ndim - 2))) if spec is None else spec
    shape = (*a.shape[:-1], b.shape[-1])
    rank = a.shape[-1]
    return LoRA(a=a, b=b, scale=scale, alpha=scale * rank, rank=rank, layout=spec.resolve(shape))


def _tree(lora):
    return {"layer": {"kernel": lora, "bias": None}}


def _update(dw, scale=1.0):
    """An adapter whose update is exactly ``dw``: ``a = dw / s``, ``b = I``, scale ``s``."""
    dw = np.asarray(dw, np.float64)
    eye = np.broadcast_to(np.eye(dw.shape[-1]), (*dw.shape[:-2], dw.shape[-1], dw.shape[-1]))
    return _tree(_lora(dw / scale, eye, scale))


def _dw(tree):
    """The combined update, as ``merge`` folds it into zero kernels."""
    zeros = jax.tree.map(
        lambda x: jnp.zeros(x.layout.shape if isinstance(x, LoRA) else (1,)),
        tree,
        is_leaf=lambda x: x is None or isinstance(x, LoRA),
    )
    return np.asarray(lorajax.adapters.merge(zeros, tree)["layer"]["kernel"], np.float64)


def _rand(key, shape, scale=1.0):
    return scale * np.asarray(jax.random.normal(jax.random.key(key), shape), np.float64)


# ---------------------------------------------------------------- exact factor methods


def test_cat_adds_the_weighted_updates_exactly():
    one = _tree(_lora(_rand(0, (5, 2)), _rand(1, (2, 4)), scale=2.0))
    two = _tree(_lora(_rand(2, (5, 3)), _rand(3, (3, 4)), scale=0.5))
    out = lorajax.adapters.combine([one, two], [0.7, -1.3], "cat")
    lora = out["layer"]["kernel"]
    assert out["layer"]["bias"] is None
    assert (lora.rank, lora.scale, lora.alpha) == (5, 1.0, 5.0)
    assert lora.a.shape == (5, 5) and lora.b.shape == (5, 4)
    assert lora.layout == one["layer"]["kernel"].layout and not lora.frozen_a
    np.testing.assert_allclose(_dw(out), 0.7 * _dw(one) - 1.3 * _dw(two), atol=1e-5)


def test_linear_sums_the_factors_not_the_updates():
    a1, b1, a2, b2 = _rand(0, (4, 2)), _rand(1, (2, 3)), _rand(2, (4, 2)), _rand(3, (2, 3))
    one, two = _tree(_lora(a1, b1, 2.0)), _tree(_lora(a2, b2, 0.5))
    w1, w2 = 0.25, 4.0
    lora = lorajax.adapters.combine([one, two], [w1, w2])["layer"]["kernel"]
    assert (lora.rank, lora.scale) == (2, 1.0)
    # PEFT's convention: sqrt(w·s) on each factor.
    want_a = np.sqrt(w1 * 2.0) * a1 + np.sqrt(w2 * 0.5) * a2
    want_b = np.sqrt(w1 * 2.0) * b1 + np.sqrt(w2 * 0.5) * b2
    np.testing.assert_allclose(np.asarray(lora.a), want_a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora.b), want_b, atol=1e-5)
    # The cross terms make it differ from the weighted sum of the updates ...
    weighted = w1 * _dw(one) + w2 * _dw(two)
    assert np.max(np.abs(_dw({"layer": {"kernel": lora}}) - weighted)) > 0.1


def test_linear_equals_the_weighted_sum_on_disjoint_rank_slots():
    z = np.zeros
    one = _tree(_lora(np.c_[_rand(0, (4, 1)), z((4, 1))], np.r_[_rand(1, (1, 3)), z((1, 3))], 2.0))
    two = _tree(_lora(np.c_[z((4, 1)), _rand(2, (4, 1))], np.r_[z((1, 3)), _rand(3, (1, 3))], 3.0))
    out = lorajax.adapters.combine([one, two], [0.5, -2.0], "linear")
    np.testing.assert_allclose(_dw(out), 0.5 * _dw(one) - 2.0 * _dw(two), atol=1e-5)


# ---------------------------------------------------------------------------- svd


def test_svd_is_the_best_rank_k_approximation():
    one = _tree(_lora(_rand(0, (6, 3)), _rand(1, (3, 5)), 1.5))
    two = _tree(_lora(_rand(2, (6, 3)), _rand(3, (3, 5)), 0.5))
    total = 0.6 * _dw(one) + 1.4 * _dw(two)
    u, s, vt = np.linalg.svd(total)
    for k in (1, 2, 4):
        lora = lorajax.adapters.combine([one, two], [0.6, 1.4], "svd", rank=k)["layer"]["kernel"]
        assert (lora.rank, lora.scale, lora.alpha) == (k, 1.0, float(k))
        got = _dw({"layer": {"kernel": lora}})
        np.testing.assert_allclose(got, u[:, :k] * s[:k] @ vt[:k], atol=1e-5)
        # Eckart–Young: the error is exactly the tail of the spectrum.
        np.testing.assert_allclose(
            np.linalg.norm(total - got), np.sqrt(np.sum(s[k:] ** 2)), atol=1e-5
        )
        np.testing.assert_allclose(np.linalg.norm(total - got, 2), s[k], atol=1e-5)
        # a = U_r (orthonormal columns), b = diag(S_r) V_rᵀ.
        a = np.asarray(lora.a, np.float64)
        np.testing.assert_allclose(a.T @ a, np.eye(k), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(lora.b), axis=1), s[:k], rtol=1e-5)
    # Default rank: the largest input rank (3); at rank >= min(n, m) it is exact and capped.
    assert lorajax.adapters.combine([one, two], [0.6, 1.4], "svd")["layer"]["kernel"].rank == 3
    full = lorajax.adapters.combine([one, two], [0.6, 1.4], "svd", rank=9)
    assert full["layer"]["kernel"].rank == 5
    np.testing.assert_allclose(_dw(full), total, atol=1e-5)


# --------------------------------------------------------------------------- ties

W1 = [[2.0, -1.0, 3.0], [5.0, 0.0, 0.0]]
W2 = [[1.0, 1.0, -3.0], [-1.0, 0.0, 7.0]]
W3 = [[-1.0, 0.0, -1.0], [-1.0, 0.0, -2.0]]
WEIGHTS = [1.0, 2.0, 0.5]
# By hand, entry by entry (values of adapters 1, 2, 3 -> elected sign -> mean of the
# weighted agreeing entries):
#   (0,0)  2, 1,-1: + -> (1·2 + 2·1)/2 = 2
#   (0,1) -1, 1, 0: sum 0 is a tie, + -> 2·1/1 = 2 (the zero does not count)
#   (0,2)  3,-3,-1: - -> (2·-3 + 0.5·-1)/2 = -3.25
#   (1,0)  5,-1,-1: total 3 -> + -> 5;  frequency -1 -> - -> (2·-1 + 0.5·-1)/2 = -1.25
#   (1,1)  0, 0, 0: nobody agrees -> 0
#   (1,2)  0, 7,-2: + -> 2·7/1 = 14
TIES_TOTAL = [[2.0, 2.0, -3.25], [5.0, 0.0, 14.0]]
TIES_FREQUENCY = [[2.0, 2.0, -3.25], [-1.25, 0.0, 14.0]]


@pytest.mark.parametrize(
    "majority_sign, want", [("total", TIES_TOTAL), ("frequency", TIES_FREQUENCY)]
)
def test_ties_elects_signs_and_averages_agreeing_entries(majority_sign, want):
    trees = [_update(W1), _update(W2, scale=2.0), _update(W3, scale=0.5)]
    out = lorajax.adapters.combine(trees, WEIGHTS, "ties", density=1.0, majority_sign=majority_sign)
    assert out["layer"]["kernel"].rank == 2  # min(n, m): the SVD step is exact
    np.testing.assert_allclose(_dw(out), want, atol=1e-5)


@pytest.mark.parametrize("density, k", [(0.5, 3), (0.6, 3), (0.7, 4), (0.1, 0), (1.0, 6)])
def test_ties_keeps_exactly_the_top_k_entries(density, k):
    dw = np.array([[0.5, -4.0, 1.0], [3.0, -0.2, 2.0]])
    out = lorajax.adapters.combine([_update(dw)], [2.0], "ties", density=density)
    order = np.argsort(-np.abs(dw), axis=None)[:k]  # distinct magnitudes
    want = np.zeros(6)
    want[order] = 2.0 * dw.reshape(-1)[order]
    np.testing.assert_allclose(_dw(out), want.reshape(2, 3), atol=1e-5)


def _ties_np(dws, weights, density, majority_sign):
    """TIES in float64, trimming with a stable sort of each matrix's magnitudes."""
    trimmed = []
    for dw in dws:
        flat = dw.reshape(-1, dw.shape[-2] * dw.shape[-1]).copy()
        k = int(density * flat.shape[1])
        for row in flat:
            row[np.argsort(-np.abs(row), kind="stable")[k:]] = 0.0
        trimmed.append(flat.reshape(dw.shape))
    t = np.stack(trimmed)
    votes = t.sum(0) if majority_sign == "total" else np.sign(t).sum(0)
    elected = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(t) == elected
    w = np.asarray(weights).reshape(-1, *[1] * (t.ndim - 1))
    return (w * t * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_on_stacked_kernels_matches_float64(majority_sign):
    dws = [_rand(i, (3, 4, 5), 1.0 + i) for i in range(3)]
    weights = [0.5, 1.0, -0.75]
    out = lorajax.adapters.combine(
        [_update(d) for d in dws], weights, "ties", density=0.4, majority_sign=majority_sign
    )
    lora = out["layer"]["kernel"]
    assert lora.a.shape == (3, 4, 4) and lora.b.shape == (3, 4, 5)
    want = _ties_np(dws, weights, 0.4, majority_sign)
    np.testing.assert_allclose(_dw(out), want, atol=1e-5)
    # Every layer was trimmed to exactly int(0.4 · 20) = 8 entries before merging.
    single = lorajax.adapters.combine([_update(dws[0])], [1.0], "ties", density=0.4)
    assert [int(np.sum(np.abs(m) > 1e-6)) for m in _dw(single)] == [8, 8, 8]


def test_ties_truncates_to_the_requested_rank():
    dws = [_rand(i, (5, 4)) for i in range(2)]
    merged = _ties_np(dws, [1.0, 1.0], 0.5, "total")
    u, s, vt = np.linalg.svd(merged)
    out = lorajax.adapters.combine(
        [_update(d) for d in dws], [1.0, 1.0], "ties", rank=2, density=0.5
    )
    np.testing.assert_allclose(_dw(out), u[:, :2] * s[:2] @ vt[:2], atol=1e-5)


# --------------------------------------------------------------------------- dare


def test_dare_linear_keeps_rescaled_survivors():
    dw = _rand(0, (40, 40)) + 3.0  # no zero entries
    key = jax.random.key(7)
    out = _dw(lorajax.adapters.combine([_update(dw)], [1.0], "dare_linear", density=0.25, key=key))
    kept = np.abs(out) > 1e-3
    np.testing.assert_allclose(out[kept], dw[kept] / 0.25, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[~kept], 0.0, atol=1e-4)
    assert abs(kept.mean() - 0.25) < 0.05  # 1600 Bernoulli(0.25) draws: sd 0.011
    again = _dw(
        lorajax.adapters.combine([_update(dw)], [1.0], "dare_linear", density=0.25, key=key)
    )
    np.testing.assert_array_equal(again, out)
    other = lorajax.adapters.combine(
        [_update(dw)], [1.0], "dare_linear", density=0.25, key=jax.random.key(8)
    )
    assert not np.array_equal(np.abs(_dw(other)) > 1e-3, kept)


def _masks(out, p):
    """Decodes which of (+1, -3) survived from a sum of 1/p·[+1 kept] - 3/p·[-3 kept]."""
    codes = np.rint(out * p).astype(int)
    assert set(np.unique(codes)) <= {0, 1, -3, -2}
    return np.isin(codes, (1, -2)), np.isin(codes, (-3, -2))


def test_dare_ties_uses_the_same_masks_and_elects_signs():
    shape, p, key = (6, 6), 0.5, jax.random.key(3)
    trees = [_update(np.ones(shape)), _update(-3.0 * np.ones(shape))]
    linear = _dw(lorajax.adapters.combine(trees, [1.0, 1.0], "dare_linear", density=p, key=key))
    m1, m2 = _masks(linear, p)
    assert not np.array_equal(m1, m2)  # each adapter has its own mask
    assert 0 < m1.sum() < m1.size and 0 < m2.sum() < m2.size
    # total: where both survive the sum 2 - 6 is negative, so only -6 stays.
    ties = _dw(lorajax.adapters.combine(trees, [1.0, 1.0], "dare_ties", density=p, key=key))
    want = np.where(m2, -6.0, np.where(m1, 2.0, 0.0))
    np.testing.assert_allclose(ties, want, atol=1e-5)
    # frequency: one vote each is a tie, + wins, so only +2 stays.
    freq = lorajax.adapters.combine(
        trees, [1.0, 1.0], "dare_ties", density=p, key=key, majority_sign="frequency"
    )
    want = np.where(m1, 2.0, np.where(m2, -6.0, 0.0))
    np.testing.assert_allclose(_dw(freq), want, atol=1e-5)


def test_dare_with_density_one_is_the_plain_weighted_sum():
    dws = [_rand(i, (3, 4)) for i in range(2)]
    out = lorajax.adapters.combine(
        [_update(d) for d in dws], [0.3, 2.0], "dare_linear", density=1.0, key=jax.random.key(0)
    )
    np.testing.assert_allclose(_dw(out), 0.3 * dws[0] + 2.0 * dws[1], atol=1e-5)


# ------------------------------------------------------------------ trees and errors


def test_several_leaves_and_stacked_kernels():
    def tree(seed):
        return {
            "q": _lora(_rand(seed, (4, 2)), _rand(seed + 1, (2, 3)), 2.0),
            "stack": _lora(_rand(seed + 2, (2, 4, 2)), _rand(seed + 3, (2, 2, 5))),
            "norm": None,
        }

    one, two = tree(0), tree(10)
    out = lorajax.adapters.combine([one, two], [1.0, 0.5], "svd", rank=4)
    assert out["norm"] is None
    for name in ("q", "stack"):
        want = np.asarray(one[name].delta()) + 0.5 * np.asarray(two[name].delta())
        np.testing.assert_allclose(np.asarray(out[name].delta()), want, atol=1e-5)
    assert out["q"].rank == 3 and out["stack"].rank == 4
    assert out["stack"].a.shape == (2, 4, 4) and out["stack"].b.shape == (2, 4, 5)


def test_dtypes_follow_the_first_tree():
    lora = _lora(_rand(0, (4, 2)), _rand(1, (2, 3)))
    lora = lora.replace(a=lora.a.astype(jnp.bfloat16), b=lora.b.astype(jnp.bfloat16))
    out = lorajax.adapters.combine([_tree(lora)] * 2, [0.5, 0.5], "svd")["layer"]["kernel"]
    assert out.a.dtype == jnp.bfloat16 and out.b.dtype == jnp.bfloat16


def _pair():
    return _update(np.eye(3)), _update(2.0 * np.eye(3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="mean"), ValueError, "`method` must be one of 'linear', 'cat', 'svd'"),
        (dict(weights=[1.0]), ValueError, "one number per adapter tree: got 1 weights for 2"),
        (dict(weights=1.0), TypeError, "`weights` must be a list of numbers"),
        (dict(weights=[1.0, "2"]), TypeError, r"`weights\[1\]` must be a number"),
        (dict(weights=[1.0, float("nan")]), ValueError, r"`weights\[1\]` must be finite"),
        (dict(method="ties"), ValueError, "method='ties' needs `density`"),
        (dict(method="ties", density=0.0), ValueError, r"`density` must be in \(0, 1\], got 0.0"),
        (dict(method="ties", density=1.5), ValueError, r"`density` must be in \(0, 1\], got 1.5"),
        (dict(method="dare_ties", density=-0.1), ValueError, r"`density` must be in \(0, 1\]"),
        (dict(method="dare_linear", density=0.5), ValueError, "needs `key`"),
        (dict(method="dare_ties", density=0.5, key=0), TypeError, "`key` must be a single PRNG"),
        (dict(method="svd", rank=0), ValueError, "`rank` must be a positive int or None, got 0"),
        (dict(method="svd", rank=2.0), TypeError, "`rank` must be a positive int or None"),
        (dict(method="cat", rank=2), ValueError, "`rank` does not apply to method='cat'"),
        (dict(method="ties", density=0.5, majority_sign="mean"), ValueError, "`majority_sign`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(adapters_list=list(_pair()), weights=[1.0, 1.0]) | kwargs
    with pytest.raises(error, match=match):
        lorajax.adapters.combine(**args)


def test_empty_list():
    with pytest.raises(ValueError, match="`adapters_list` is empty"):
        lorajax.adapters.combine([], [])
    with pytest.raises(TypeError, match="`adapters_list` must be a list"):
        lorajax.adapters.combine(_update(np.eye(2)), [1.0])


def test_mismatched_trees_name_the_first_differing_leaf():
    base = {"q": _lora(np.eye(3), np.eye(3)), "v": _lora(np.eye(3), np.eye(3)), "o": None}
    untargeted = base | {"v": None}
    with pytest.raises(ValueError, match="'v' has no adapter in `adapters_list\\[1\\]`"):
        lorajax.adapters.combine([base, untargeted], [1.0, 1.0], "cat")
    other_layout = base | {"v": _lora(np.eye(3), np.eye(3), spec=lorajax.MatrixSpec(-1, -2))}
    with pytest.raises(ValueError, match="The adapters at 'v' read the kernel differently"):
        lorajax.adapters.combine([base, other_layout], [1.0, 1.0], "cat")
    renamed = {"q": base["q"], "w": base["v"], "o": None}
    with pytest.raises(ValueError, match="leaf 'w' where the first has 'v'"):
        lorajax.adapters.combine([base, renamed], [1.0, 1.0], "cat")
    extra = base | {"z": None}
    with pytest.raises(ValueError, match="lacks leaf 'z'"):
        lorajax.adapters.combine([base, extra], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="holds ArrayImpl at 'o'|holds .* at 'o'"):
        lorajax.adapters.combine([base, base | {"o": jnp.zeros(3)}], [1.0, 1.0], "cat")


def test_linear_needs_equal_ranks_and_dora_is_refused():
    one = _tree(_lora(_rand(0, (4, 2)), _rand(1, (2, 3))))
    two = _tree(_lora(_rand(2, (4, 3)), _rand(3, (3, 3))))
    with pytest.raises(ValueError, match=r"needs equal ranks.*'layer/kernel' have ranks \[2, 3\]"):
        lorajax.adapters.combine([one, two], [1.0, 1.0], "linear")
    assert lorajax.adapters.combine([one, two], [1.0, 1.0], "cat")["layer"]["kernel"].rank == 5
    dora = _tree(one["layer"]["kernel"].replace(magnitude=jnp.ones(3)))
    with pytest.raises(ValueError, match="is a DoRA adapter"):
        lorajax.adapters.combine([one, dora], [1.0, 1.0], "svd")


def test_adapters_from_init_combine_and_merge():
    params = {
        "attn": {"q_proj": {"kernel": jnp.ones((6, 4))}},
        "mlp": {"up_proj": {"kernel": jnp.ones((2, 4, 5)), "bias": jnp.zeros(5)}},
    }
    trees = []
    for seed, rank in ((0, 2), (1, 3)):
        ad, _ = lorajax.adapters.init(seed, params, rank=rank, alpha=4.0, init="gaussian")
        trees.append(
            jax.tree.map(
                lambda x, seed=seed: x.replace(
                    b=jax.random.normal(jax.random.key(seed), x.b.shape)
                ),
                ad,
                is_leaf=lambda x: isinstance(x, LoRA),
            )
        )
    for method, kwargs in (("cat", {}), ("svd", {"rank": 5})):
        out = lorajax.adapters.combine(trees, [0.5, 2.0], method, **kwargs)
        merged = lorajax.adapters.merge(params, out)
        for one, two, base, got in zip(
            *(lora_leaves(t) for t in trees),
            [params["attn"]["q_proj"]["kernel"], params["mlp"]["up_proj"]["kernel"]],
            [merged["attn"]["q_proj"]["kernel"], merged["mlp"]["up_proj"]["kernel"]],
        ):
            want = (
                np.asarray(base)
                + 0.5 * np.asarray(one[1].delta())
                + 2.0 * np.asarray(two[1].delta())
            )
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

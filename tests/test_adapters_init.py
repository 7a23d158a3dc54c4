"""lorajax.adapters.init: every init against its defining property, patterns, stacking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.adapters import LoRA

KEY = jax.random.key(0)


def _params(dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(3), 5)
    return {
        "attn": {
            "q_proj": {"kernel": jax.random.normal(ks[0], (24, 16), dtype)},
            "o_proj": {"kernel": jax.random.normal(ks[1], (16, 24), dtype)},
        },
        "mlp": {
            "up_proj": {"kernel": jax.random.normal(ks[2], (16, 40), dtype), "bias": jnp.ones(40)}
        },
        "embed_tokens": {"embedding": jax.random.normal(ks[3], (50, 16), dtype)},
        "norm": {"scale": jnp.ones(16, dtype)},
    }


def _np(x):
    return np.asarray(x, np.float64)


def _best_rank(w, k):
    u, s, vt = np.linalg.svd(_np(w), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


# --- which leaves, which values -----------------------------------------------------


def test_targets_and_untargeted_leaves():
    params = _params()
    ad, base = lorajax.adapters.init(KEY, params, rank=4)
    assert base is params
    assert isinstance(ad["attn"]["q_proj"]["kernel"], LoRA)
    assert isinstance(ad["mlp"]["up_proj"]["kernel"], LoRA)
    assert ad["mlp"]["up_proj"]["bias"] is None
    assert ad["embed_tokens"]["embedding"] is None  # all-linear leaves embeddings out
    assert ad["norm"]["scale"] is None
    only_attn, _ = lorajax.adapters.init(KEY, params, rank=4, targets="attention")
    assert only_attn["mlp"]["up_proj"]["kernel"] is None
    assert isinstance(only_attn["attn"]["o_proj"]["kernel"], LoRA)


def test_scales_are_exact():
    params = _params()
    ad, _ = lorajax.adapters.init(KEY, params, rank=4, alpha=32)
    lora = ad["attn"]["q_proj"]["kernel"]
    assert (lora.scale, lora.alpha, lora.rank) == (8.0, 32.0, 4)
    ad, _ = lorajax.adapters.init(KEY, params, rank=4, alpha=32, use_rslora=True)
    assert ad["attn"]["q_proj"]["kernel"].scale == 32 / math.sqrt(4)
    ad, _ = lorajax.adapters.init(KEY, params, rank=8)  # alpha=None: alpha = r
    assert ad["attn"]["q_proj"]["kernel"].scale == 1.0


def test_rank_and_alpha_patterns_match_module_suffixes():
    params = _params()
    ad, _ = lorajax.adapters.init(
        KEY,
        params,
        rank=4,
        alpha=8,
        rank_pattern={"up_proj": 2, "attn/o_.*": 6},
        alpha_pattern={"attn.q_proj": 3},
    )
    q, o, up = (ad["attn"]["q_proj"]["kernel"], ad["attn"]["o_proj"]["kernel"],
                ad["mlp"]["up_proj"]["kernel"])  # fmt: skip
    assert (q.rank, q.alpha, q.scale) == (4, 3.0, 0.75)
    assert (o.rank, o.alpha, o.scale, o.a.shape) == (6, 8.0, 8 / 6, (16, 6))
    assert (up.rank, up.scale, up.b.shape) == (2, 4.0, (2, 40))
    # A key matches whole trailing segments only: "proj" is not a module name here.
    ad, _ = lorajax.adapters.init(KEY, params, rank=4, rank_pattern={"proj": 2})
    assert ad["mlp"]["up_proj"]["kernel"].rank == 4


# --- default and gaussian: PEFT's distributions ----------------------------------------


def test_default_init_is_kaiming_uniform_with_zero_b():
    n, m, r = 400, 300, 64
    params = {"w": jnp.zeros((n, m))}
    ad, _ = lorajax.adapters.init(KEY, params, rank=r, targets="w")
    a, b = _np(ad["w"].a), _np(ad["w"].b)
    bound = 1 / math.sqrt(n)
    assert np.all(b == 0)
    assert np.abs(a).max() <= bound
    # Uniform(-bound, bound): the empirical CDF matches (Kolmogorov-Smirnov, 25600 draws).
    u = np.sort((a.ravel() + bound) / (2 * bound))
    ks = np.max(np.abs(u - np.arange(1, u.size + 1) / u.size))
    assert ks < 1.63 / math.sqrt(u.size)  # the 1% critical value
    assert abs(a.std() - bound / math.sqrt(3)) < 0.02 * bound
    # A normal with the same std would fail the range check: the test can tell them apart.
    assert np.abs(a).max() > 0.98 * bound


def test_gaussian_init_has_std_one_over_rank():
    n, m, r = 500, 200, 40
    ad, _ = lorajax.adapters.init(KEY, {"w": jnp.zeros((n, m))}, rank=r, targets="w",
                                  init="gaussian")  # fmt: skip
    a = _np(ad["w"].a)
    assert np.all(_np(ad["w"].b) == 0)
    assert abs(a.std() - 1 / r) < 0.02 / r
    assert abs(a.mean()) < 4 * (1 / r) / math.sqrt(a.size)
    kurtosis = np.mean((a - a.mean()) ** 4) / a.var() ** 2
    assert abs(kurtosis - 3.0) < 0.15  # Gaussian, not uniform (1.8)


def test_inits_are_reproducible_and_key_dependent():
    params = _params()
    a1, _ = lorajax.adapters.init(0, params, rank=4)
    a2, _ = lorajax.adapters.init(jax.random.key(0), params, rank=4)
    a3, _ = lorajax.adapters.init(1, params, rank=4)
    x1, x2, x3 = (t["attn"]["q_proj"]["kernel"].a for t in (a1, a2, a3))
    np.testing.assert_array_equal(x1, x2)
    assert not np.allclose(x1, x3)


# --- PiSSA, OLoRA, LoRA-GA: base changes, merge restores W ---------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_inits_preserve_the_weight(init):
    params = _params()
    ad, base = lorajax.adapters.init(KEY, params, rank=5, alpha=10, init=init)
    assert base is not params
    merged = lorajax.adapters.merge(base, ad)
    for path in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "up_proj")):
        w0 = params[path[0]][path[1]]["kernel"]
        np.testing.assert_allclose(merged[path[0]][path[1]]["kernel"], w0, atol=1e-5)
        assert not np.allclose(base[path[0]][path[1]]["kernel"], w0, atol=1e-2)
    # Untargeted leaves are the very same arrays.
    assert base["mlp"]["up_proj"]["bias"] is params["mlp"]["up_proj"]["bias"]
    assert base["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]


def test_pissa_adapter_is_the_best_rank_r_approximation():
    params = _params()
    r = 5
    ad, _ = lorajax.adapters.init(KEY, params, rank=r, alpha=10, init="pissa")
    for mod in ("q_proj", "o_proj"):
        w0 = params["attn"][mod]["kernel"]
        lora = ad["attn"][mod]["kernel"]
        sab = lora.scale * _np(lora.a) @ _np(lora.b)
        best = _best_rank(w0, r)  # float32 SVDs agree to 1e-5 of the matrix scale
        np.testing.assert_allclose(sab, best, atol=1e-5 * np.abs(best).max())
        # The two factors carry the singular values evenly: aᵀa = b bᵀ = diag(S_r)/s.
        s = np.linalg.svd(_np(w0), compute_uv=False)[:r]
        np.testing.assert_allclose(_np(lora.a).T @ _np(lora.a), np.diag(s / lora.scale),
                                   atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(_np(lora.b) @ _np(lora.b).T, np.diag(s / lora.scale),
                                   atol=1e-4)  # fmt: skip


def test_pissa_niter_uses_a_randomized_svd_of_the_same_subspace():
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))
    v, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(48, 48)))
    s = 2.0 ** -np.arange(48)
    w = jnp.asarray((u[:, :48] * s) @ v.T, jnp.float32)
    ad, base = lorajax.adapters.init(KEY, {"w": w}, rank=4, targets="w", init="pissa_niter_4")
    lora = ad["w"]
    np.testing.assert_allclose(lora.scale * _np(lora.a) @ _np(lora.b), _best_rank(w, 4),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(lorajax.adapters.merge(base, ad)["w"], w, atol=1e-6)


def test_olora_factors_are_peft_qr_factors():
    params = _params()
    r = 3
    ad, _ = lorajax.adapters.init(KEY, params, rank=r, alpha=6, init="olora")
    for mod in ("q_proj", "o_proj"):
        w0 = _np(params["attn"][mod]["kernel"])
        q, rr = np.linalg.qr(w0.T)  # PEFT: QR of the (d_out, d_in) torch weight
        lora = ad["attn"][mod]["kernel"]
        # b = Q_rᵀ has orthonormal rows; a b = (Q_r R_r)ᵀ, invariant to QR's sign choice.
        np.testing.assert_allclose(_np(lora.b) @ _np(lora.b).T, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(_np(lora.a) @ _np(lora.b), (q[:, :r] @ rr[:r]).T, atol=1e-5)


def _linear_loss_grads(params, adapters, g):
    """Adapter gradients of L = <G, W> (so dL/dW = G), through merge."""

    def loss(ad):
        merged = lorajax.adapters.merge(params, ad)
        return sum(jnp.vdot(g[k], merged[k]) for k in g)

    return jax.grad(loss)(adapters)


def test_lora_ga_first_step_follows_the_best_rank_2r_gradient():
    """One SGD step on (a, b) moves W, to first order, by -η s² c² G_2r (c² = √d_out/γ)."""
    n, m, r, alpha, lr = 48, 40, 4, 16.0, 1e-3
    w0 = jax.random.normal(jax.random.key(7), (n, m))
    u, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(n, n)))
    v, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(m, m)))
    spectrum = 1.5 ** -np.arange(m)  # distinct singular values: a unique SVD
    g = jnp.asarray((u[:, :m] * spectrum) @ v.T, jnp.float32)
    params, grads = {"w": w0}, {"w": g}
    ad, base = lorajax.adapters.init(
        KEY, params, rank=r, alpha=alpha, targets="w", init="lora_ga", grads=grads,
        use_rslora=True,
    )  # fmt: skip
    np.testing.assert_allclose(lorajax.adapters.merge(base, ad)["w"], w0, atol=1e-5)
    lora = ad["w"]
    grads_ad = _linear_loss_grads(base, ad, grads)["w"]
    da, db = -lr * _np(grads_ad.a), -lr * _np(grads_ad.b)
    first_order = lora.scale * (da @ _np(lora.b) + _np(lora.a) @ db)
    c2 = math.sqrt(m) / 16.0
    want = -lr * lora.scale**2 * c2 * _best_rank(g, 2 * r)
    np.testing.assert_allclose(first_order, want, atol=1e-5 * np.abs(want).max())
    # Not the rank-r approximation, nor the full gradient: the test separates them.
    assert not np.allclose(first_order, -lr * lora.scale**2 * c2 * _best_rank(g, r),
                           atol=1e-3 * np.abs(want).max())  # fmt: skip


# --- frozen inits ----------------------------------------------------------------------


@pytest.mark.parametrize("init", ["lora_fa", "lori"])
def test_frozen_a_inits(init):
    params = _params()
    ad, base = lorajax.adapters.init(KEY, params, rank=4, init=init)
    plain, _ = lorajax.adapters.init(KEY, params, rank=4)
    assert base is params
    lora = ad["attn"]["q_proj"]["kernel"]
    assert lora.frozen_a
    np.testing.assert_array_equal(lora.a, plain["attn"]["q_proj"]["kernel"].a)
    assert lora.sparsity == (0.9 if init == "lori" else None)
    ad, _ = lorajax.adapters.init(KEY, params, rank=4, init="lori", sparsity=0.75)
    assert ad["attn"]["q_proj"]["kernel"].sparsity == 0.75


# --- stacked and N-D kernels -----------------------------------------------------------


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora", "lora_ga",
                                  "lora_fa", "lori"])  # fmt: skip
def test_stacked_layers(init):
    stacked = jax.random.normal(jax.random.key(5), (3, 20, 12))
    grads = {"layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(6), (3, 20, 12))}}}
    params = {"layers": {"mlp": {"kernel": stacked}}}
    kw = {"grads": grads} if init == "lora_ga" else {}
    ad, base = lorajax.adapters.init(KEY, params, rank=3, alpha=6, init=init, **kw)
    lora = ad["layers"]["mlp"]["kernel"]
    assert lora.a.shape == (3, 20, 3) and lora.b.shape == (3, 3, 12)
    merged = lorajax.adapters.merge(base, ad)["layers"]["mlp"]["kernel"]
    np.testing.assert_allclose(merged, stacked, atol=1e-5)
    # The layers are independent matrices: deterministic inits equal per-layer inits, and
    # random inits give each layer its own draw.
    for layer in range(3):
        one = {"layers": {"mlp": {"kernel": stacked[layer]}}}
        kw1 = {"grads": {"layers": {"mlp": {"kernel": grads["layers"]["mlp"]["kernel"][layer]}}}}
        single, _ = lorajax.adapters.init(
            KEY, one, rank=3, alpha=6, init=init, **(kw1 if init == "lora_ga" else {})
        )
        s = single["layers"]["mlp"]["kernel"]
        if init in ("pissa", "olora", "lora_ga"):
            got = _np(lora.a[layer]) @ _np(lora.b[layer])
            np.testing.assert_allclose(got, _np(s.a) @ _np(s.b), atol=1e-4)
    if init not in ("pissa", "olora", "lora_ga"):
        assert not np.allclose(lora.a[0], lora.a[1])
    # merge of stacked adapters equals merging each layer by hand
    lora = lora.replace(b=jax.random.normal(jax.random.key(9), lora.b.shape))
    ad["layers"]["mlp"]["kernel"] = lora
    merged = lorajax.adapters.merge(base, ad)["layers"]["mlp"]["kernel"]
    for layer in range(3):
        want = _np(base["layers"]["mlp"]["kernel"][layer]) + lora.scale * _np(lora.a[layer]) @ _np(
            lora.b[layer]
        )
        np.testing.assert_allclose(merged[layer], want, atol=1e-5)


def test_multi_head_kernels_follow_their_matrix_spec():
    q = jax.random.normal(jax.random.key(1), (16, 4, 8))  # (d, heads, head_dim)
    out = jax.random.normal(jax.random.key(2), (4, 8, 16))  # (heads, head_dim, d)
    params = {"attention": {"query": {"kernel": q}, "out": {"kernel": out}}}
    ad, base = lorajax.adapters.init(KEY, params, rank=3, init="pissa")
    lq, lo = ad["attention"]["query"]["kernel"], ad["attention"]["out"]["kernel"]
    assert lq.a.shape == (16, 3) and lq.b.shape == (3, 32)
    assert lo.a.shape == (32, 3) and lo.b.shape == (3, 16)
    np.testing.assert_allclose(
        lq.scale * _np(lq.a) @ _np(lq.b), _best_rank(q.reshape(16, 32), 3), atol=1e-5
    )
    merged = lorajax.adapters.merge(base, ad)
    np.testing.assert_allclose(merged["attention"]["out"]["kernel"], out, atol=1e-5)


# --- merge, unmerge, apply -------------------------------------------------------------


def _trained(ad, key=11):
    """Adapters with nonzero b, as after training."""
    leaves, treedef = jax.tree.flatten(ad, is_leaf=lambda x: x is None or isinstance(x, LoRA))
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, LoRA):
            x = x.replace(b=jax.random.normal(jax.random.fold_in(jax.random.key(key), i),
                                              x.b.shape))  # fmt: skip
        out.append(x)
    return treedef.unflatten(out)


def test_merge_is_w0_plus_scaled_product_and_unmerge_inverts_it():
    params = _params()
    ad, _ = lorajax.adapters.init(KEY, params, rank=4, alpha=12)
    ad = _trained(ad)
    merged = lorajax.adapters.merge(params, ad)
    lora = ad["mlp"]["up_proj"]["kernel"]
    want = _np(params["mlp"]["up_proj"]["kernel"]) + 3.0 * _np(lora.a) @ _np(lora.b)
    np.testing.assert_allclose(merged["mlp"]["up_proj"]["kernel"], want, atol=1e-5)
    assert merged["mlp"]["up_proj"]["bias"] is params["mlp"]["up_proj"]["bias"]
    back = lorajax.adapters.unmerge(merged, ad)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_merge_keeps_bf16_kernels_bf16_with_f32_adapters():
    params = _params(jnp.bfloat16)
    ad, _ = lorajax.adapters.init(KEY, params, rank=4)
    assert ad["attn"]["q_proj"]["kernel"].a.dtype == jnp.float32
    merged = lorajax.adapters.merge(params, _trained(ad))
    assert merged["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16


def test_apply_merges_inside_jit_and_differentiates_the_adapters():
    params = _params()
    ad, _ = lorajax.adapters.init(KEY, params, rank=4, targets="mlp")
    ad = _trained(ad)
    x = jax.random.normal(jax.random.key(4), (5, 16))

    def model(p, x):
        up = p["mlp"]["up_proj"]
        return jnp.tanh(x @ up["kernel"] + up["bias"][None])

    lora = ad["mlp"]["up_proj"]["kernel"]
    w0 = params["mlp"]["up_proj"]["kernel"]

    def by_hand(a, b):
        h = jnp.tanh(x @ (w0 + lora.scale * a @ b) + params["mlp"]["up_proj"]["bias"][None])
        return jnp.sum(h**2)

    loss = lambda ad: jnp.sum(lorajax.adapters.apply(model)(params, ad, x) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss))(ad)["mlp"]["up_proj"]["kernel"]
    ga, gb = jax.grad(by_hand, argnums=(0, 1))(lora.a, lora.b)
    np.testing.assert_allclose(got.a, ga, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.b, gb, rtol=1e-5, atol=1e-5)


def test_init_runs_under_jit():
    params = _params()
    fn = jax.jit(lambda k, p: lorajax.adapters.init(k, p, rank=4, init="pissa"))
    ad, base = fn(KEY, params)
    eager, eager_base = lorajax.adapters.init(KEY, params, rank=4, init="pissa")
    np.testing.assert_allclose(
        lorajax.adapters.merge(base, ad)["attn"]["q_proj"]["kernel"],
        lorajax.adapters.merge(eager_base, eager)["attn"]["q_proj"]["kernel"],
        atol=1e-5,
    )


# --- errors ------------------------------------------------------------------------------


def test_rank_larger_than_the_matrix():
    with pytest.raises(ValueError, match=r"rank=20 is larger than the matrix at 'attn/o_proj"):
        lorajax.adapters.init(KEY, _params(), rank=20)
    with pytest.raises(ValueError, match=r"2·rank=20 is larger"):
        p = {"w": jnp.ones((16, 16))}
        lorajax.adapters.init(KEY, p, rank=10, targets="w", init="lora_ga", grads=p)
    with pytest.raises(ValueError, match="rank=30"):
        lorajax.adapters.init(KEY, _params(), rank=4, rank_pattern={"up_proj": 30})


def test_lora_ga_needs_matching_grads():
    params = _params()
    with pytest.raises(ValueError, match="init='lora_ga' needs `grads`"):
        lorajax.adapters.init(KEY, params, rank=2, init="lora_ga")
    with pytest.raises(ValueError, match="`grads` must have the structure"):
        lorajax.adapters.init(KEY, params, rank=2, init="lora_ga", grads={"attn": 1})
    bad = jax.tree.map(lambda x: jnp.zeros((*x.shape[:-1], x.shape[-1] + 1)), params)
    with pytest.raises(ValueError, match="`grads` at 'attn/o_proj/kernel' has shape"):
        lorajax.adapters.init(KEY, params, rank=2, init="lora_ga", grads=bad)
    with pytest.raises(ValueError, match="`grads` is used by init='lora_ga' only"):
        lorajax.adapters.init(KEY, params, rank=2, grads=params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0}, "`alpha` must be a positive number, got 0"),
        ({"alpha": -1.0}, "`alpha` must be a positive number"),
        ({"init": "kaiming"}, "`init` must be one of 'default'"),
        ({"rank": 0}, "`rank` must be a positive int"),
        ({"sparsity": 0.5}, "`sparsity` applies to init='lori' only"),
        ({"init": "lori", "sparsity": 1.0}, r"`sparsity` must be in \[0, 1\)"),
        ({"rank_pattern": {"(": 2}}, "`rank_pattern` key '\\(' is not a valid regular"),
        ({"alpha_pattern": {"q_proj": 0}}, r"`alpha_pattern\['q_proj'\]` must be a positive"),
        ({"targets": "nothing_here"}, "selects no leaf"),
        ({"dtype": jnp.int32}, "`dtype` must be a floating dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lorajax.adapters.init(KEY, _params(), **({"rank": 2} | kwargs))


def test_merge_rejects_adapters_that_do_not_fit():
    params = _params()
    ad, _ = lorajax.adapters.init(KEY, params, rank=2)
    with pytest.raises(ValueError, match="do not have the structure of `params`"):
        lorajax.adapters.merge({"attn": params["attn"]}, ad)
    other = dict(params, mlp={"up_proj": {"kernel": jnp.ones((16, 41)), "bias": jnp.ones(41)}})
    with pytest.raises(ValueError, match=r"built for a kernel of shape \(16, 40\)"):
        lorajax.adapters.merge(other, ad)
    lora = ad["attn"]["q_proj"]["kernel"]
    ad["attn"]["q_proj"]["kernel"] = lora.replace(b=jnp.zeros((3, 16)))
    with pytest.raises(ValueError, match=r"factors have shapes a=\(24, 2\), b=\(3, 16\)"):
        lorajax.adapters.merge(params, ad)

"""Adapter mode against Hugging Face PEFT on the same weights (the ``interop`` extra).

A tiny Llama-style block (q_proj, v_proj, up_proj, down_proj) is built in torch and
wrapped with ``peft.get_peft_model``; the same weights are read into our layout
(``kernel = weightᵀ``, ``a = lora_A.weightᵀ``, ``b = lora_B.weightᵀ``) and run through a
JAX copy of the block. Every comparison is relative to the scale of PEFT's value, at
1e-5 in float32. The module is skipped when torch or peft is not installed.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import lorajax  # noqa: E402

D, H, BATCH = 12, 20, 5
MODULES = ("q_proj", "v_proj", "up_proj", "down_proj")
TOL = 1e-5


class Block(torch.nn.Module):
    """``down(tanh(up(tanh(q(x)) * v(x))))``: every kernel shape (square, wide, tall)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = torch.nn.Linear(D, D, bias=bias)
        self.v_proj = torch.nn.Linear(D, D, bias=bias)
        self.up_proj = torch.nn.Linear(D, H, bias=bias)
        self.down_proj = torch.nn.Linear(H, D, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.q_proj(x)) * self.v_proj(x)
        return self.down_proj(torch.tanh(self.up_proj(h)))


def _dense(p, x):
    y = x @ p["kernel"]
    return y if "bias" not in p else y + p["bias"][None, :]


def block(params, x):
    """The JAX twin of :class:`Block` on a params tree in our layout."""
    h = jnp.tanh(_dense(params["q_proj"], x)) * _dense(params["v_proj"], x)
    return _dense(params["down_proj"], jnp.tanh(_dense(params["up_proj"], h)))


def to_jax(t):
    return jnp.asarray(t.detach().cpu().numpy())


def to_torch(x):
    return torch.tensor(np.array(x, np.float32))


def to_np(x):
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float64)


# Float32 SVDs (ours and torch's) agree to a few 1e-5 of the matrix scale.
SVD_TOL = 3e-5


def assert_close(ours, theirs, tol=TOL, what=""):
    """``max|ours − theirs| <= tol · max|theirs|``."""
    ours, theirs = to_np(ours), to_np(theirs)
    assert ours.shape == theirs.shape, f"{what}: shapes {ours.shape} vs {theirs.shape}"
    scale = np.max(np.abs(theirs))
    assert scale > 0, f"{what}: the reference is all zeros, the comparison proves nothing"
    err = np.max(np.abs(ours - theirs)) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def make_block(bias=True, seed=0):
    torch.manual_seed(seed)
    return Block(bias).float().eval()


def params_of(model):
    """Our params tree for a torch :class:`Block` (or its PEFT base layers)."""
    out = {}
    for name in MODULES:
        layer = getattr(model, name)
        layer = getattr(layer, "base_layer", layer)
        out[name] = {"kernel": to_jax(layer.weight).T}
        if layer.bias is not None:
            out[name]["bias"] = to_jax(layer.bias)
    return out


def wrap(model, *, modules=MODULES, **config):
    cfg = peft.LoraConfig(target_modules=list(modules), lora_dropout=0.0, **config)
    return peft.get_peft_model(model, cfg).eval()


def layer(peft_model, name):
    return getattr(peft_model.base_model.model, name)


def randomize_b(peft_model, adapter="default", seed=1, modules=MODULES):
    """Gives every ``lora_B`` random values so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in modules:
            w = layer(peft_model, name).lora_B[adapter].weight
            w.copy_(0.3 * torch.randn(w.shape, generator=gen))


def adapters_from_peft(peft_model, params, adapter="default", modules=MODULES, targets=None):
    """Our adapters holding PEFT's factors; scale, alpha and rank come from our ``init``."""
    cfg = peft_model.peft_config[adapter]
    ad, base = lorajax.adapters.init(
        0,
        params,
        rank=cfg.r,
        alpha=cfg.lora_alpha,
        targets=targets or "all-linear",
        use_rslora=cfg.use_rslora,
        rank_pattern=cfg.rank_pattern or None,
        alpha_pattern=cfg.alpha_pattern or None,
    )
    assert base is params
    for name in modules:
        lyr = layer(peft_model, name)
        lora = ad[name]["kernel"]
        ad[name]["kernel"] = lora.replace(
            a=to_jax(lyr.lora_A[adapter].weight).T, b=to_jax(lyr.lora_B[adapter].weight).T
        )
    return ad


def peft_forward(peft_model, x):
    with torch.no_grad():
        return peft_model(to_torch(x))


def x_input(seed=2):
    return jax.random.normal(jax.random.key(seed), (BATCH, D), jnp.float32)


# --------------------------------------------------------------------------- scale


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize(("r", "alpha"), [(4, 4), (4, 6), (8, 3)])
def test_scale_matches_peft_scaling(r, alpha, use_rslora):
    model = make_block()
    params = params_of(model)
    pm = wrap(model, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    ad, _ = lorajax.adapters.init(0, params, rank=r, alpha=alpha, use_rslora=use_rslora)
    for name in MODULES:
        lora, lyr = ad[name]["kernel"], layer(pm, name)
        assert lora.rank == lyr.r["default"]
        assert lora.scale == pytest.approx(lyr.scaling["default"], rel=1e-12), name


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_match_peft(use_rslora):
    model = make_block()
    params = params_of(model)
    ranks, alphas = {"up_proj": 6, "v_proj": 2}, {"down_proj": 3, "up_proj": 12}
    pm = wrap(
        model,
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )
    ad, _ = lorajax.adapters.init(
        0,
        params,
        rank=4,
        alpha=8,
        use_rslora=use_rslora,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )
    for name in MODULES:
        lora, lyr = ad[name]["kernel"], layer(pm, name)
        assert lora.rank == lyr.r["default"], name
        assert lora.a.shape == tuple(lyr.lora_A["default"].weight.shape[::-1]), name
        assert lora.b.shape == tuple(lyr.lora_B["default"].weight.shape[::-1]), name
        assert lora.scale == pytest.approx(lyr.scaling["default"], rel=1e-12), name


@pytest.mark.parametrize(("init", "peft_init"), [("default", True), ("gaussian", "gaussian")])
def test_random_init_has_peft_distribution(init, peft_init):
    # Large enough that the spread of 4096 draws pins the law: U(±1/√d_in) or N(0, 1/r²).
    d_in, d_out, r = 256, 16, 16
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(d_in, d_out, bias=False))
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=peft_init)
    )
    theirs = to_np(pm.base_model.model.q_proj.lora_A["default"].weight)
    assert not np.any(to_np(pm.base_model.model.q_proj.lora_B["default"].weight))
    params = {"q_proj": {"kernel": jnp.zeros((d_in, d_out))}}
    ad, _ = lorajax.adapters.init(0, params, rank=r, init=init)
    ours = to_np(ad["q_proj"]["kernel"].a)
    assert not np.any(to_np(ad["q_proj"]["kernel"].b))
    if init == "default":
        bound = 1 / math.sqrt(d_in)
        for a in (ours, theirs):
            assert np.max(np.abs(a)) <= bound
            assert np.max(np.abs(a)) > 0.99 * bound
        expected_std = bound / math.sqrt(3)
    else:
        expected_std = 1 / r
    assert abs(np.mean(ours)) < 0.05 * expected_std and abs(np.mean(theirs)) < 0.05 * expected_std
    assert np.std(ours) == pytest.approx(expected_std, rel=0.04)
    assert np.std(theirs) == pytest.approx(expected_std, rel=0.04)


# --------------------------------------------------------------------------- LoRA forward


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("modules", [MODULES, ("q_proj", "up_proj")], ids=["all", "some"])
def test_merge_forward_matches_peft(bias, use_rslora, modules):
    model = make_block(bias)
    params = params_of(model)
    pm = wrap(model, r=4, lora_alpha=6, use_rslora=use_rslora, modules=modules)
    randomize_b(pm, modules=modules)
    targets = None if modules == MODULES else "(q_proj|up_proj)/kernel"
    ad = adapters_from_peft(pm, params, modules=modules, targets=targets)
    x = x_input()
    y_peft = peft_forward(pm, x)
    y_base = block(params, x)
    # The adapters really move the output, so equal outputs are not equal base outputs.
    assert np.max(np.abs(to_np(y_base) - to_np(y_peft))) > 1e-2 * np.max(np.abs(to_np(y_peft)))
    assert_close(block(lorajax.adapters.merge(params, ad), x), y_peft, what="merge")
    assert_close(lorajax.adapters.apply(block)(params, ad, x), y_peft, what="apply")
    # PEFT's own merge gives the same kernels as ours.
    merged_torch = copy.deepcopy(pm).merge_and_unload()
    merged = lorajax.adapters.merge(params, ad)
    for name in MODULES:
        assert_close(merged[name]["kernel"], getattr(merged_torch, name).weight.T, what=name)


# --------------------------------------------------------------------------- PiSSA / OLoRA


def _sign_align(ours_a, theirs_a):
    """±1 per rank column so that ``ours_a · diag(sign)`` points like ``theirs_a``."""
    return np.sign(np.sum(to_np(ours_a) * to_np(theirs_a), axis=0))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft(init, use_rslora):
    model = make_block(bias=True)
    params = params_of(model)  # the original weights, before PEFT rewrites them in place
    x = x_input()
    with torch.no_grad():
        y_orig = model(to_torch(x))
    r, alpha = 4, 6
    pm = wrap(model, r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=init)
    ad, base = lorajax.adapters.init(
        0, params, rank=r, alpha=alpha, init=init, use_rslora=use_rslora
    )
    peft_base = params_of(pm.base_model.model)
    for name in MODULES:
        lora, lyr = ad[name]["kernel"], layer(pm, name)
        theirs_a = to_jax(lyr.lora_A["default"].weight).T
        theirs_b = to_jax(lyr.lora_B["default"].weight).T
        what = f"{init}/{name}"
        # The residual base weight PEFT writes in place.
        # W0 − s·a·b cancels W0's top-r part: float32 rounding of W0's scale, measured
        # against the smaller residual's, is up to ~2e-5.
        assert_close(
            base[name]["kernel"], peft_base[name]["kernel"], tol=SVD_TOL, what=f"{what} residual"
        )
        assert_close(base[name]["bias"], peft_base[name]["bias"], what=f"{what} bias")
        # The adapter's update s·a·b, free of any sign convention of the factorisation.
        theirs_delta = lyr.scaling["default"] * (theirs_a @ theirs_b)
        assert_close(lora.delta(), theirs_delta, tol=SVD_TOL, what=f"{what} s·a·b")
        # The factors themselves, up to one sign per rank component.
        sign = _sign_align(lora.a, theirs_a)
        assert_close(to_np(lora.a) * sign[None, :], theirs_a, tol=SVD_TOL, what=f"{what} a")
        assert_close(to_np(lora.b) * sign[:, None], theirs_b, tol=SVD_TOL, what=f"{what} b")
    # At init both reproduce the original model.
    y_peft = peft_forward(pm, x)
    assert_close(y_peft, y_orig, what="PEFT keeps the function")
    assert_close(lorajax.adapters.apply(block)(base, ad, x), y_peft, what=f"{init} forward")

    # After the same change of b on both sides (sign-aligned), outputs still agree.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in MODULES:
            lyr, lora = layer(pm, name), ad[name]["kernel"]
            step = 0.1 * torch.randn(lyr.lora_B["default"].weight.shape, generator=gen)
            lyr.lora_B["default"].weight.add_(step)
            sign = _sign_align(lora.a, to_jax(lyr.lora_A["default"].weight).T)
            new_b = to_np(lora.b) + sign[:, None] * to_np(step).T
            ad[name]["kernel"] = lora.replace(b=jnp.asarray(new_b, jnp.float32))
    y_peft = peft_forward(pm, x)
    assert np.max(np.abs(to_np(y_peft) - to_np(y_orig))) > 1e-2 * np.max(np.abs(to_np(y_orig)))
    assert_close(lorajax.adapters.apply(block)(base, ad, x), y_peft, what=f"{init} moved")


# --------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("bias", [True, False])
def test_dora_matches_peft(bias):
    model = make_block(bias)
    params = params_of(model)
    pm = wrap(model, r=4, lora_alpha=6, use_dora=True)
    # PEFT sets the magnitude when the layer is created, with lora_B still zero.
    ad = lorajax.adapters.dora(params, adapters_from_peft(pm, params))
    for name in MODULES:
        theirs = layer(pm, name).lora_magnitude_vector["default"].weight
        assert_close(ad[name]["kernel"].magnitude, theirs, what=f"{name} magnitude")

    # Now move b and the magnitude the same way on both sides.
    randomize_b(pm)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in MODULES:
            m = layer(pm, name).lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=gen))
    moved = adapters_from_peft(pm, params)
    for name in MODULES:
        m = to_jax(layer(pm, name).lora_magnitude_vector["default"].weight)
        moved[name]["kernel"] = moved[name]["kernel"].replace(magnitude=m)
    x = x_input()
    y_peft = peft_forward(pm, x)
    y_lora = block(lorajax.adapters.merge(params, adapters_from_peft(pm, params)), x)
    # DoRA really differs from plain LoRA here.
    assert np.max(np.abs(to_np(y_lora) - to_np(y_peft))) > 1e-2 * np.max(np.abs(to_np(y_peft)))
    assert_close(lorajax.adapters.apply(block)(params, moved, x), y_peft, what="DoRA forward")

    # Re-initialising DoRA at the moved b matches PEFT's norm of W0 + s·B·A.
    again = lorajax.adapters.dora(params, adapters_from_peft(pm, params))
    for name in MODULES:
        lyr = layer(pm, name)
        with torch.no_grad():
            theirs = lyr.lora_magnitude_vector["default"].get_weight_norm(
                lyr.get_base_layer().weight,
                lyr.lora_B["default"].weight @ lyr.lora_A["default"].weight,
                lyr.scaling["default"],
            )
        assert_close(again[name]["kernel"].magnitude, theirs, what=f"{name} magnitude at b")


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_gradients_match_peft(variant):
    model = make_block(bias=True)
    params = params_of(model)
    pm = wrap(model, r=4, lora_alpha=6, use_rslora=variant == "rslora", use_dora=variant == "dora")
    randomize_b(pm)
    ad = adapters_from_peft(pm, params)
    if variant == "dora":  # PEFT's magnitude: the norms of W0, set while b was zero
        for name in MODULES:
            m = to_jax(layer(pm, name).lora_magnitude_vector["default"].weight)
            ad[name]["kernel"] = ad[name]["kernel"].replace(magnitude=m)
    x = x_input()
    target = jax.random.normal(jax.random.key(5), (BATCH, D), jnp.float32)

    pm.train()
    pm.zero_grad()
    y = pm(to_torch(x))
    torch.mean((y - to_torch(target)) ** 2).backward()

    def loss(adapters):
        return jnp.mean((lorajax.adapters.apply(block)(params, adapters, x) - target) ** 2)

    grads = jax.grad(loss)(ad)
    for name in MODULES:
        g, lyr = grads[name]["kernel"], layer(pm, name)
        assert_close(g.a, lyr.lora_A["default"].weight.grad.T, what=f"{name} grad a")
        assert_close(g.b, lyr.lora_B["default"].weight.grad.T, what=f"{name} grad b")
        if variant == "dora":
            theirs = lyr.lora_magnitude_vector["default"].weight.grad
            assert_close(g.magnitude, theirs, what=f"{name} grad magnitude")


# --------------------------------------------------------------------------- combining


def _two_adapters(r2, alpha2):
    """PEFT adapters "default" (r=4, α=6) and "two", all factors random; and ours."""
    model = make_block(bias=True)
    params = params_of(model)
    pm = wrap(model, r=4, lora_alpha=6)
    pm.add_adapter(
        "two",
        peft.LoraConfig(r=r2, lora_alpha=alpha2, target_modules=list(MODULES), lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for adapter in ("default", "two"):
            for name in MODULES:
                lyr = layer(pm, name)
                for w in (lyr.lora_A[adapter].weight, lyr.lora_B[adapter].weight):
                    w.copy_(0.3 * torch.randn(w.shape, generator=gen))
    ad1 = adapters_from_peft(pm, params, "default")
    ad2 = adapters_from_peft(pm, params, "two")
    return pm, params, ad1, ad2


WEIGHTS = [0.7, -0.4]


@pytest.mark.parametrize(
    ("method", "rank"), [("cat", None), ("svd", None), ("svd", 2)], ids=["cat", "svd", "svd2"]
)
def test_combine_matches_add_weighted_adapter(method, rank):
    pm, params, ad1, ad2 = _two_adapters(r2=3, alpha2=5)
    pm.add_weighted_adapter(
        ["default", "two"], WEIGHTS, "mix", combination_type=method, svd_rank=rank
    )
    ours = lorajax.adapters.combine([ad1, ad2], WEIGHTS, method, rank=rank)
    for name in MODULES:
        lora, lyr = ours[name]["kernel"], layer(pm, name)
        theirs_a = to_jax(lyr.lora_A["mix"].weight).T
        theirs_b = to_jax(lyr.lora_B["mix"].weight).T
        assert lora.rank == lyr.r["mix"], name
        assert lora.scale == pytest.approx(lyr.scaling["mix"]), name
        theirs_delta = lyr.scaling["mix"] * (theirs_a @ theirs_b)
        assert_close(lora.delta(), theirs_delta, what=f"{method} {name} s·a·b")
        if method == "cat":  # no factorisation: the factors are the same arrays
            assert_close(lora.a, theirs_a, what=f"cat {name} a")
            assert_close(lora.b, theirs_b, what=f"cat {name} b")
    pm.set_adapter("mix")
    x = x_input()
    assert_close(lorajax.adapters.apply(block)(params, ours, x), peft_forward(pm, x), what=method)


@pytest.mark.parametrize("alpha2", [6, 4.5], ids=["same-scale", "other-scale"])
def test_combine_linear_matches_add_weighted_adapter(alpha2):
    # "linear" sums the factors, so PEFT needs equal ranks.
    pm, params, ad1, ad2 = _two_adapters(r2=4, alpha2=alpha2)
    pm.add_weighted_adapter(["default", "two"], WEIGHTS, "mix", combination_type="linear")
    ours = lorajax.adapters.combine([ad1, ad2], WEIGHTS, "linear")
    for name in MODULES:
        lora, lyr = ours[name]["kernel"], layer(pm, name)
        theirs_a = to_jax(lyr.lora_A["mix"].weight).T
        theirs_b = to_jax(lyr.lora_B["mix"].weight).T
        theirs_delta = lyr.scaling["mix"] * (theirs_a @ theirs_b)
        assert_close(lora.delta(), theirs_delta, what=f"linear {name} s·a·b")
    pm.set_adapter("mix")
    x = x_input()
    assert_close(lorajax.adapters.apply(block)(params, ours, x), peft_forward(pm, x), what="linear")

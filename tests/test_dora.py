"""DoRA: the merged kernel, its init and its gradient against float64 derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax._src.adapters.dora import dora_merge_matrix
from lorajax.adapters import LoRA

N, M, R, S = 6, 5, 2, 1.5


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _lora(a, b, scale, spec=None, shape=None):
    spec = lorajax.MatrixSpec() if spec is None else spec
    shape = (*a.shape[:-1], b.shape[-1]) if shape is None else shape
    rank = a.shape[-1]
    return LoRA(a=a, b=b, scale=scale, alpha=scale * rank, rank=rank, layout=spec.resolve(shape))


def _f64(x):
    return np.asarray(x, np.float64)


def _dora_np(w0, a, b, s, mag):
    """``m ⊙ V / ‖V‖`` per column (over the d_in axis), V = W0 + s a b, in float64."""
    v = _f64(w0) + s * _f64(a) @ _f64(b)
    return _f64(mag)[..., None, :] * v / np.linalg.norm(v, axis=-2, keepdims=True)


def _merged(lora, kernel):
    """The DoRA kernel as ``merge`` builds it: through the layout's matrix view."""
    layout = lora.layout
    w = dora_merge_matrix(layout.to_matrix(kernel), layout.to_matrix(lora.delta()), lora.magnitude)
    return layout.from_matrix(w)


def test_forward_of_a_linear_model_matches_the_formula():
    w0, a, b = _normal(0, (N, M)), _normal(1, (N, R)), _normal(2, (R, M))
    mag = 0.5 + jnp.abs(_normal(3, (M,)))
    x = _normal(4, (3, N))
    lora = _lora(a, b, S).replace(magnitude=mag)
    y = x @ _merged(lora, w0)
    want = _f64(x) @ _dora_np(w0, a, b, S, mag)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)
    # The defining property: every output column of the DoRA kernel has norm m.
    cols = np.linalg.norm(np.asarray(_merged(lora, w0), np.float64), axis=0)
    np.testing.assert_allclose(cols, _f64(mag), rtol=1e-5)


@pytest.mark.parametrize("b_zero", [True, False])
def test_at_init_the_dora_kernel_equals_the_lora_kernel(b_zero):
    w0, a = _normal(0, (N, M)), _normal(1, (N, R))
    b = jnp.zeros((R, M)) if b_zero else _normal(2, (R, M))
    params = {"dense": {"kernel": w0, "bias": jnp.zeros(M)}}
    adapters = {"dense": {"kernel": _lora(a, b, S), "bias": None}}
    out = lorajax.adapters.dora(params, adapters)
    lora = out["dense"]["kernel"]
    assert out["dense"]["bias"] is None
    assert lora.magnitude.shape == (M,) and lora.magnitude.dtype == jnp.float32
    lora_kernel = _f64(w0) + S * _f64(a) @ _f64(b)
    np.testing.assert_allclose(
        np.asarray(lora.magnitude), np.linalg.norm(lora_kernel, axis=0), rtol=1e-6
    )
    if b_zero:
        np.testing.assert_allclose(
            np.asarray(lora.magnitude), np.linalg.norm(_f64(w0), axis=0), rtol=1e-6
        )
    np.testing.assert_allclose(np.asarray(_merged(lora, w0)), lora_kernel, atol=1e-5)
    # Factors and metadata are untouched.
    for field in ("a", "b"):
        np.testing.assert_array_equal(
            getattr(lora, field), getattr(adapters["dense"]["kernel"], field)
        )
    assert (lora.scale, lora.rank, lora.layout) == (S, R, adapters["dense"]["kernel"].layout)


def test_gradient_treats_the_norm_as_a_constant():
    w0, a, b = _normal(0, (N, M)), _normal(1, (N, R)), _normal(2, (R, M), 0.5)
    mag = 0.5 + jnp.abs(_normal(3, (M,)))
    x, t = _normal(4, (7, N)), _normal(5, (7, M))

    def loss(a, b, mag, merge=dora_merge_matrix):
        y = x @ merge(w0, S * a @ b, mag)
        return 0.5 * jnp.sum((y - t) ** 2)

    ga, gb, gm = jax.grad(loss, argnums=(0, 1, 2))(a, b, mag)

    # By hand, in float64, with N = ‖V‖ held fixed: W' = V · diag(m / N).
    v = _f64(w0) + S * _f64(a) @ _f64(b)
    norm = np.linalg.norm(v, axis=0)
    g = _f64(x).T @ (_f64(x) @ (v * (_f64(mag) / norm)) - _f64(t))  # ∂L/∂W'
    gv = g * (_f64(mag) / norm)
    want_a, want_b = S * gv @ _f64(b).T, S * _f64(a).T @ gv
    want_m = np.sum(g * v / norm, axis=0)
    for got, want in ((ga, want_a), (gb, want_b), (gm, want_m)):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)

    # Differentiating through the norm gives a clearly different gradient for a and b.
    def full(w0, delta, mag):
        v = w0 + delta
        return mag[None, :] * v / jnp.linalg.norm(v, axis=0, keepdims=True)

    fa, fb, _ = jax.grad(loss, argnums=(0, 1, 2))(a, b, mag, merge=full)
    assert np.max(np.abs(np.asarray(fa) - want_a)) > 1e-2
    assert np.max(np.abs(np.asarray(fb) - want_b)) > 1e-2


def test_stacked_kernels_get_one_magnitude_per_layer():
    layers = 3
    w0 = _normal(0, (layers, N, M))
    a, b = _normal(1, (layers, N, R)), _normal(2, (layers, R, M), 0.3)
    spec = lorajax.MatrixSpec(batch_axes=(0,))
    params = {"layers": {"kernel": w0}}
    lora = lorajax.adapters.dora(params, {"layers": {"kernel": _lora(a, b, S, spec)}})
    lora = lora["layers"]["kernel"]
    assert lora.magnitude.shape == (layers, M)
    v = _f64(w0) + S * np.einsum("lnr,lrm->lnm", _f64(a), _f64(b))
    np.testing.assert_allclose(np.asarray(lora.magnitude), np.linalg.norm(v, axis=1), rtol=1e-6)
    # A trained (different) magnitude, layer by layer.
    mag = lora.magnitude * (1.0 + _normal(3, (layers, M), 0.2))
    got = _merged(lora.replace(magnitude=mag), w0)
    for i in range(layers):
        np.testing.assert_allclose(
            np.asarray(got[i]), _dora_np(w0[i], a[i], b[i], S, mag[i]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    "shape, spec, unit_axes",
    [
        # Flax attention query kernel (d, heads, head_dim): output units are (head, dim).
        ((6, 2, 3), lorajax.MatrixSpec(in_axes=0, out_axes=(1, 2)), (0,)),
        # Flax attention out kernel (heads, head_dim, d): the norm runs over (head, dim).
        ((2, 3, 4), lorajax.MatrixSpec(in_axes=(0, 1), out_axes=2), (0, 1)),
    ],
)
def test_nd_kernels_through_their_layout(shape, spec, unit_axes):
    layout = spec.resolve(shape)
    n, m = layout.n, layout.m
    w0 = _normal(0, shape)
    lora = _lora(_normal(1, (n, R)), _normal(2, (R, m), 0.3), S, spec, shape)
    params = {"attention": {"query": {"kernel": w0}}}
    out = lorajax.adapters.dora(params, {"attention": {"query": {"kernel": lora}}})
    lora = out["attention"]["query"]["kernel"]
    assert lora.magnitude.shape == (m,)
    # Oracle in the kernel's own shape: the norm over the input axes of W0 + ΔW.
    v = _f64(w0) + _f64(lora.delta())
    norms = np.sqrt(np.sum(v**2, axis=unit_axes))
    np.testing.assert_allclose(np.asarray(lora.magnitude), norms.reshape(-1), rtol=1e-6)
    mag = 0.5 + jnp.abs(_normal(3, (m,)))
    got = np.asarray(_merged(lora.replace(magnitude=mag), w0), np.float64)
    assert got.shape == shape
    out_shape = tuple(d for i, d in enumerate(shape) if i not in unit_axes)
    scale = np.expand_dims(_f64(mag).reshape(out_shape) / norms, unit_axes)
    np.testing.assert_allclose(got, scale * v, atol=1e-5, rtol=1e-5)


def test_a_zero_column_stays_zero_without_nans():
    w0 = jnp.array([[3.0, 0.0], [4.0, 0.0]])
    lora = _lora(jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0)
    lora = lorajax.adapters.dora({"k": w0}, {"k": lora})["k"]
    np.testing.assert_array_equal(lora.magnitude, [5.0, 0.0])
    np.testing.assert_array_equal(_merged(lora, w0), w0)
    g = jax.grad(lambda m: jnp.sum(dora_merge_matrix(w0, jnp.zeros((2, 2)), m)))(lora.magnitude)
    assert np.all(np.isfinite(np.asarray(g)))


def test_jit_gives_the_same_kernel():
    w0, a, b = _normal(0, (N, M)), _normal(1, (N, R)), _normal(2, (R, M))
    mag = 1.0 + jnp.abs(_normal(3, (M,)))
    eager = dora_merge_matrix(w0, S * a @ b, mag)
    jitted = jax.jit(dora_merge_matrix)(w0, S * a @ b, mag)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


@pytest.mark.parametrize(
    "w0, delta, mag, match",
    [
        (jnp.zeros(4), jnp.zeros(4), jnp.zeros(4), r"`w0` must be a \(batch of\) matrices"),
        (jnp.zeros((4, 3)), jnp.zeros((3, 4)), jnp.zeros(3), "`delta` must have the shape"),
        (
            jnp.zeros((4, 3)),
            jnp.zeros((4, 3)),
            jnp.zeros(4),
            r"`magnitude` must have shape.*\(3,\)",
        ),
        (jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 3)), jnp.zeros(3), r"\(2, 3\)"),
    ],
)
def test_merge_matrix_rejects_bad_shapes(w0, delta, mag, match):
    with pytest.raises(ValueError, match=match):
        dora_merge_matrix(w0, delta, mag)


def test_dora_rejects_adapters_that_do_not_fit():
    lora = _lora(jnp.zeros((N, R)), jnp.zeros((R, M)), S)
    with pytest.raises(ValueError, match=r"built for a kernel of shape \(6, 5\)"):
        lorajax.adapters.dora({"k": jnp.zeros((M, N))}, {"k": lora})
    with pytest.raises(ValueError, match="do not have the structure of `params`"):
        lorajax.adapters.dora({"k": jnp.zeros((N, M)), "j": jnp.zeros((N, M))}, {"k": lora})


def test_through_init_and_merge():
    w0 = _normal(0, (N, M))
    params = {"mlp": {"up_proj": {"kernel": w0, "bias": jnp.zeros(M)}}}
    ad, base = lorajax.adapters.init(jax.random.key(1), params, rank=R, alpha=3.0)
    assert base is params
    ad = lorajax.adapters.dora(params, ad)
    # At init (b = 0) the DoRA model is the base model.
    np.testing.assert_allclose(
        np.asarray(lorajax.adapters.merge(params, ad)["mlp"]["up_proj"]["kernel"]), w0, atol=1e-6
    )
    lora = ad["mlp"]["up_proj"]["kernel"]
    lora = lora.replace(b=_normal(2, (R, M), 0.5), magnitude=lora.magnitude * 1.3)
    ad["mlp"]["up_proj"]["kernel"] = lora
    x, t = _normal(4, (7, N)), _normal(5, (7, M))

    def loss(ad):
        y = x @ lorajax.adapters.merge(params, ad)["mlp"]["up_proj"]["kernel"]
        return 0.5 * jnp.sum((y - t) ** 2)

    s = lora.scale  # alpha / r = 1.5
    want = _dora_np(w0, lora.a, lora.b, s, lora.magnitude)
    merged = lorajax.adapters.merge(params, ad)["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged), want, atol=1e-5, rtol=1e-5)
    g = jax.jit(jax.grad(loss))(ad)["mlp"]["up_proj"]["kernel"]
    v = _f64(w0) + s * _f64(lora.a) @ _f64(lora.b)
    norm, mag = np.linalg.norm(v, axis=0), _f64(lora.magnitude)
    gw = _f64(x).T @ (_f64(x) @ want - _f64(t))
    gv = gw * (mag / norm)
    np.testing.assert_allclose(np.asarray(g.a), s * gv @ _f64(lora.b).T, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g.b), s * _f64(lora.a).T @ gv, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(g.magnitude), np.sum(gw * v / norm, axis=0), atol=1e-4, rtol=1e-5
    )


def test_bf16_kernels_get_float32_magnitudes():
    w0 = _normal(0, (N, M)).astype(jnp.bfloat16)
    lora = _lora(_normal(1, (N, R)), jnp.zeros((R, M)), S)
    mag = lorajax.adapters.dora({"k": w0}, {"k": lora})["k"].magnitude
    assert mag.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(mag), np.linalg.norm(np.asarray(w0, np.float64), axis=0), rtol=1e-6
    )

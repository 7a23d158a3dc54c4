"""LoRA-Pro over adapter gradients: the tangent-space step, X, modes, and oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import lorajax
from lorajax._src.lora_pro import _sylvester
from lorajax.adapters import LoRA

N, M, R, S = 12, 9, 3, 1.7
X_MODES = ["sylvester", "symmetry", "zero"]


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def _lora(a, b, scale=S, frozen=False, magnitude=None, dtype=jnp.float32):
    mag = None if magnitude is None else jnp.asarray(magnitude, dtype)
    return LoRA(
        a=jnp.asarray(a, dtype),
        b=jnp.asarray(b, dtype),
        magnitude=mag,
        scale=scale,
        alpha=scale * a.shape[-1],
        rank=a.shape[-1],
        frozen_a=frozen,
    )


def _lora_grads(lora, g):
    """g_a = s G bᵀ, g_b = s aᵀ G, by differentiating <G, s a b> through the adapter."""
    return jax.grad(lambda ad: jnp.sum(jnp.asarray(g, jnp.float32) * ad.delta()))(lora)


def _step(lora, grads, **kwargs):
    tx = lorajax.lora_pro(**kwargs)
    state = tx.init({"w": lora})
    out, _ = tx.update({"w": grads}, state, {"w": lora})
    return np.asarray(out["w"].a, np.float64), np.asarray(out["w"].b, np.float64)


def _tangent_projection(a, b, g):
    pa = a @ np.linalg.pinv(a.T @ a) @ a.T
    pb = b.T @ np.linalg.pinv(b @ b.T) @ b
    return pa @ g + g @ pb - pa @ g @ pb


def _close(got, want, tol=1e-5):
    """Agreement to ``tol`` relative to the size of ``want``."""
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)


def _problem(seed=0, zero_b=False):
    a = _normal(seed, (N, R))
    b = np.zeros((R, M)) if zero_b else _normal(seed + 1, (R, M))
    g = _normal(seed + 2, (N, M))
    return a, b, g


@pytest.mark.parametrize("zero_b", [False, True], ids=["b", "b=0"])
@pytest.mark.parametrize("x_mode", X_MODES)
def test_equivalent_gradient_is_the_tangent_space_projection(x_mode, zero_b):
    a, b, g = _problem(zero_b=zero_b)
    lora = _lora(a, b)
    grads = _lora_grads(lora, g)
    np.testing.assert_allclose(np.asarray(grads.a), S * g @ b.T, atol=1e-4, rtol=1e-5)
    grad_a, grad_b = _step(lora, grads, x_mode=x_mode)
    _close(S * (grad_a @ b + a @ grad_b), _tangent_projection(a, b, g))
    if zero_b:  # the first step: grad_a = g_a = 0, grad_b = (1/s²)(aᵀa)⁻¹ g_b
        assert np.all(grad_a == 0.0)
        _close(grad_b, np.linalg.solve(a.T @ a, S * a.T @ g) / S**2)


def test_the_projection_is_the_best_first_order_step():
    """No other (grad_a, grad_b) makes s(grad_a b + a grad_b) closer to G."""
    a, b, g = _problem(3)
    lora = _lora(a, b)
    grad_a, grad_b = _step(lora, _lora_grads(lora, g))
    best = np.linalg.norm(S * (grad_a @ b + a @ grad_b) - g)
    rng = np.random.default_rng(0)
    for _ in range(5):
        da, db = rng.normal(size=grad_a.shape), rng.normal(size=grad_b.shape)
        other = S * ((grad_a + 1e-2 * da) @ b + a @ (grad_b + 1e-2 * db))
        assert np.linalg.norm(other - g) > best
    # ... while plain LoRA's equivalent gradient s²(G bᵀ b + a aᵀ G) is further away.
    plain = S**2 * (g @ b.T @ b + a @ a.T @ g)
    assert np.linalg.norm(plain - g) > best


@pytest.mark.parametrize("case", ["full", "k1_zero", "k1_rank_deficient", "batched"])
def test_sylvester_solves_its_equation(case):
    r = 4
    k1 = _normal(10, (r, r))
    k1 = k1 @ k1.T
    k2 = _normal(11, (r, r))
    k2 = k2 @ k2.T + 0.1 * np.eye(r)
    c = _normal(12, (r, r))
    if case == "k1_zero":
        k1 = np.zeros((r, r))
    if case == "k1_rank_deficient":
        u = _normal(13, (r, 2))
        k1 = u @ u.T
    if case == "batched":
        k1 = np.stack([k1, 2 * k1, k1 + np.eye(r)])
        k2 = np.stack([k2, k2, 3 * k2])
        c = np.stack([c, -c, 2 * c])
    x = np.asarray(
        _sylvester(jnp.asarray(k1, jnp.float32), jnp.asarray(k2, jnp.float32), jnp.asarray(c)),
        np.float64,
    )
    residual = k1 @ x + x @ k2 - c
    assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(c)
    if case == "batched":
        for i in range(3):
            want = scipy.linalg.solve_sylvester(k1[i], k2[i], c[i])
            _close(x[i], want)


def _objective(a, b, g_a, g_b, grad_a0, grad_b0, y):
    """‖grad_a − g_a‖² + ‖grad_b − g_b‖² for X = yᵀ (grad_a = A0 + a y, grad_b = B0 − y b)."""
    return np.sum((grad_a0 + a @ y - g_a) ** 2) + np.sum((grad_b0 - y @ b - g_b) ** 2)


def test_sylvester_x_keeps_the_adjusted_gradients_closest_to_lora():
    a, b, g = _problem(5)
    lora = _lora(a, b)
    grads = _lora_grads(lora, g)
    g_a, g_b = S * g @ b.T, S * a.T @ g
    grad_a0, grad_b0 = _step(lora, grads, x_mode="zero")
    results = {m: _step(lora, grads, x_mode=m) for m in ("sylvester", "symmetry")}
    # Brute force: the objective is a linear least-squares problem in y = Xᵀ (r x r).
    columns = []
    for k in range(R * R):
        e = np.zeros(R * R)
        e[k] = 1.0
        e = e.reshape(R, R)
        columns.append(np.concatenate([(a @ e).ravel(), (-e @ b).ravel()]))
    design = np.stack(columns, axis=1)
    target = np.concatenate([(g_a - grad_a0).ravel(), (g_b - grad_b0).ravel()])
    y_best = np.linalg.lstsq(design, target, rcond=None)[0].reshape(R, R)
    syl_a, syl_b = results["sylvester"]
    _close(syl_a, grad_a0 + a @ y_best)
    _close(syl_b, grad_b0 - y_best @ b)
    f = lambda y: _objective(a, b, g_a, g_b, grad_a0, grad_b0, y)  # noqa: E731
    f_syl = f(y_best)
    assert f_syl < f(np.zeros((R, R)))
    y_sym = np.linalg.lstsq(a, results["symmetry"][0] - grad_a0, rcond=None)[0]
    assert f_syl < f(y_sym)
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert f_syl < f(y_best + 1e-2 * rng.normal(size=(R, R)))


def test_symmetry_x_matches_its_closed_form():
    a, b, g = _problem(6)
    lora = _lora(a, b)
    grads = _lora_grads(lora, g)
    g_b = S * a.T @ g
    grad_a0, grad_b0 = _step(lora, grads, x_mode="zero")
    grad_a, grad_b = _step(lora, grads, x_mode="symmetry")
    x = -np.linalg.inv(b @ b.T) @ b @ g_b.T @ (a.T @ a) / (2 * S**2)
    _close(grad_a, grad_a0 + a @ x.T, tol=1e-4)
    _close(grad_b, grad_b0 - x.T @ b, tol=1e-4)


def test_x_mode_moves_the_split_but_not_the_equivalent_gradient():
    a, b, g = _problem(7)
    lora = _lora(a, b)
    grads = _lora_grads(lora, g)
    out = {m: _step(lora, grads, x_mode=m) for m in X_MODES}
    equiv = {m: S * (ga @ b + a @ gb) for m, (ga, gb) in out.items()}
    for m in ("sylvester", "symmetry"):
        assert np.linalg.norm(out[m][0] - out["zero"][0]) > 1e-2 * np.linalg.norm(out["zero"][0])
        assert np.linalg.norm(out[m][1] - out["zero"][1]) > 1e-2 * np.linalg.norm(out["zero"][1])
        _close(equiv[m], equiv["zero"])


@pytest.mark.parametrize("basis", ["svd", "random_orthogonal", "randomized_svd"])
def test_adapter_step_equals_the_adapter_free_step(basis):
    """lora_pro + SGD on adapters spanning (U, V) moves W as low_rank(side="both") does."""
    g = _normal(20, (N, M))
    tx = lorajax.low_rank(
        optax.identity(),
        rank=R,
        side="both",
        align="lora_pro",
        basis=basis,
        refresh_every=5,
    )
    state = tx.init({"w": jnp.zeros((N, M))})
    update, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
    u, v = (np.asarray(x, np.float64) for x in lorajax.current_bases(state)["w"])
    r1 = _normal(21, (R, R)) + 2 * np.eye(R)
    r2 = _normal(22, (R, R)) + 2 * np.eye(R)
    a, b = u @ r1, r2 @ v.T
    lora = _lora(a, b)
    lr = 0.1
    sgd = optax.chain(lorajax.lora_pro(), optax.sgd(lr))
    opt_state = sgd.init({"w": lora})
    step, _ = sgd.update({"w": _lora_grads(lora, g)}, opt_state, {"w": lora})
    da, db = np.asarray(step["w"].a, np.float64), np.asarray(step["w"].b, np.float64)
    delta_w = S * (da @ b + a @ db)  # first order in lr
    _close(delta_w, -lr * np.asarray(update["w"], np.float64))


def test_frozen_a_is_lora_fa():
    a, b, g = _problem(8)
    lora = _lora(a, b, frozen=True)
    grads = _lora_grads(lora, g)
    for x_mode in X_MODES:
        grad_a, grad_b = _step(lora, grads, x_mode=x_mode)
        assert np.all(grad_a == 0.0)
        _close(grad_b, np.linalg.solve(a.T @ a, S * a.T @ g) / S**2)
        pa = a @ np.linalg.inv(a.T @ a) @ a.T
        _close(S * a @ grad_b, pa @ g)  # the best step with a fixed
    adam = lorajax.lora_pro(mode="adam")
    state = adam.init({"w": lora})
    for _ in range(3):
        out, state = adam.update({"w": grads}, state, {"w": lora})
        assert np.all(np.asarray(out["w"].a) == 0.0)


def test_sgd_mode_passes_other_leaves_through():
    a, b, g = _problem(9)
    lora = _lora(a, b, magnitude=np.ones(M))
    params = {"w": lora, "bias": jnp.ones(M), "none": None}
    grads = {
        "w": _lora_grads(lora, g).replace(magnitude=jnp.arange(M, dtype=jnp.float32)),
        "bias": jnp.linspace(-1.0, 1.0, M),
        "none": None,
    }
    tx = lorajax.lora_pro()
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["bias"] is grads["bias"]
    assert out["w"].magnitude is grads["w"].magnitude
    assert out["none"] is None


# --- mode="adam" against the released "full" mode ----------------------------------


def _released_full_mode(a, b, c, w0, x, y, s, lr, steps, x_mode, b1=0.9, b2=0.999, eps=1e-8):
    """The released full mode in float64, in PyTorch's layout (W_t = W0ᵀ + s B A).

    ``A = aᵀ (r, n)``, ``B = bᵀ (m, r)``. As in the released code, with one change: exact
    pseudo-inverses instead of ``pinv(K + 1e-8 I)``.
    """
    big_a, big_b = a.T.copy(), b.T.copy()
    m_w = np.zeros((w0.shape[1], w0.shape[0]))
    v_w = np.zeros_like(m_w)
    m_c, v_c = np.zeros_like(c), np.zeros_like(c)
    eye = np.eye(big_b.shape[0])

    def adjust(ga, gb, aat_inv, btb_inv, aat, btb):
        if x_mode == "sylvester":
            xx = scipy.linalg.solve_sylvester(btb, aat, -(1 / s**2) * btb_inv @ ga @ big_a.T)
        elif x_mode == "symmetry":
            xx = -0.5 * (1 / s**2) * btb_inv @ big_b.T @ gb @ aat
        else:
            xx = np.zeros_like(btb)
        grad_a = (1 / s**2) * btb_inv @ ga + xx @ big_a
        grad_b = (1 / s**2) * (eye - big_b @ btb_inv @ big_b.T) @ gb @ aat_inv - big_b @ xx
        return grad_a, grad_b

    for t in range(1, steps + 1):
        w = w0 + s * big_a.T @ big_b.T
        resid = (x @ w + c - y) / x.shape[0]
        g_t = (x.T @ resid).T  # dL/dW in PyTorch's (d_out, d_in) layout
        g_c = resid.sum(0)
        ga, gb = s * big_b.T @ g_t, s * g_t @ big_a.T
        aat, btb = big_a @ big_a.T, big_b.T @ big_b
        aat_inv, btb_inv = np.linalg.pinv(aat), np.linalg.pinv(btb)
        grad_a = (1 / s**2) * btb_inv @ ga
        grad_b = (1 / s**2) * (eye - big_b @ btb_inv @ big_b.T) @ gb @ aat_inv
        equiv = s * big_b @ grad_a + s * grad_b @ big_a
        m_w = b1 * m_w + (1 - b1) * equiv
        v_w = b2 * v_w + (1 - b2) * equiv**2
        g = (m_w / (1 - b1**t)) / (np.sqrt(v_w) / np.sqrt(1 - b2**t) + eps)
        grad_a, grad_b = adjust(s * big_b.T @ g, s * g @ big_a.T, aat_inv, btb_inv, aat, btb)
        m_c = b1 * m_c + (1 - b1) * g_c
        v_c = b2 * v_c + (1 - b2) * g_c**2
        c = c - lr * (m_c / (1 - b1**t)) / (np.sqrt(v_c) / np.sqrt(1 - b2**t) + eps)
        big_a = big_a - lr * grad_a
        big_b = big_b - lr * grad_b
    return big_a.T, big_b.T, c


def _regression(seed=30, batch=40):
    w0 = _normal(seed, (N, M))
    x = _normal(seed + 1, (batch, N))
    y = _normal(seed + 2, (batch, M))
    return w0, x, y


def _loss(params, w0, x, y):
    w = w0 + params["w"].delta()
    return 0.5 * jnp.sum((x @ w + params["c"][None, :] - y) ** 2) / x.shape[0]


@pytest.mark.parametrize("x_mode", X_MODES)
def test_adam_mode_matches_the_released_full_mode(x_mode):
    w0, x, y = _regression()
    a = _normal(33, (N, R)) / np.sqrt(N)
    b = np.zeros((R, M))  # the default init: the first step has b = 0
    c = np.zeros(M)
    lr, steps = 1e-2, 4
    want_a, want_b, want_c = _released_full_mode(a, b, c, w0, x, y, S, lr, steps, x_mode)

    params = {"w": _lora(a, b), "c": jnp.zeros(M)}
    data = [jnp.asarray(v, jnp.float32) for v in (w0, x, y)]
    tx = optax.chain(lorajax.lora_pro(mode="adam", x_mode=x_mode), optax.scale_by_learning_rate(lr))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        grads = jax.grad(_loss)(params, *data)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = train_step(params, state)
    _close(np.asarray(params["w"].a, np.float64), want_a)
    _close(np.asarray(params["w"].b, np.float64), want_b)
    _close(np.asarray(params["c"], np.float64), want_c)
    mu = state[0].mu["w"].w
    assert mu.shape == (N, M) and mu.dtype == jnp.float32  # full fine-tuning's memory


def test_adam_mode_other_leaves_get_plain_adam():
    a, b, g = _problem(40)
    lora = _lora(a, b, magnitude=np.ones(M))
    params = {"w": lora, "bias": jnp.ones(M)}
    tx = lorajax.lora_pro(mode="adam")
    adam = optax.scale_by_adam()
    state, ref_state = tx.init(params), adam.init(params)
    for t in range(3):
        grads = {
            "w": _lora_grads(lora, g * (t + 1)).replace(magnitude=jnp.cos(jnp.arange(M) + t)),
            "bias": jnp.sin(jnp.arange(M, dtype=jnp.float32) * (t + 1)),
        }
        out, state = tx.update(grads, state, params)
        ref, ref_state = adam.update(grads, ref_state)
        _close(np.asarray(out["bias"]), np.asarray(ref["bias"]))
        _close(np.asarray(out["w"].magnitude), np.asarray(ref["w"].magnitude))


def test_adam_mode_state_is_f32_for_bf16_params():
    a, b, g = _problem(41)
    params = {"w": _lora(a, b, dtype=jnp.bfloat16), "bias": jnp.ones(M, jnp.bfloat16)}
    grads = {
        "w": _lora_grads(params["w"], g),
        "bias": jnp.ones(M, jnp.bfloat16),
    }
    tx = lorajax.lora_pro(mode="adam")
    state = tx.init(params)
    out, state = jax.jit(tx.update)(grads, state, params)
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("mode", ["sgd", "adam"])
def test_stacked_factors_equal_per_layer_runs(mode):
    layers = 3
    a = _normal(50, (layers, N, R))
    b = _normal(51, (layers, R, M))
    b[1] = 0.0  # one layer at its first step
    g = _normal(52, (layers, N, M))
    stacked = _lora(a, b)
    tx = lorajax.lora_pro(mode=mode)
    state = tx.init({"w": stacked})
    for t in range(2):
        grads = _lora_grads(stacked, g * (1 + t))
        out, state = jax.jit(tx.update)({"w": grads}, state, {"w": stacked})
    for i in range(layers):
        one = _lora(a[i], b[i])
        st = tx.init({"w": one})
        for t in range(2):
            o, st = tx.update({"w": _lora_grads(one, g[i] * (1 + t))}, st, {"w": one})
        _close(np.asarray(out["w"].a[i]), np.asarray(o["w"].a))
        _close(np.asarray(out["w"].b[i]), np.asarray(o["w"].b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["sgd", "adam"])
def test_strict_dtype_promotion(mode, dtype):
    a, b, g = _problem(60)
    dt = jnp.dtype(dtype)
    lora = _lora(a, b, dtype=dt, frozen=False)
    params = {"w": lora, "fa": lora.replace(frozen_a=True), "bias": jnp.ones(M, dt)}
    grads = {
        "w": _lora_grads(lora, g),
        "fa": _lora_grads(lora, g).replace(frozen_a=True),
        "bias": jnp.ones(M, dt),
    }
    with jax.numpy_dtype_promotion("strict"):
        tx = optax.inject_hyperparams(
            lorajax.lora_pro, static_args=("mode", "x_mode"), hyperparam_dtype=jnp.float32
        )(mode=mode, eps=1e-6)
        state = tx.init(params)
        out, _ = jax.jit(tx.update)(grads, state, params)
    assert {x.dtype for x in jax.tree.leaves(out)} == {dt}


def test_errors():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        lorajax.lora_pro(mode="full")
    with pytest.raises(ValueError, match="`x_mode` must be one of"):
        lorajax.lora_pro(x_mode="sylvestre")
    for bad in (0.0, -1e-6):
        with pytest.raises(ValueError, match="`eps` must be > 0"):
            lorajax.lora_pro(eps=bad)
    with pytest.raises(ValueError, match="`b1` must be in"):
        lorajax.lora_pro(mode="adam", b1=1.0)
    with pytest.raises(ValueError, match="hyperparam_dtype=jnp.float32"):
        lorajax.lora_pro(mode="adam", b2=jnp.asarray(0.999, jnp.bfloat16))
    with pytest.raises(ValueError, match="`adam_eps` must be > 0"):
        lorajax.lora_pro(mode="adam", adam_eps=0.0)
    a, b, g = _problem(70)
    lora = _lora(a, b)
    grads = {"w": _lora_grads(lora, g)}
    tx = lorajax.lora_pro()
    state = tx.init({"w": lora})
    with pytest.raises(ValueError, match=r"needs the adapters as params: call tx.update\("):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="params hold a ArrayImpl but the updates hold a LoRA"):
        tx.update(grads, state, {"w": jnp.zeros((N, M))})
    with pytest.raises(ValueError, match="structure of the params"):
        tx.update(grads, state, {"v": lora})

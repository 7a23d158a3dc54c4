"""low_rank's update on coordinates from probes equals its update on full gradients.

The oracle: a matmul ``y = x W`` has ``G = xᵀ dY``; its probes' coordinates are
``Coordinates(P_ℓᵀ G, G P_r)``, computed here as ``(x P_ℓ)ᵀ dY`` and ``xᵀ (dY P_r)``
without forming G. Fed to the same optimizer, they must give the full-gradient path's
updates and state over steps that include refreshes (random bases: exactly the same
bases), and a one-pass sketch refresh must capture the gradient's energy (stored bases).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import Coordinates, Probe

from .util import assert_trees_close


def activations(key, params, t=40):
    """Per leaf, an input x (t, n) and an output gradient dY (t, m): G = xᵀ dY."""
    out = {}
    for i, (name, w) in enumerate(sorted(params.items())):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        *batch, n, m = w.shape
        scale = t**-0.25  # entries of G = xᵀ dY are then about N(0, 1)
        out[name] = (
            scale * jax.random.normal(k1, (*batch, t, n)),
            scale * jax.random.normal(k2, (*batch, t, m)),
        )
    return out


def full_grads(acts):
    return {k: jnp.einsum("...tn,...tm->...nm", x, dy) for k, (x, dy) in acts.items()}


def probed_grads(acts, probe_tree):
    """Coordinates from the probes, as a projected backward pass computes them."""
    out = {}
    for k, (x, dy) in acts.items():
        probe = probe_tree[k]
        if not isinstance(probe, Probe):
            out[k] = jnp.einsum("...tn,...tm->...nm", x, dy)  # FULL_GRADIENT
            continue
        xp = jnp.einsum("...tn,...na->...ta", x, probe.left)
        dyq = jnp.einsum("...tm,...mb->...tb", dy, probe.right)
        out[k] = Coordinates(
            left=jnp.einsum("...ta,...tm->...am", xp, dy),
            right=jnp.einsum("...tn,...tb->...nb", x, dyq),
        )
    return out


PARAMS = {
    "tall": jnp.zeros((48, 24)),
    "wide": jnp.zeros((20, 40)),
    "stacked": jnp.zeros((3, 24, 32)),
}

RANDOM_CASES = {
    "left": dict(side="left", basis="random"),
    "right": dict(side="right", basis="random_orthogonal"),
    "auto": dict(side="auto", basis="random"),
    "both_lora_pro": dict(side="both", basis="random", align="lora_pro"),
    "both_sum_plus": dict(side="both", basis="random", align="sum", lora_plus_ratio=4.0),
    "both_rotate_keep": dict(side="both", basis="random_orthogonal", on_refresh="keep"),
    "both_reset": dict(side="both", basis="random", on_refresh="reset"),
}


def run_both(tx, params, steps, key=0):
    """(updates, state) per step of the full-gradient path and of the probed path."""
    full_state = probed_state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        acts = activations(jax.random.fold_in(jax.random.key(key), t), params)
        probe_tree = lorajax.probes(probed_state, params)
        u_full, full_state = update(full_grads(acts), full_state, params)
        u_probed, probed_state = update(probed_grads(acts, probe_tree), probed_state, params)
        out.append((u_full, full_state, u_probed, probed_state))
    return out


@pytest.mark.parametrize("name", sorted(RANDOM_CASES))
def test_random_bases_equal_the_full_gradient_path(name):
    tx = lorajax.low_rank(optax.scale_by_adam(), rank=4, refresh_every=3, **RANDOM_CASES[name])
    for u_full, s_full, u_probed, s_probed in run_both(tx, PARAMS, steps=7):
        assert_trees_close(u_probed, u_full, atol=1e-5, rtol=1e-5)
        assert_trees_close(s_probed, s_full, atol=1e-5, rtol=1e-5)


def test_aliases_in_chains_equal_the_full_gradient_path():
    for tx in (
        lorajax.lora(1e-2, 4, refresh_every=2, lora_plus_ratio=2.0, weight_decay=0.1),
        lorajax.flora(1e-2, 4, refresh_every=2),
    ):
        params = {k: v + 1.0 for k, v in PARAMS.items()}
        for u_full, s_full, u_probed, s_probed in run_both(tx, params, steps=5):
            assert_trees_close(u_probed, u_full)
            assert_trees_close(s_probed, s_full)


def test_the_check_can_fail():
    # Probes of the wrong period's key give other coordinates, and the comparison sees it.
    tx = lorajax.low_rank(optax.sgd(1.0), rank=4, basis="random", refresh_every=1)
    state = tx.init(PARAMS)
    acts = activations(jax.random.key(0), PARAMS)
    stale = lorajax.probes(state, PARAMS)
    _, state = tx.update(full_grads(acts), state, PARAMS)
    u_full, _ = tx.update(full_grads(acts), state, PARAMS)
    u_stale, _ = tx.update(probed_grads(acts, stale), state, PARAMS)
    with pytest.raises(AssertionError):
        assert_trees_close(u_stale, u_full)


def test_exact_svd_takes_the_full_gradient_at_refresh_steps_only():
    tx = lorajax.low_rank(optax.scale_by_adam(), rank=4, basis="svd", refresh_every=3)
    state_full = state = tx.init(PARAMS)
    for t in range(7):
        probe_tree = lorajax.probes(state, PARAMS)
        full_now = all(v is lorajax.FULL_GRADIENT for v in probe_tree.values())
        assert full_now == (t % 3 == 0)
        assert lorajax.refresh_due(state) == full_now
        acts = activations(jax.random.fold_in(jax.random.key(1), t), PARAMS)
        u_full, state_full = tx.update(full_grads(acts), state_full, PARAMS)
        u, state = tx.update(probed_grads(acts, probe_tree), state, PARAMS)
        assert_trees_close(u, u_full, atol=1e-4, rtol=1e-4)


def spectrum_grad(key, n, m, sigma):
    k1, k2 = jax.random.split(key)
    qa = jnp.linalg.qr(jax.random.normal(k1, (n, n)))[0]
    qb = jnp.linalg.qr(jax.random.normal(k2, (m, m)))[0]
    d = min(n, m)
    return (qa[:, :d] * sigma[None, :d]) @ qb[:, :d].T


@pytest.mark.parametrize(
    "spectrum", ["harmonic", "geometric"], ids=["sigma_1_over_i", "sigma_0.9_pow_i"]
)
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_sketch_refresh_captures_the_gradient(spectrum, side):
    n, m, r = 96, 64, 8
    i = jnp.arange(1, 65, dtype=jnp.float32)
    sigma = 1.0 / i if spectrum == "harmonic" else 0.9**i
    g = spectrum_grad(jax.random.key(3), n, m, sigma)
    params = {"w": jnp.zeros((n, m))}
    tx = lorajax.low_rank(optax.sgd(1.0), rank=r, side=side, refresh_every=5)
    state = tx.init(params)
    probe = lorajax.probes(state, params)["w"]
    assert probe.left.shape[-1] > r  # a sketch, not bases
    coords = Coordinates(left=probe.left.T @ g, right=g @ probe.right)
    update, state = tx.update({"w": coords}, state, params)
    u, v = lorajax.current_bases(state)["w"]
    optimal = float(jnp.sum(sigma[:r] ** 2))
    if u is not None:
        assert float(jnp.sum((u.T @ g) ** 2)) >= 0.97 * optimal
    if v is not None:
        assert float(jnp.sum((g @ v) ** 2)) >= 0.97 * optimal
    # The step projects the reconstruction onto the new bases: close to projecting G.
    exact = {"left": u @ (u.T @ g) if u is not None else None}
    if side == "left":
        np.testing.assert_allclose(-update["w"], exact["left"], atol=0.05 * float(sigma[0]))
    # Between refreshes, the probes are the stored bases and the update is exact.
    for _ in range(4):
        probe = lorajax.probes(state, params)["w"]
        assert probe.left.shape[-1] in (0, r) and probe.right.shape[-1] in (0, r)
        coords = Coordinates(left=probe.left.T @ g, right=g @ probe.right)
        u_probed, _ = tx.update({"w": coords}, state, params)
        u_full, state = tx.update({"w": g}, state, params)
        assert_trees_close(u_probed, u_full)


def test_coordinates_of_the_wrong_shape_are_refused():
    tx = lorajax.low_rank(optax.sgd(1.0), rank=4, side="both", basis="random")
    params = {"w": jnp.zeros((12, 10)), "b": jnp.zeros((10,))}
    state = tx.init(params)
    bad = Coordinates(left=jnp.zeros((4, 12)), right=jnp.zeros((12, 4)))
    with pytest.raises(ValueError, match=r"leaf 'w'.*needs left \(4, 10\)"):
        tx.update({"w": bad, "b": jnp.zeros(10)}, state, params)
    good = Coordinates(left=jnp.zeros((4, 10)), right=jnp.zeros((12, 4)))
    with pytest.raises(ValueError, match=r"leaf 'b'.*does not project"):
        tx.update({"w": good, "b": good}, state, params)


def test_probes_errors():
    with pytest.raises(ValueError, match="holds no lorajax.low_rank state"):
        lorajax.probes(optax.adam(1.0).init({"w": jnp.zeros((4, 4))}), {"w": jnp.zeros((4, 4))})
    tx = lorajax.low_rank(optax.sgd(1.0), rank=2)  # randomized_svd: stored bases
    params = {"w": jnp.zeros((8, 6))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="refresh=lorajax.refresh_due"):
        jax.jit(lambda s: lorajax.probes(s, params))(state)
    with pytest.raises(ValueError, match="`refresh`=False, but the update at step count 0"):
        lorajax.probes(state, params, refresh=False)
    with pytest.raises(ValueError, match="has no leaf at"):
        lorajax.probes(state, {"v": jnp.zeros((8, 6))})


def test_probes_inside_jit_with_a_static_refresh_flag():
    tx = lorajax.low_rank(optax.sgd(1.0), rank=2, refresh_every=2)
    params = {"w": jnp.ones((8, 6))}
    state = tx.init(params)
    due = lorajax.refresh_due(state)
    probe = jax.jit(lambda s: lorajax.probes(s, params, refresh=due))(state)["w"]
    assert probe.left.shape[-1] > 2 and probe.right.shape[-1] > 2
    zeros = lorajax.coordinate_zeros({"w": probe})["w"]
    assert zeros.left.shape == (probe.left.shape[-1], 6)
    assert zeros.right.shape == (8, probe.right.shape[-1])

"""lorajax.flora against a from-scratch NumPy run of Flora's compressed momentum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax

N, M, R, KAPPA, BETA, LR, WD = 40, 16, 4, 3, 0.9, 0.05, 0.01


def test_flora_matches_the_compressed_momentum_algorithm():
    """Flora (arXiv:2402.03293, Alg. 2) with momentum, transfer at re-draws, and decay.

    M_t = β · T_t(M_{t-1}) + (1 - β) Pᵀ G_t, with T_t(M) = P_newᵀ P_old M at a re-draw,
    and W ← W - η (P M_t + λ W).
    """
    w = jax.random.normal(jax.random.key(0), (N, M))
    tx = lorajax.flora(
        LR,
        R,
        refresh_every=KAPPA,
        inner=optax.ema(BETA, debias=False),
        weight_decay=WD,
        side="left",
    )
    state = tx.init({"w": w})
    w_ref = np.asarray(w, np.float64)
    m_ref = np.zeros((R, M))
    p_old = None
    for t in range(10):
        g = jax.random.normal(jax.random.key(10 + t), (N, M))
        update, state = tx.update({"w": g}, state, {"w": w})
        w = optax.apply_updates({"w": w}, update)["w"]
        p = np.asarray(lorajax.current_bases(state[0])["w"][0], np.float64)
        if t % KAPPA == 0 and p_old is not None:
            assert not np.allclose(p, p_old)
            m_ref = p.T @ p_old @ m_ref
        m_ref = BETA * m_ref + (1 - BETA) * p.T @ np.asarray(g, np.float64)
        w_ref = w_ref - LR * (p @ m_ref + WD * w_ref)
        p_old = p
        np.testing.assert_allclose(w, w_ref, atol=1e-5, rtol=1e-5)


def test_flora_default_state_is_key_and_compressed_adam():
    tx = lorajax.flora(1e-3, rank=R)
    state = tx.init({"w": jnp.zeros((N, M)), "b": jnp.zeros(M)})
    low = state[0]
    assert low.projectors["w"].basis == "random" and low.projectors["w"].u is None
    assert low.inner_state.mu["w"].shape == (R, M)  # left side: m <= n
    assert low.inner_state.mu["b"].shape == (M,)

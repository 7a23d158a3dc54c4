"""The parts low_rank is wired from, each against its formula (numpy, float64 oracles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import Coordinates, Probe, TwoSidedCoords
from lorajax._src import fresh_bases, refresh
from lorajax._src.matrices import MatrixSpec
from lorajax._src.project import from_probes, project, project_back
from lorajax._src.state import Projector

N, M, R = 12, 9, 3


def orth(key, d, r):
    return np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(key), (d, r)), np.float64))[0]


U, V = orth(0, N, R), orth(1, M, R)
G = np.asarray(jax.random.normal(jax.random.key(2), (N, M)), np.float64)


def f32(x):
    return jnp.asarray(x, jnp.float32)


def close(actual, expected, tol=1e-5):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=tol * scale)


def test_project_each_side():
    close(project("left", f32(U), None, f32(G)), U.T @ G)
    close(project("right", None, f32(V), f32(G)), G @ V)
    both = project("both", f32(U), f32(V), f32(G))
    close(both.a, G @ V)
    close(both.b, U.T @ G)


def test_coordinates_from_probes_are_arranged_as_project():
    c = Coordinates(left=f32(U.T @ G), right=f32(G @ V))
    close(from_probes("left", c), U.T @ G)
    close(from_probes("right", c), G @ V)
    both = from_probes("both", c)
    close(both.a, G @ V)
    close(both.b, U.T @ G)


def test_project_back_one_sided():
    n_left = np.asarray(jax.random.normal(jax.random.key(3), (R, M)), np.float64)
    n_right = np.asarray(jax.random.normal(jax.random.key(4), (N, R)), np.float64)
    close(project_back("left", f32(U), None, f32(n_left)), U @ n_left)
    close(project_back("right", None, f32(V), f32(n_right)), n_right @ V.T)


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_project_back_lora_pro_is_the_tangent_projection(ratio):
    pu, pv = U @ U.T, V @ V.T
    coords = project("both", f32(U), f32(V), f32(G))
    out = project_back("both", f32(U), f32(V), coords, align="lora_pro", lora_plus_ratio=ratio)
    # λ P_U G + (I - P_U) G P_V; at λ = 1 the orthogonal projection onto {U Y + Z Vᵀ}.
    close(out, ratio * pu @ G + (np.eye(N) - pu) @ G @ pv)
    if ratio == 1.0:
        tangent = pu @ G + G @ pv - pu @ G @ pv
        close(out, tangent)
        close(project_back("both", f32(U), f32(V), project("both", f32(U), f32(V), out)), tangent)


def test_project_back_sum_is_lora_s_equivalent_gradient():
    coords = project("both", f32(U), f32(V), f32(G))
    out = project_back("both", f32(U), f32(V), coords, align="sum", lora_plus_ratio=2.0)
    close(out, 2.0 * U @ U.T @ G + G @ V @ V.T)


def test_project_parts_refuse_unknown_options():
    with pytest.raises(ValueError, match="`side` must be one of"):
        project("top", f32(U), None, f32(G))
    with pytest.raises(ValueError, match="`align` must be one of"):
        project_back("both", f32(U), f32(V), TwoSidedCoords(f32(G @ V), f32(U.T @ G)), align="x")


def projector(side, basis="random"):
    layout = MatrixSpec().resolve((N, M))
    return Projector(None, None, layout, side, R, basis, jnp.dtype(jnp.float32))


def test_remap_rotates_first_and_second_moments_by_their_formulas():
    q_left = np.asarray(jax.random.normal(jax.random.key(5), (R, R)), np.float64)
    q_right = np.asarray(jax.random.normal(jax.random.key(6), (R, R)), np.float64)
    mu = TwoSidedCoords(a=f32(G @ V), b=f32(U.T @ G))
    nu = TwoSidedCoords(a=f32((G @ V) ** 2), b=f32((U.T @ G) ** 2))
    inner = optax.scale_by_adam()
    state = inner.init({"w": mu})._replace(mu={"w": mu}, nu={"w": nu})
    treedef = jax.tree.structure({"w": 0})
    out = refresh.remap_state(
        inner,
        state,
        treedef,
        [projector("both")],
        [(f32(q_left), f32(q_right))],
        [jnp.asarray(True)],
        on_refresh="rotate",
        second_moments=frozenset({"nu"}),
    )
    close(out.mu["w"].b, q_left @ (U.T @ G))  # M ← Q M (left)
    close(out.mu["w"].a, (G @ V) @ q_right)  # M ← M Q (right)
    close(out.nu["w"].b, (q_left**2) @ (U.T @ G) ** 2)  # ν ← (Q∘Q) ν
    close(out.nu["w"].a, (G @ V) ** 2 @ (q_right**2))
    reset = refresh.remap_state(
        inner,
        state,
        treedef,
        [projector("both")],
        [None],
        [jnp.asarray(True)],
        on_refresh="reset",
        second_moments=frozenset({"nu"}),
    )
    assert float(jnp.abs(reset.mu["w"].a).max()) == 0.0 == float(jnp.abs(reset.nu["w"].b).max())


def test_basis_maps_are_the_overlaps_of_old_and_new_bases():
    u2, v2 = orth(7, N, R), orth(8, M, R)
    maps = refresh.basis_maps([projector("both")], [(f32(U), f32(V))], [(f32(u2), f32(v2))])
    close(maps[0][0], u2.T @ U)  # U_newᵀ U_old
    close(maps[0][1], V.T @ v2)  # V_oldᵀ V_new
    eye = refresh.identity_maps([projector("left")])[0]
    close(eye[0], np.eye(R))
    assert eye[1] is None


def test_fresh_bases_from_a_sketch_are_exact_for_a_low_rank_gradient():
    # rank(G) = 5 <= k: the single-pass reconstruction is G itself.
    a = np.asarray(jax.random.normal(jax.random.key(9), (40, 5)), np.float64)
    b = np.asarray(jax.random.normal(jax.random.key(10), (5, 30)), np.float64)
    g = a @ b
    layout = MatrixSpec().resolve((40, 30))
    p = Projector(
        jnp.zeros((40, R)),
        jnp.zeros((30, R)),
        layout,
        "both",
        R,
        "randomized_svd",
        jnp.dtype(jnp.float32),
        oversample=4,
    )
    test = fresh_bases.sketch_probes([p], [None], jax.random.key_data(jax.random.key(0)))[0]
    assert isinstance(test, Probe)
    coords = Coordinates(
        left=f32(np.asarray(test.left).T @ g), right=f32(g @ np.asarray(test.right))
    )
    assert fresh_bases.is_sketch(p, coords)
    new, step = fresh_bases.from_sketch(p, coords, test)
    u_exact, _, vt_exact = np.linalg.svd(g)
    overlap = lorajax.subspace_overlap(f32(u_exact[:, :R]), new.u)
    assert float(overlap) > 1 - 1e-5
    assert float(lorajax.subspace_overlap(f32(vt_exact[:R].T), new.v)) > 1 - 1e-5
    close(step.b, np.asarray(new.u, np.float64).T @ g, tol=1e-4)  # Uᵀ G
    close(step.a, g @ np.asarray(new.v, np.float64), tol=1e-4)  # G V

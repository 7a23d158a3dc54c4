"""The projected backward: probed matmuls and probed NNX models against full gradients.

The oracle is brute force: ``G = ∂L/∂W`` from ``jax.grad`` with respect to the kernel
(formed here only to check against), read as matrices by the kernel's layout. The
coordinates' gradients must be ``P_ℓᵀ G`` and ``G P_r``; adapters' gradients must be
those of the loss on the merged weights. The compiled programs are also read: the
gradient with respect to the coordinates (or adapters) must hold no dot whose result
is kernel-shaped, i.e. no weight gradient.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorajax
from lorajax._src.adapters.tree import map_lora
from lorajax._src.matrices import MatrixSpec
from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.llama import Llama, stack_modules
from lorajax._src.nnx_probe import (
    CoordinateVariable,
    ProbedGraph,
    ProbedLinear,
    ProbeVariable,
)
from lorajax._src.probe import Coordinates, Probe
from lorajax._src.probed import kernel_roles, probed_einsum, probed_matmul
from lorajax._src.targets import path_str

# -- helpers ----------------------------------------------------------------------------

_DOT = re.compile(r"=\s*[a-z][a-z0-9]*\[([0-9,]*)\]\S*\s+(?:dot|convolution)\(")


def dot_shapes(hlo_text: str) -> set[tuple[int, ...]]:
    """The result shapes of every dot and convolution in compiled HLO text."""
    return {tuple(int(d) for d in m.group(1).split(",") if d) for m in _DOT.finditer(hlo_text)}


def kernel_shapes(layout) -> set[tuple[int, ...]]:
    """Shapes a weight gradient of this kernel could take: as stored, as matrices, transposed."""
    *batch, n, m = layout.matrix_shape
    return {tuple(layout.shape), (n, m), (m, n), (*batch, n, m), (*batch, m, n)}


def assert_close(actual, expected, rtol=1e-5):
    """Relative to the largest entry of ``expected``, which must not be trivially small."""
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    assert scale > 1e-6, "the oracle is ~0: the check would be vacuous"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def expected_coords(probe: Probe, g_matrix) -> tuple[jax.Array, jax.Array]:
    """``P_ℓᵀ G`` and ``G P_r`` for matrices ``(*batch, n, m)``, in float64 numpy."""
    g = np.asarray(g_matrix, np.float64)
    pl = np.asarray(probe.left, np.float64)
    pr = np.asarray(probe.right, np.float64)
    return np.swapaxes(pl, -1, -2) @ g, g @ pr


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def smooth_loss(y, key=99):
    """A loss whose dY depends on y (so a wrong backward cannot match by accident)."""
    c = normal(key, y.shape)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * c)


# -- probed_matmul ------------------------------------------------------------------------

N_IN, M_OUT = 7, 5


@pytest.mark.parametrize("lead", [(11,), (2, 3)])
@pytest.mark.parametrize("widths", [(3, 2), (0, 2), (3, 0), (0, 0)])
def test_probed_matmul_gives_projected_gradient(lead, widths):
    a, b = widths
    x, w = normal(0, (*lead, N_IN)), normal(1, (N_IN, M_OUT))
    probe = Probe(normal(2, (N_IN, a)), normal(3, (M_OUT, b)))
    coords = Coordinates(jnp.zeros((a, M_OUT)), jnp.zeros((N_IN, b)))

    def loss(coords, x, w):
        return smooth_loss(probed_matmul(x, w, probe, coords))

    np.testing.assert_array_equal(probed_matmul(x, w, probe, coords), x @ w)
    grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(coords, x, w)
    plain = lambda x, w: smooth_loss(x @ w)  # noqa: E731
    g = jax.grad(plain, argnums=1)(x, w)
    left, right = expected_coords(probe, g)
    assert grads.left.shape == (a, M_OUT) and grads.right.shape == (N_IN, b)
    if a:
        assert_close(grads.left, left)
    if b:
        assert_close(grads.right, right)
    assert_close(dx, jax.grad(plain)(x, w))  # ∂L/∂x = dY wᵀ


def test_probed_matmul_bf16_compute_float32_coordinates():
    x = normal(0, (4, 6, N_IN), jnp.bfloat16)
    w = normal(1, (N_IN, M_OUT), jnp.bfloat16)
    probe = Probe(normal(2, (N_IN, 3)), normal(3, (M_OUT, 2)))
    coords = Coordinates(jnp.zeros((3, M_OUT)), jnp.zeros((N_IN, 2)))
    with jax.numpy_dtype_promotion("strict"):
        y = probed_matmul(x, w, probe, coords)
        grads = jax.jit(jax.grad(lambda c: smooth_loss(probed_matmul(x, w, probe, c))))(coords)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, x @ w)
    assert grads.left.dtype == jnp.float32 and grads.right.dtype == jnp.float32
    # The full gradient of the same bf16 forward pass, accumulated in float32.
    g = jax.grad(lambda w: smooth_loss(x @ w.astype(jnp.bfloat16)))(w.astype(jnp.float32))
    left, right = expected_coords(probe, g)
    assert_close(grads.left, left, rtol=3e-2)
    assert_close(grads.right, right, rtol=3e-2)


def test_probed_matmul_weight_gradient_when_asked_is_the_true_one():
    x, w = normal(0, (9, N_IN)), normal(1, (N_IN, M_OUT))
    probe = Probe(normal(2, (N_IN, 2)), normal(3, (M_OUT, 2)))
    coords = Coordinates(jnp.zeros((2, M_OUT)), jnp.zeros((N_IN, 2)))
    got = jax.grad(lambda w: smooth_loss(probed_matmul(x, w, probe, coords)))(w)
    assert_close(got, jax.grad(lambda w: smooth_loss(x @ w))(w))


def test_coordinate_gradient_program_has_no_weight_gradient():
    x, w = normal(0, (13, N_IN)), normal(1, (N_IN, M_OUT))
    probe = Probe(normal(2, (N_IN, 3)), normal(3, (M_OUT, 2)))
    coords = Coordinates(jnp.zeros((3, M_OUT)), jnp.zeros((N_IN, 2)))
    loss = lambda c, w: smooth_loss(probed_matmul(x, w, probe, c))  # noqa: E731
    forbidden = {(N_IN, M_OUT), (M_OUT, N_IN)}
    probed = jax.jit(jax.grad(loss)).lower(coords, w).compile().as_text()
    shapes = dot_shapes(probed)
    assert (3, M_OUT) in shapes and (N_IN, 2) in shapes  # the coordinate products
    assert not shapes & forbidden, shapes
    # The checker sees a weight gradient when there is one.
    full = jax.jit(jax.grad(loss, argnums=1)).lower(coords, w).compile().as_text()
    assert dot_shapes(full) & forbidden


def test_probed_matmul_bad_shapes_name_the_argument():
    x, w = jnp.ones((4, N_IN)), jnp.ones((N_IN, M_OUT))
    good_probe = Probe(jnp.ones((N_IN, 2)), jnp.ones((M_OUT, 1)))
    good_coords = Coordinates(jnp.zeros((2, M_OUT)), jnp.zeros((N_IN, 1)))
    cases = [
        (Probe(jnp.ones((N_IN + 1, 2)), good_probe.right), good_coords, r"`probe.left`.*\(8, 2\)"),
        (Probe(good_probe.left, jnp.ones((N_IN, 1))), good_coords, "`probe.right`"),
        (good_probe, Coordinates(jnp.zeros((3, M_OUT)), good_coords.right), "`coords.left`"),
        (good_probe, Coordinates(good_coords.left, jnp.zeros((N_IN, 2))), "`coords.right`"),
    ]
    for probe, coords, match in cases:
        with pytest.raises(ValueError, match=match):
            probed_matmul(x, w, probe, coords)
    with pytest.raises(ValueError, match="`w` must be a kernel"):
        probed_matmul(x, jnp.ones((2, N_IN, M_OUT)), good_probe, good_coords)
    with pytest.raises(ValueError, match="`x` must have shape"):
        probed_matmul(jnp.ones((4, 3)), w, good_probe, good_coords)
    with pytest.raises(TypeError, match="Coordinates"):
        probed_matmul(x, w, good_probe, tuple(good_coords))


# -- probed_einsum ------------------------------------------------------------------------

EINSUMS = [
    # (subscripts, x shape, kernel shape, spec or None)
    ("btd,dhk->bthk", (2, 5, 6), (6, 3, 4), None),  # LinearGeneral d -> (heads, head_dim)
    ("btd,hdk->bthk", (2, 5, 6), (3, 6, 4), None),  # kernel axes out of (in, out) order
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 6), None),  # two contracted axes
    ("bnd,dnh->bnh", (2, 5, 6), (6, 5, 4), None),  # a batch axis (one matrix per n)
    ("...d,dk->...k", (2, 3, 4, 6), (6, 5), None),  # ellipsis
    ("btd,dhk->bthk", (2, 5, 6), (6, 3, 4), MatrixSpec(in_axes=0, out_axes=(2, 1))),
]


@pytest.mark.parametrize("case", EINSUMS, ids=lambda c: c[0] + ("+spec" if c[3] else ""))
def test_probed_einsum_gives_projected_gradient(case):
    subscripts, x_shape, w_shape, spec = case
    if spec is None:
        batch, ins, outs = kernel_roles(subscripts)
        spec = MatrixSpec(ins, outs, batch)
    layout = spec.resolve(w_shape)
    *batch, n, m = layout.matrix_shape
    x, w = normal(0, x_shape), normal(1, w_shape)
    probe = Probe(normal(2, (*batch, n, 3)), normal(3, (*batch, m, 2)))
    coords = Coordinates(jnp.zeros((*batch, 3, m)), jnp.zeros((*batch, n, 2)))

    def loss(c, w):
        return smooth_loss(probed_einsum(subscripts, x, w, probe, c, layout=layout))

    y = probed_einsum(subscripts, x, w, probe, coords, layout=layout)
    np.testing.assert_array_equal(y, jnp.einsum(subscripts, x, w))
    grads = jax.jit(jax.grad(loss))(coords, w)
    g = layout.to_matrix(jax.grad(lambda w: smooth_loss(jnp.einsum(subscripts, x, w)))(w))
    left, right = expected_coords(probe, g)
    assert_close(grads.left, left)
    assert_close(grads.right, right)
    text = jax.jit(jax.grad(loss)).lower(coords, w).compile().as_text()
    assert not dot_shapes(text) & kernel_shapes(layout), dot_shapes(text)


def test_probed_einsum_refuses_what_is_not_a_matrix():
    x, w = jnp.ones((2, 5, 6)), jnp.ones((3, 6, 4))
    probe = Probe(jnp.ones((6, 1)), jnp.ones((4, 1)))
    coords = Coordinates(jnp.zeros((1, 4)), jnp.zeros((6, 1)))
    with pytest.raises(ValueError, match="sums kernel axis 'h'"):
        probed_einsum("btd,hdk->btk", x, w, probe, coords)  # h summed on its own
    layout = MatrixSpec(in_axes=1, out_axes=2, batch_axes=(0,)).resolve(w.shape)
    with pytest.raises(ValueError, match="`layout` has batch_axes"):
        probed_einsum("btd,hdk->bthk", x, w, probe, coords, layout=layout)


# -- NNX: a tiny Llama ----------------------------------------------------------------------

CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500.0,
)
TOKENS = jnp.array([[3, 17, 96, 0, 42], [5, 5, 1, 90, 33]])  # 10 tokens: no kernel dim
LABELS = jnp.array([[17, 96, 0, 42, 8], [5, 1, 90, 33, 7]])
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def xent(logits):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, LABELS[..., None], axis=-1))


def at(tree, where):
    """The entry of a nested dict at a ``/``-joined path (int or str keys)."""
    for k in where.split("/"):
        tree = tree[int(k)] if k.isdigit() and int(k) in tree else tree[k]
    return tree


def random_probes(graph, params, widths=(3, 2)):
    """A Probe at every target (a few with one side off), None elsewhere."""
    off = {graph.targets[0]: (0, widths[1]), graph.targets[1]: (widths[0], 0)}

    def make(kp, leaf):
        where = path_str(kp)
        if where not in graph.layouts:
            return None
        *batch, n, m = graph.layouts[where].matrix_shape
        a, b = off.get(where, widths)
        seed = 10 * graph.targets.index(where)
        return Probe(normal(seed, (*batch, n, a)), normal(seed + 1, (*batch, m, b)))

    return jax.tree_util.tree_map_with_path(make, params)


def llama(scan, remat, dtype=jnp.float32):
    return Llama(CFG, rngs=nnx.Rngs(0), scan_layers=scan, remat=remat, dtype=dtype)


def forbidden_shapes(graph):
    shapes = set()
    for layout in graph.layouts.values():
        shapes |= kernel_shapes(layout)
    v, d = CFG.vocab_size, CFG.hidden_size
    return shapes | {(v, d), (d, v)}  # embedding and lm_head


MODES = [(False, False), (True, False), (True, True)]
MODE_IDS = ["unscanned", "scanned", "scanned+remat"]


@pytest.mark.parametrize("scan,remat", MODES, ids=MODE_IDS)
def test_llama_coordinate_gradients(scan, remat):
    model = llama(scan, remat)
    graph = ProbedGraph.build(model, "all-linear")
    expected_targets = (
        {f"model/layers/{L}/{'self_attn' if i < 4 else 'mlp'}/{p}/kernel"
         for L in range(2) for i, p in enumerate(LAYER_LINEARS)}
        if not scan
        else {f"model/layers/{'self_attn' if i < 4 else 'mlp'}/{p}/kernel"
              for i, p in enumerate(LAYER_LINEARS)}
    )  # fmt: skip
    assert set(graph.targets) == expected_targets
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    probes = random_probes(graph, params)
    coords = graph.zero_coords(probes)

    merged = graph.merge(params, probes=probes, coords=coords)
    assert type(merged.model.embed_tokens) is nnx.Embed
    np.testing.assert_array_equal(merged(TOKENS), model(TOKENS))

    def loss(c):
        return xent(graph.merge(params, probes=probes, coords=c)(TOKENS))

    compiled = jax.jit(jax.grad(loss)).lower(coords).compile()
    grads = compiled(coords)
    plain = nnx.graphdef(model)
    full = jax.jit(jax.grad(lambda p: xent(nnx.merge(plain, p)(TOKENS))))
    full_compiled = full.lower(params).compile()
    g_all = full_compiled(params)
    for where, layout in graph.layouts.items():
        g = layout.to_matrix(at(g_all, where))
        left, right = expected_coords(at(probes, where), g)
        got = at(grads, where)
        assert got.left.shape == left.shape and got.right.shape == right.shape
        if left.size:
            assert_close(got.left, left)
        if right.size:
            assert_close(got.right, right)
    forbidden = forbidden_shapes(graph)
    assert not dot_shapes(compiled.as_text()) & forbidden
    assert dot_shapes(full_compiled.as_text()) & forbidden  # the checker can fail


def test_llama_bf16_scanned_remat():
    model = llama(True, True, jnp.bfloat16)
    graph = ProbedGraph.build(model, "all-linear")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    probes = random_probes(graph, params)
    coords = graph.zero_coords(probes)

    def loss(c):
        return xent(graph.merge(params, probes=probes, coords=c)(TOKENS))

    with jax.numpy_dtype_promotion("strict"):  # no silent f32/bf16 mixing
        merged = graph.merge(params, probes=probes, coords=coords)
        np.testing.assert_array_equal(merged(TOKENS), model(TOKENS))
        grads = jax.jit(jax.grad(loss))(coords)
    plain = nnx.graphdef(model)
    g_all = jax.jit(jax.grad(lambda p: xent(nnx.merge(plain, p)(TOKENS))))(params)
    for where, layout in graph.layouts.items():
        got = at(grads, where)
        assert got.left.dtype == jnp.float32 and got.right.dtype == jnp.float32
        left, right = expected_coords(at(probes, where), layout.to_matrix(at(g_all, where)))
        if left.size:
            assert_close(got.left, left, rtol=5e-2)
        if right.size:
            assert_close(got.right, right, rtol=5e-2)


@pytest.mark.parametrize("scan,remat", MODES, ids=MODE_IDS)
def test_llama_unmerged_adapters(scan, remat):
    model = llama(scan, remat)
    graph = ProbedGraph.build(model, "all-linear")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapters, _ = lorajax.adapters.init(0, params, rank=2, alpha=4, targets=graph.specs)
    # A nonzero b, so that the adapters change the output and `a` gets a gradient.
    adapters = map_lora(lambda lora: lora.replace(b=0.1 * normal(7, lora.b.shape)), adapters)
    plain = nnx.graphdef(model)

    def ours(ad):
        return graph.merge(params, adapters=ad)(TOKENS)

    def reference(ad):
        return nnx.merge(plain, lorajax.adapters.merge(params, ad))(TOKENS)

    expected = reference(adapters)
    assert float(jnp.abs(expected - model(TOKENS)).max()) > 1e-3  # the adapters matter
    assert_close(ours(adapters), expected)
    compiled = jax.jit(jax.grad(lambda ad: xent(ours(ad)))).lower(adapters).compile()
    got = compiled(adapters)
    want = jax.jit(jax.grad(lambda ad: xent(reference(ad))))(adapters)
    for where in graph.targets:
        assert_close(at(got, where).a, at(want, where).a)
        assert_close(at(got, where).b, at(want, where).b)
    assert not dot_shapes(compiled.as_text()) & forbidden_shapes(graph)


def test_llama_layers_keep_paths_and_variable_types():
    model = llama(True, False)
    graph = ProbedGraph.build(model, "attention")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    merged = graph.merge(params)
    q = merged.model.layers.self_attn.q_proj
    assert type(q) is ProbedLinear and isinstance(q, nnx.Linear)
    assert type(merged.model.layers.mlp.up_proj) is nnx.Linear  # not targeted
    assert type(q.probe_left) is ProbeVariable and type(q.coord_right) is CoordinateVariable
    assert q.probe_left.shape == (2, 32, 0)  # stacked, width 0 when unused
    # The plain params of the merged model are those of the model, at the same paths.
    plain = nnx.state(merged, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    original = nnx.state(model, nnx.Param)
    assert [p for p, _ in nnx.to_flat_state(plain)] == [p for p, _ in nnx.to_flat_state(original)]
    # The model given to build is untouched.
    assert type(model.model.layers.self_attn.q_proj) is nnx.Linear
    spec = at(graph.specs, "model/layers/self_attn/q_proj/kernel")
    assert spec == MatrixSpec(in_axes=1, out_axes=2, batch_axes=(0,))
    assert at(graph.specs, "model/layers/mlp/up_proj/kernel") is None


# -- NNX: LinearGeneral and Einsum -------------------------------------------------------------

D, H, K, T, HD, OUT = 6, 2, 3, 5, 4, 3


class Mixer(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(D, (H, K), rngs=rngs)  # kernel (d, h, k)
        self.v = nnx.Einsum("btd,hdk->bthk", (H, D, K), (H, K), rngs=rngs)  # (h, d, k)
        self.o = nnx.Einsum("bthk,hkd->btd", (H, K, D), (D,), rngs=rngs)  # 2 input axes
        self.g = nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=rngs)  # kernel (h, k, d)
        self.per_b = nnx.LinearGeneral(D, D, batch_axis={0: 2}, rngs=rngs)  # (b, d, d)
        self.e = nnx.Einsum("btd,dth->bth", (D, T, HD), rngs=rngs)  # batch axis t, 2nd
        self.head = nnx.Linear(HD, OUT, rngs=rngs)

    def __call__(self, x):
        hk = self.q(x) * self.v(x)
        x = x + self.o(hk) + self.g(jnp.tanh(hk))
        x = x + self.per_b(x)  # one matrix per example
        return self.head(jnp.tanh(self.e(x)))


MIXER_X = normal(5, (2, T, D))


def mixer_loss(model):
    return smooth_loss(model(MIXER_X))


def test_linear_general_and_einsum_coordinate_gradients():
    model = Mixer(nnx.Rngs(0))
    graph = ProbedGraph.build(model, "kernel")
    assert len(graph.targets) == 7
    assert graph.layouts["v/kernel"].in_axes == (1,)
    assert graph.layouts["v/kernel"].out_axes == (0, 2)
    assert graph.layouts["per_b/kernel"].batch_axes == (0,)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    probes = random_probes(graph, params)
    coords = graph.zero_coords(probes)
    np.testing.assert_array_equal(
        graph.merge(params, probes=probes, coords=coords)(MIXER_X), model(MIXER_X)
    )
    loss = lambda c: mixer_loss(graph.merge(params, probes=probes, coords=c))  # noqa: E731
    grads = jax.jit(jax.grad(loss))(coords)
    plain = nnx.graphdef(model)
    g_all = jax.grad(lambda p: mixer_loss(nnx.merge(plain, p)))(params)
    for where, layout in graph.layouts.items():
        left, right = expected_coords(at(probes, where), layout.to_matrix(at(g_all, where)))
        got = at(grads, where)
        if left.size:
            assert_close(got.left, left)
        if right.size:
            assert_close(got.right, right)

    adapters, _ = lorajax.adapters.init(1, params, rank=2, alpha=3, targets=graph.specs)
    adapters = map_lora(lambda lora: lora.replace(b=0.3 * normal(8, lora.b.shape)), adapters)
    reference = lambda ad: mixer_loss(nnx.merge(plain, lorajax.adapters.merge(params, ad)))  # noqa: E731
    ours = lambda ad: mixer_loss(graph.merge(params, adapters=ad))  # noqa: E731
    assert_close(ours(adapters), reference(adapters))
    got, want = jax.jit(jax.grad(ours))(adapters), jax.grad(reference)(adapters)
    for where in graph.targets:
        assert_close(at(got, where).a, at(want, where).a)
        assert_close(at(got, where).b, at(want, where).b)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(D, (H, K), rngs=rngs)
        self.o = nnx.Einsum("bthk,hkd->btd", (H, K, D), (D,), rngs=rngs)

    def __call__(self, x):
        return x + self.o(jnp.tanh(self.q(x)))


class ScannedBlocks(nnx.Module):
    def __init__(self, rngs):
        self.blocks = stack_modules([Block(rngs) for _ in range(3)])

    def __call__(self, x):
        graphdef, state = nnx.split(self.blocks)
        body = lambda h, s: (nnx.merge(graphdef, s)(h), None)  # noqa: E731
        return jax.lax.scan(body, x, state)[0]


def test_stacked_linear_general_and_einsum_under_scan():
    model = ScannedBlocks(nnx.Rngs(0))
    graph = ProbedGraph.build(model, "kernel")
    assert graph.layouts["blocks/q/kernel"].matrix_shape == (3, D, H * K)
    assert graph.layouts["blocks/o/kernel"].matrix_shape == (3, H * K, D)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    probes = random_probes(graph, params)
    coords = graph.zero_coords(probes)
    np.testing.assert_array_equal(
        graph.merge(params, probes=probes, coords=coords)(MIXER_X), model(MIXER_X)
    )
    loss = lambda c: smooth_loss(graph.merge(params, probes=probes, coords=c)(MIXER_X))  # noqa: E731
    grads = jax.jit(jax.grad(loss))(coords)
    plain = nnx.graphdef(model)
    g_all = jax.grad(lambda p: smooth_loss(nnx.merge(plain, p)(MIXER_X)))(params)
    for where, layout in graph.layouts.items():
        left, right = expected_coords(at(probes, where), layout.to_matrix(at(g_all, where)))
        got = at(grads, where)
        if left.size:
            assert_close(got.left, left)
        if right.size:
            assert_close(got.right, right)


# -- NNX: bad input --------------------------------------------------------------------------


def test_unsupported_targets_name_the_path():
    class WithConv(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, kernel_size=(1,), rngs=rngs)
            self.proj = nnx.Linear(3, 3, rngs=rngs)

    with pytest.raises(TypeError, match=r"'conv/kernel'.*Conv.*projected=False"):
        ProbedGraph.build(WithConv(nnx.Rngs(0)), "kernel")
    with pytest.raises(TypeError, match="'model/embed_tokens/embedding'.*Embed"):
        ProbedGraph.build(llama(False, False), None)
    per_call = nnx.Sequential(nnx.Einsum("bd,dk->bk", (3, 2), rngs=nnx.Rngs(0)))
    per_call.layers[0].einsum_str = None  # given at call time instead
    with pytest.raises(ValueError, match=r"'layers/0'.*no einsum_str.*projected=False"):
        ProbedGraph.build(per_call, "kernel")
    lonely = nnx.Sequential(nnx.Einsum("bd,dk->b", (3, 2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'layers/0' cannot be probed.*sums kernel axis"):
        ProbedGraph.build(lonely, "kernel")
    with pytest.raises(ValueError, match="selects no leaf"):
        ProbedGraph.build(per_call, "nothing_matches")


def test_wrong_trees_in_merge_give_clear_errors():
    model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    graph = ProbedGraph.build(model, "layers/0/kernel")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    good = Probe(jnp.ones((4, 2)), jnp.ones((3, 1)))
    probes = {"layers": {0: {"kernel": good}}}
    coords = graph.zero_coords(probes)
    graph.merge(params, probes=probes, coords=coords)  # fine
    bad = {"layers": {0: {"kernel": Probe(jnp.ones((5, 2)), good.right)}}}
    with pytest.raises(ValueError, match=r"'layers/0/kernel'.*`probe.left` has shape \(5, 2\)"):
        graph.merge(params, probes=bad, coords=coords)
    right = coords["layers"][0]["kernel"].right
    bad_coords = {"layers": {0: {"kernel": Coordinates(jnp.zeros((2, 4)), right)}}}
    with pytest.raises(ValueError, match=r"'layers/0/kernel'.*`coords.left`"):
        graph.merge(params, probes=probes, coords=bad_coords)
    elsewhere = {"layers": {1: {"kernel": Probe(jnp.ones((3, 1)), jnp.ones((2, 1)))}}}
    with pytest.raises(ValueError, match=r"'layers/1/kernel'.*not a targeted kernel"):
        graph.zero_coords(elsewhere)
    with pytest.raises(ValueError, match="together"):
        graph.merge(params, probes=probes)
    with pytest.raises(ValueError, match=r"`params` at 'layers/1/kernel' has shape \(2, 3\)"):
        swapped = jax.tree.map(lambda x: x, params)
        swapped["layers"][1]["kernel"] = jnp.ones((2, 3))
        graph.merge(swapped)
    stacked = graph.merge(params)
    stacked.layers[0].kernel.set_value(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="stacked kernel"):
        stacked(jnp.ones((1, 4)))

"""lorajax.nnx: LoRA put into Flax NNX models, trained with nnx.Optimizer, merged back.

The oracle for the adapted forward pass is a copy of the original model whose kernels are
overwritten with ``W0 + s·ΔW``, where ``ΔW`` is built in float64 numpy from ``a`` and ``b``
by each kernel's own index equation (not through lorajax's matrix layouts).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorajax
from lorajax._src.nnx_lora import FrozenLoRAParam, LoRALayer, layer_spec

D, H, K, F, N, HD, OUT = 6, 2, 3, 8, 3, 5, 4  # N is also the sequence length


class Attn(nnx.Module):
    def __init__(self, rngs):
        # LinearGeneral d -> (heads, head_dim): kernel (d, h, k)
        self.q_proj = nnx.LinearGeneral(D, (H, K), rngs=rngs)
        # Einsum with the kernel's axes out of (in, out) order: kernel (h, d, k)
        self.v_proj = nnx.Einsum("btd,hdk->bthk", (H, D, K), (H, K), rngs=rngs)
        # Einsum with two contracted axes: kernel (h, k, d)
        self.o_proj = nnx.Einsum("bthk,hkd->btd", (H, K, D), (D,), rngs=rngs)

    def __call__(self, x):
        return self.o_proj(self.q_proj(x) * self.v_proj(x))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up_proj = nnx.Linear(D, F, rngs=rngs)  # with bias
        self.down_proj = nnx.Linear(F, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.up_proj(x)))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = Attn(rngs)
        self.mlp = MLP(rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(D, D, kernel_size=(1,), rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        # Einsum with a batch axis that is not the kernel's first: kernel (d, n, hd)
        self.experts = nnx.Einsum("bnd,dnh->bnh", (D, N, HD), rngs=rngs)
        self.lm_head = nnx.Linear(HD, OUT, rngs=rngs)

    def __call__(self, x):
        x = self.conv(x)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(jnp.tanh(self.experts(x)))


BLOCK_KERNELS = [
    "attn/q_proj/kernel",
    "attn/v_proj/kernel",
    "attn/o_proj/kernel",
    "mlp/up_proj/kernel",
    "mlp/down_proj/kernel",
]
ALL_LINEAR = sorted(
    [f"layers/{i}/{k}" for i in range(2) for k in BLOCK_KERNELS] + ["experts/kernel"]
)


def make_model(seed=0):
    return Model(nnx.Rngs(seed))


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (2, N, D))


def adapted_paths(model):
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALayer):
            out.append("/".join(map(str, path)) + "/kernel")
    return sorted(out)


def get(model, path):
    node = model
    for part in path.split("/")[:-1]:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def delta_np(path, a, b):
    """ΔW = a·b in the kernel's own axes, from the kernel's index equation (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if path.endswith("q_proj/kernel"):  # (d, h, k) <- (d, h*k)
        return (a @ b).reshape(D, H, K)
    if path.endswith("v_proj/kernel"):  # (h, d, k): W[h, d, k] = sum_r a[d, r] b[r, h*K + k]
        return np.einsum("dr,rhk->hdk", a, b.reshape(-1, H, K))
    if path.endswith("o_proj/kernel"):  # (h, k, d) <- (h*k, d)
        return (a @ b).reshape(H, K, D)
    if path.endswith("experts/kernel"):  # (d, n, hd): one matrix per n
        return np.einsum("ndr,nrh->dnh", a, b)
    return a @ b


def randomize(model, scale=0.3, seed=2):
    """Sets every adapter's a and b to random nonzero values; returns them by path."""
    factors = {}
    for i, path in enumerate(adapted_paths(model)):
        layer = get(model, path)
        ka, kb = jax.random.split(jax.random.key(seed + i))
        a = scale * jax.random.normal(ka, layer.lora_a.shape)
        b = scale * jax.random.normal(kb, layer.lora_b.shape)
        layer.lora_a.set_value(a)
        layer.lora_b.set_value(b)
        factors[path] = (a, b, layer.scale)
    return factors


def oracle(original, factors):
    """A copy of the original model with kernels W0 + s·ΔW (ΔW from delta_np)."""
    model = nnx.clone(original)
    for path, (a, b, s) in factors.items():
        kernel = get(model, path).kernel
        w0 = np.asarray(kernel.get_value(), np.float64)
        kernel.set_value(jnp.asarray(w0 + s * delta_np(path, a, b), jnp.float32))
    return model


def close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_layer_specs_follow_the_layers():
    model = make_model()
    blk = model.layers[0].attn
    assert layer_spec(blk.q_proj) == lorajax.MatrixSpec(0, (1, 2))
    assert layer_spec(blk.v_proj) == lorajax.MatrixSpec(1, (0, 2))
    assert layer_spec(blk.o_proj) == lorajax.MatrixSpec((0, 1), 2)
    assert layer_spec(model.experts) == lorajax.MatrixSpec(0, 2, (1,))
    assert layer_spec(model.lm_head) == lorajax.MatrixSpec(0, 1)
    batched = nnx.LinearGeneral(4, 5, batch_axis={0: 3}, rngs=nnx.Rngs(0))
    assert layer_spec(batched) == lorajax.MatrixSpec(1, 2, (0,))


def test_linear_general_with_batch_axis():
    base = nnx.LinearGeneral(4, 5, batch_axis={0: 3}, rngs=nnx.Rngs(0))
    model = lorajax.nnx.add_lora(nnx.Sequential(nnx.clone(base)), rank=2, alpha=3, targets=None)
    layer = model.layers[0]
    assert layer.lora_a.shape == (3, 4, 2) and layer.lora_b.shape == (3, 2, 5)
    a = jax.random.normal(jax.random.key(0), (3, 4, 2))
    b = jax.random.normal(jax.random.key(1), (3, 2, 5))
    layer.lora_a.set_value(a)
    layer.lora_b.set_value(b)
    x = jax.random.normal(jax.random.key(2), (3, 7, 4))
    xn, an, bn = (np.asarray(v, np.float64) for v in (x, a, b))
    want = np.asarray(base(x), np.float64) + 1.5 * np.einsum("bti,bir,bro->bto", xn, an, bn)
    close(model(x), want)


def test_identity_at_default_init():
    original = make_model()
    x = inputs()
    y0 = original(x)
    model = lorajax.nnx.add_lora(nnx.clone(original), rank=2, alpha=4)
    assert adapted_paths(model) == ALL_LINEAR
    for path in ALL_LINEAR:
        layer = get(model, path)
        assert isinstance(layer.lora_a, nnx.LoRAParam)
        assert isinstance(layer.lora_b, nnx.LoRAParam)
        assert not np.any(np.asarray(layer.lora_b.get_value()))
        assert layer.scale == 2.0
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y0))


def test_factor_shapes_are_the_matrix_view():
    model = lorajax.nnx.add_lora(make_model(), rank=2)
    attn = model.layers[1].attn
    assert attn.q_proj.lora_a.shape == (D, 2) and attn.q_proj.lora_b.shape == (2, H * K)
    assert attn.v_proj.lora_a.shape == (D, 2) and attn.v_proj.lora_b.shape == (2, H * K)
    assert attn.o_proj.lora_a.shape == (H * K, 2) and attn.o_proj.lora_b.shape == (2, D)
    assert model.experts.lora_a.shape == (N, D, 2) and model.experts.lora_b.shape == (N, 2, HD)


def test_adapted_output_matches_merged_kernel_oracle():
    original = make_model()
    model = lorajax.nnx.add_lora(nnx.clone(original), rank=2, alpha=6, targets=None)
    # None selects every supported layer; the conv's kernel is skipped.
    assert adapted_paths(model) == sorted([*ALL_LINEAR, "lm_head/kernel"])
    factors = randomize(model)
    x = inputs()
    y = model(x)
    assert not np.allclose(np.asarray(y), np.asarray(original(x)), atol=1e-2)
    close(y, oracle(original, factors)(x))
    close(nnx.jit(lambda m, x: m(x))(model, x), y)


def loss_fn(model, x, target):
    return jnp.mean((model(x) - target) ** 2)


def train(model, steps=5, lr=1e-2):
    x = inputs()
    target = jax.random.normal(jax.random.key(7), (2, N, OUT))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model, x, target)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(steps)]
    losses.append(float(loss_fn(model, x, target)))
    return losses


def flat_state(model):
    return {
        "/".join(map(str, path)): (type(var), np.asarray(var.get_value()))
        for path, var in nnx.state(model).flat_state()
    }


def test_optimizer_moves_only_lora_params():
    model = lorajax.nnx.add_lora(make_model(), rank=2, alpha=4)
    before = flat_state(model)
    losses = train(model)
    after = flat_state(model)
    assert losses[-1] < losses[0]
    assert before.keys() == after.keys()
    n_lora = 0
    for name, (kind, value) in before.items():
        if issubclass(kind, nnx.LoRAParam):
            n_lora += 1
            if name.endswith("lora_b"):
                assert not np.array_equal(value, after[name][1]), name
        else:
            np.testing.assert_array_equal(value, after[name][1], err_msg=name)
    assert n_lora == 2 * len(ALL_LINEAR)


def test_merge_reproduces_adapted_outputs_and_removes_adapters():
    original = make_model()
    model = lorajax.nnx.add_lora(nnx.clone(original), rank=3, alpha=5, targets=None)
    factors = randomize(model)
    x = inputs()
    y = model(x)
    kernel_var = model.layers[0].mlp.up_proj.base.kernel
    merged = lorajax.nnx.merge_lora(model)
    assert merged is model
    assert not adapted_paths(merged)
    assert len(nnx.state(merged, nnx.LoRAParam)) == 0
    assert len(nnx.state(merged, FrozenLoRAParam)) == 0
    assert type(merged.layers[0].mlp.up_proj) is nnx.Linear
    assert type(merged.layers[0].attn.q_proj) is nnx.LinearGeneral
    assert type(merged.experts) is nnx.Einsum
    assert merged.layers[0].mlp.up_proj.kernel is kernel_var  # variable (and metadata) kept
    close(merged(x), y)
    # The merged kernels are the oracle's.
    want = oracle(original, factors)
    for path in factors:
        close(get(merged, path).kernel.get_value(), get(want, path).kernel.get_value())
    # The Param structure is the original model's again.
    assert jax.tree.structure(nnx.state(merged, nnx.Param)) == jax.tree.structure(
        nnx.state(original, nnx.Param)
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_is_alpha_over_rank(use_rslora):
    rank, alpha = 4, 6.0
    s = alpha / (math.sqrt(rank) if use_rslora else rank)
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    model = nnx.Sequential(nnx.clone(base))
    lorajax.nnx.add_lora(model, rank=rank, alpha=alpha, targets=None, use_rslora=use_rslora)
    layer = model.layers[0]
    assert layer.scale == pytest.approx(s)
    a = jax.random.normal(jax.random.key(0), (6, rank))
    b = jax.random.normal(jax.random.key(1), (rank, 5))
    layer.lora_a.set_value(a)
    layer.lora_b.set_value(b)
    # NNX's own nnx.LoRA with the same factors adds x·a·b, unscaled.
    unscaled = nnx.LoRA(6, rank, 5, base_module=base, rngs=nnx.Rngs(0))
    unscaled.lora_a.set_value(a)
    unscaled.lora_b.set_value(b)
    x = jax.random.normal(jax.random.key(2), (7, 6))
    y0 = base(x)
    close(model(x) - y0, s * (unscaled(x) - y0))
    # And by hand, in float64.
    xn, an, bn = (np.asarray(v, np.float64) for v in (x, a, b))
    close(model(x), np.asarray(y0, np.float64) + s * (xn @ an @ bn))


def test_pissa_keeps_outputs_at_init_and_moves_the_base():
    original = make_model()
    x = inputs()
    model = lorajax.nnx.add_lora(nnx.clone(original), rank=2, alpha=2, init="pissa")
    close(model(x), original(x))
    w0 = original.layers[0].mlp.up_proj.kernel.get_value()
    assert not np.allclose(np.asarray(model.layers[0].mlp.up_proj.base.kernel.get_value()), w0)
    close(lorajax.nnx.merge_lora(model).layers[0].mlp.up_proj.kernel.get_value(), w0)


def test_olora_keeps_outputs_at_init():
    original = make_model()
    x = inputs()
    model = lorajax.nnx.add_lora(nnx.clone(original), rank=2, init="olora")
    close(model(x), original(x))


def test_lora_ga_takes_nnx_grads():
    original = make_model()
    x = inputs()
    target = jax.random.normal(jax.random.key(7), (2, N, OUT))
    grads = nnx.grad(loss_fn)(original, x, target)
    model = lorajax.nnx.add_lora(
        nnx.clone(original), rank=1, alpha=2, init="lora_ga", use_rslora=True, grads=grads
    )
    close(model(x), original(x))
    # The factors are those of adapter mode on the same kernels and gradients.
    params = nnx.state(original, nnx.Param).to_pure_dict()
    g = grads.to_pure_dict() if isinstance(grads, nnx.State) else grads
    up = params["layers"][0]["mlp"]["up_proj"]["kernel"]
    g_up = g["layers"][0]["mlp"]["up_proj"]["kernel"]
    want, base = lorajax.adapters.init(
        0, {"up_proj": {"kernel": up}}, rank=1, alpha=2, init="lora_ga", use_rslora=True,
        grads={"up_proj": {"kernel": g_up}},
    )  # fmt: skip
    layer = model.layers[0].mlp.up_proj
    close(layer.lora_a.get_value(), want["up_proj"]["kernel"].a)
    close(layer.lora_b.get_value(), want["up_proj"]["kernel"].b)
    close(layer.base.kernel.get_value(), base["up_proj"]["kernel"])


@pytest.mark.parametrize("init", ["lora_fa", "lori"])
def test_frozen_a_is_not_trained(init):
    model = lorajax.nnx.add_lora(make_model(), rank=2, alpha=4, init=init)
    layer = model.layers[0].mlp.up_proj
    assert isinstance(layer.lora_a, FrozenLoRAParam)
    assert not isinstance(layer.lora_a, nnx.Param)
    assert isinstance(layer.lora_b, nnx.LoRAParam)
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == len(ALL_LINEAR)
    a_before = {p: np.asarray(get(model, p).lora_a.get_value()) for p in ALL_LINEAR}
    b_before = np.asarray(layer.lora_b.get_value())
    losses = train(model)
    assert losses[-1] < losses[0]
    for p in ALL_LINEAR:
        np.testing.assert_array_equal(np.asarray(get(model, p).lora_a.get_value()), a_before[p])
    assert not np.array_equal(np.asarray(layer.lora_b.get_value()), b_before)


UP_DOWN_1 = ["layers/1/mlp/down_proj/kernel", "layers/1/mlp/up_proj/kernel"]
O_PROJ = ["layers/0/attn/o_proj/kernel", "layers/1/attn/o_proj/kernel"]
PICKED = {"experts": True, "layers": {0: {"attn": {"q_proj": True}}}}


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", ALL_LINEAR),
        ("attention", [p for p in ALL_LINEAR if "/attn/" in p]),
        ("mlp", [p for p in ALL_LINEAR if "/mlp/" in p]),
        (r"layers/1/.*(up|down)_proj", UP_DOWN_1),
        ("lm_head", ["lm_head/kernel"]),
        (lambda path, leaf: leaf.ndim == 3 and "o_proj" in path, O_PROJ),
        (PICKED, ["experts/kernel", "layers/0/attn/q_proj/kernel"]),
    ],
)
def test_targets_select_exactly(targets, expected):
    model = lorajax.nnx.add_lora(make_model(), rank=1, targets=targets)
    assert adapted_paths(model) == sorted(expected)


def test_rank_and_alpha_patterns_apply_per_path():
    model = lorajax.nnx.add_lora(
        make_model(),
        rank=2,
        alpha=4,
        rank_pattern={"up_proj": 4},
        alpha_pattern={"down_proj": 1.0},
    )
    up, down = model.layers[0].mlp.up_proj, model.layers[0].mlp.down_proj
    assert up.rank == 4 and up.lora_a.shape == (D, 4) and up.scale == pytest.approx(1.0)
    assert down.rank == 2 and down.scale == pytest.approx(0.5)


def test_containers_and_shared_layers():
    class Holder(nnx.Module):
        def __init__(self, rngs):
            shared = nnx.Linear(3, 3, rngs=rngs)
            self.first = shared
            self.pair = nnx.data((nnx.Linear(3, 3, rngs=rngs), shared))
            self.table = nnx.Dict({"w": nnx.Linear(3, 3, rngs=rngs)})
            self.items = nnx.data([nnx.Linear(3, 3, rngs=rngs)])

        def __call__(self, x):
            x = self.pair[1](self.pair[0](self.first(x)))
            return self.items[0](self.table["w"](x))

    model = Holder(nnx.Rngs(0))
    x = jnp.ones((2, 3))
    y0 = model(x)
    lorajax.nnx.add_lora(model, rank=1, targets=None)
    assert isinstance(model.pair, tuple)
    assert isinstance(model.first, LoRALayer) and model.pair[1] is model.first
    for layer in (model.pair[0], model.table["w"], model.items[0]):
        assert isinstance(layer, LoRALayer)
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 2 * 4  # shared: one
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y0))
    model.first.lora_b.set_value(jnp.ones((1, 3)))
    y = model(x)
    lorajax.nnx.merge_lora(model)
    assert type(model.first) is nnx.Linear and model.pair[1] is model.first
    close(model(x), y)


def test_dtype_and_precision_follow_the_layer():
    layer = nnx.Linear(4, 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = nnx.Sequential(layer)
    x = jnp.ones((2, 4), jnp.float32)
    y0 = model(x)
    lorajax.nnx.add_lora(model, rank=2, targets=None)
    assert model.layers[0].lora_a.get_value().dtype == jnp.float32
    y = model(x)
    assert y.dtype == y0.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
    model.layers[0].lora_b.set_value(jnp.ones((2, 3)))
    assert model(x).dtype == jnp.bfloat16
    merged = lorajax.nnx.merge_lora(model)
    assert merged.layers[0].kernel.get_value().dtype == jnp.bfloat16


def test_strict_promotion_with_bf16_layers():
    model = nnx.Sequential(
        nnx.Linear(4, 6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
        nnx.LinearGeneral(6, (2, 3), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1)),
        nnx.Einsum("bhk,hkd->bd", (2, 3, 4), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(2)),
    )
    x = jnp.ones((2, 4), jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):
        lorajax.nnx.add_lora(model, rank=2, targets=None)
        for layer in model.layers:
            layer.lora_b.set_value(jnp.full(layer.lora_b.shape, 0.1))
        assert model(x).dtype == jnp.bfloat16

        def loss(m):
            return jnp.mean(m(x).astype(jnp.float32) ** 2)

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
        lorajax.nnx.merge_lora(model)
        assert model(x).dtype == jnp.bfloat16


def test_key_and_rngs():
    def a_of(**kw):
        model = lorajax.nnx.add_lora(make_model(), rank=1, targets="lm_head", **kw)
        return np.asarray(model.lm_head.lora_a.get_value())

    np.testing.assert_array_equal(a_of(), a_of(key=0))
    np.testing.assert_array_equal(a_of(key=3), a_of(key=jax.random.key(3)))
    assert not np.array_equal(a_of(key=0), a_of(key=1))
    np.testing.assert_array_equal(a_of(rngs=nnx.Rngs(5)), a_of(key=nnx.Rngs(5)))


def test_sharding_names_follow_the_kernel():
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        layer = nnx.Linear(
            4, 6, kernel_metadata={"out_sharding": (None, "model")}, rngs=nnx.Rngs(0)
        )
        model = nnx.Sequential(layer)
        lorajax.nnx.add_lora(model, rank=2, targets=None)
    adapted = model.layers[0]
    assert adapted.lora_a.get_metadata("out_sharding") == (None, None)
    assert adapted.lora_b.get_metadata("out_sharding") == (None, "model")
    assert adapted.lora_b.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_errors():
    with pytest.raises(ValueError, match="selects no leaf"):
        lorajax.nnx.add_lora(make_model(), rank=1, targets="nothing_matches")
    only_conv = nnx.Sequential(nnx.Conv(2, 2, kernel_size=(1,), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="selects no kernel of an nnx.Linear"):
        lorajax.nnx.add_lora(only_conv, rank=1, targets=None)
    with pytest.raises(ValueError, match="'conv/kernel', which is not a parameter of"):
        lorajax.nnx.add_lora(make_model(), rank=1, targets="conv")
    with pytest.raises(ValueError, match="'lora_ga' needs `grads`"):
        lorajax.nnx.add_lora(make_model(), rank=1, init="lora_ga")
    with pytest.raises(ValueError, match="`grads` has no entry for 'lm_head/kernel'"):
        lorajax.nnx.add_lora(make_model(), rank=1, init="lora_ga", targets="lm_head", grads={})
    with pytest.raises(ValueError, match="MatrixSpec has no use"):
        lorajax.nnx.add_lora(make_model(), rank=1, targets=lorajax.MatrixSpec())
    with pytest.raises(ValueError, match="Wrap it"):
        lorajax.nnx.add_lora(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rank=1)
    with pytest.raises(ValueError, match="rank"):
        lorajax.nnx.add_lora(make_model(), rank=50)
    with pytest.raises(ValueError, match="not both"):
        lorajax.nnx.add_lora(make_model(), rank=1, key=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="`key` must be"):
        lorajax.nnx.add_lora(make_model(), rank=1, key="seed")
    with pytest.raises(TypeError, match="must be an nnx.Module"):
        lorajax.nnx.merge_lora({"kernel": jnp.ones((2, 2))})
    lonely = nnx.Sequential(nnx.Einsum("bd,dk->b", (3, 2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="sums kernel axis 'k'"):
        lorajax.nnx.add_lora(lonely, rank=1, targets=None)
    per_call = nnx.Sequential(nnx.Einsum("bd,dk->bk", (3, 2), rngs=nnx.Rngs(0)))
    per_call.layers[0].einsum_str = None  # given at call time instead
    with pytest.raises(ValueError, match="no einsum_str of its own"):
        lorajax.nnx.add_lora(per_call, rank=1, targets=None)


# Scanned Llama: every decoder-layer leaf is stacked on a leading layer axis.
LLAMA_LAYER_LINEARS = [
    "self_attn/q_proj",
    "self_attn/k_proj",
    "self_attn/v_proj",
    "self_attn/o_proj",
    "mlp/gate_proj",
    "mlp/up_proj",
    "mlp/down_proj",
]


def tiny_llama(scan_layers, seed=0):
    config = lorajax.models.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return lorajax.models.Llama(config, rngs=nnx.Rngs(seed), scan_layers=scan_layers)


def llama_tokens(seed=3):
    return jax.random.randint(jax.random.key(seed), (2, 5), 0, 61)


def scanned_with_random_adapters():
    """A scanned tiny Llama with random nonzero adapters, and the unscanned twin."""
    scanned = lorajax.nnx.add_lora(tiny_llama(True), rank=2, alpha=6)
    for i, name in enumerate(LLAMA_LAYER_LINEARS):
        layer = get(scanned.model.layers, name + "/kernel")
        ka, kb = jax.random.split(jax.random.key(10 + i))
        layer.lora_a.set_value(0.3 * jax.random.normal(ka, layer.lora_a.shape))
        layer.lora_b.set_value(0.3 * jax.random.normal(kb, layer.lora_b.shape))
    return scanned


def test_scanned_llama_adapters_match_the_unscanned_model():
    tokens = llama_tokens()
    scanned = tiny_llama(True)
    y0 = scanned(tokens)
    lorajax.nnx.add_lora(scanned, rank=2, alpha=6)
    for name in LLAMA_LAYER_LINEARS:
        layer = get(scanned.model.layers, name + "/kernel")
        assert isinstance(layer, LoRALayer)
        n, m = layer.base.kernel.get_value().shape[1:]
        assert layer.lora_a.shape == (2, n, 2) and layer.lora_b.shape == (2, 2, m)
    np.testing.assert_array_equal(np.asarray(scanned(tokens)), np.asarray(y0))

    scanned = scanned_with_random_adapters()
    unscanned = lorajax.nnx.add_lora(tiny_llama(False), rank=2, alpha=6)
    for i, block in enumerate(unscanned.model.layers):
        for name in LLAMA_LAYER_LINEARS:
            stacked = get(scanned.model.layers, name + "/kernel")
            layer = get(block, name + "/kernel")
            # Same seed, same weights: the stack's slice i is layer i.
            np.testing.assert_array_equal(
                np.asarray(layer.base.kernel.get_value()),
                np.asarray(stacked.base.kernel.get_value()[i]),
            )
            layer.lora_a.set_value(stacked.lora_a.get_value()[i])
            layer.lora_b.set_value(stacked.lora_b.get_value()[i])
    y = scanned(tokens)
    assert not np.allclose(np.asarray(y), np.asarray(y0), atol=1e-3)
    close(y, unscanned(tokens))
    close(nnx.jit(lambda m, t: m(t))(scanned, tokens), y)


def test_scanned_llama_merge_folds_each_layer():
    tokens = llama_tokens()
    model = scanned_with_random_adapters()
    y = model(tokens)
    w0 = {n: np.asarray(get(model.model.layers, n + "/kernel").base.kernel.get_value(), np.float64)
          for n in LLAMA_LAYER_LINEARS}  # fmt: skip
    factors = {}
    for name in LLAMA_LAYER_LINEARS:
        layer = get(model.model.layers, name + "/kernel")
        a, b = (np.asarray(v.get_value(), np.float64) for v in (layer.lora_a, layer.lora_b))
        factors[name] = (a, b, layer.scale)
    lorajax.nnx.merge_lora(model)
    assert len(nnx.state(model, nnx.LoRAParam)) == 0
    for name, (a, b, s) in factors.items():
        layer = get(model.model.layers, name + "/kernel")
        assert type(layer) is nnx.Linear
        want = np.stack([w0[name][i] + s * a[i] @ b[i] for i in range(2)])
        close(layer.kernel.get_value(), want)
    close(model(tokens), y)


def test_scanned_llama_trains_only_lora_params():
    model = lorajax.nnx.add_lora(tiny_llama(True), rank=2, alpha=4)
    tokens = llama_tokens()
    targets = jax.random.randint(jax.random.key(4), tokens.shape, 0, 61)

    def loss(m):
        logits = m(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return value

    before = flat_state(model)
    first = step(model, optimizer)
    after = flat_state(model)
    assert float(loss(model)) < float(first)
    assert before.keys() == after.keys()
    moved = []
    for name, (kind, value) in before.items():
        if issubclass(kind, nnx.LoRAParam):
            if not np.array_equal(value, after[name][1]):
                moved.append(name)
        else:
            np.testing.assert_array_equal(value, after[name][1], err_msg=name)
    # b starts at zero, so only b gets a gradient on the first step; every b moves.
    assert sorted(moved) == sorted(f"model/layers/{n}/lora_b" for n in LLAMA_LAYER_LINEARS)


def test_stacked_linear_adapter_needs_a_slice():
    model = lorajax.nnx.add_lora(tiny_llama(True), rank=1)
    layer = model.model.layers.mlp.up_proj
    with pytest.raises(ValueError, match="call it on one layer's slice"):
        layer(jnp.ones((2, 32)))
    flat = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    flat.layers[0].kernel.set_value(jnp.zeros((4,)))
    with pytest.raises(ValueError, match="has a kernel with 1 axes"):
        layer_spec(flat.layers[0], "layers/0")

"""Sharded fine-tuning: every method on FSDP and tensor meshes equals one device, and
every leaf of the state sits where the layout rules put it.

The expected layouts are written out here from the rules in words (a kernel's own
rule; bases follow W's axis, coordinates and moments the kept axis, the rank axis and
keys and counts replicated), independently of ``lorajax.sharding``'s code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax
from lorajax import models, sharding, train
from lorajax._src.rules import path_name as path_str

CONFIG = models.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
RANK, STEPS, BATCH = 4, 5, 8
MESHES = {
    "fsdp8": {"fsdp": 8},
    "fsdp2_tensor4": {"fsdp": 2, "tensor": 4},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
}

# The rule of each kernel, in words: (d_in axis, d_out axis) of a (…, d_in, d_out) leaf.
KERNEL_AXES = {
    "q_proj": ("fsdp", "tensor"),
    "k_proj": ("fsdp", "tensor"),
    "v_proj": ("fsdp", "tensor"),
    "gate_proj": ("fsdp", "tensor"),
    "up_proj": ("fsdp", "tensor"),
    "o_proj": ("tensor", "fsdp"),
    "down_proj": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "embed_tokens": ("tensor", "fsdp"),
}


def batches():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, (BATCH, 9)).astype(np.int32) for _ in range(STEPS)]


def run(method, mesh=None, rules=None):
    model = models.Llama(CONFIG, rngs=nnx.Rngs(0), scan_layers=True)
    adapters = params = None
    if method == "adapters":
        adapters, params = train.init_adapters(jax.random.key(1), model, rank=RANK)
    # Adam normalises each coordinate, so reduction-order noise in a near-zero gradient
    # moves it by up to ~lr per step: lr 1e-3 keeps the 8-device run within 1e-5.
    tx = train.make_optimizer(method, learning_rate=1e-3, rank=RANK, refresh_every=2)
    trainer = train.Trainer(model, tx, adapters=adapters, params=params, mesh=mesh, rules=rules)
    state = trainer.init()
    losses = []
    for batch in batches():
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


@functools.cache
def reference(method):
    trainer, state, losses = run(method)
    # The comparison is not vacuous: the trained leaves moved far beyond the tolerance.
    start = trainer.adapters if method == "adapters" else trainer.params
    end = state.adapters if method == "adapters" else state.params
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(end), jax.tree.leaves(start)))  # fmt: skip
    assert moved > 1e-3, moved
    return jax.device_get(state), losses


def kernel_of(path: str) -> str | None:
    for name in KERNEL_AXES:
        if f"{name}/" in path or path.endswith(name):
            return name
    return None


def expected_spec(path: str, x, mesh) -> tuple:
    """The layout a leaf should have, from the rules in words."""
    ndim = x.ndim
    kernel = kernel_of(path)
    if kernel is None or ndim < 2:  # norms, counts, keys: replicated
        return (None,) * ndim
    keep = lambda a: a if a in mesh.axis_names else None  # noqa: E731
    d_in, d_out = (keep(a) for a in KERNEL_AXES[kernel])
    batch = (None,) * (ndim - 2)
    leaf = path.rsplit("/", 1)[-1]
    if "projectors" in path:  # stored bases: U (…, d_in, r), V (…, d_out, r)
        return (*batch, d_in if leaf == "u" else d_out, None)
    if leaf == "a":  # adapter a, LoRA-coordinates G V and their moments: (…, d_in, r)
        return (*batch, d_in, None)
    if leaf == "b":  # adapter b, Uᵀ G and their moments: (…, r, d_out)
        return (*batch, None, d_out)
    if x.shape[-1] == RANK:  # one-sided right coordinates G V: (…, d_in, r)
        return (*batch, d_in, None)
    if x.shape[-2] == RANK:  # one-sided left coordinates Uᵀ G: (…, r, d_out)
        return (*batch, None, d_out)
    return (*batch, d_in, d_out)  # the kernel itself, full Adam's moments


def spec_of(x) -> tuple:
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def assert_trees_close(got, want):
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for (path, g), w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64),
            rtol=1e-5, atol=1e-5, err_msg=path_str(path),
        )  # fmt: skip


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("method", train.METHODS)
def test_sharded_training_equals_one_device_and_places_every_leaf(method, mesh_name, axis_type):
    mesh = sharding.make_mesh(MESHES[mesh_name], axis_types=axis_type)
    trainer, state, losses = run(method, mesh, sharding.LLAMA_RULES)
    want, want_losses = reference(method)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert_trees_close(state, want)

    sharded_leaves = 0
    for (path, x), placed in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(trainer.shardings)
    ):
        name = path_str(path)
        want_spec = expected_spec(name, x, mesh)
        assert spec_of(x) == want_spec, f"{name}: {spec_of(x)} != {want_spec}"
        assert spec_of(x) == tuple(placed.spec) + (None,) * (x.ndim - len(placed.spec))
        if any(want_spec):
            assert not x.sharding.is_fully_replicated, name
            sharded_leaves += 1
    # Every trained matrix and its state are sharded, not just some of them.
    matrices = sum(kernel_of(path_str(p)) is not None for p, _ in
                   jax.tree_util.tree_leaves_with_path(state.params))  # fmt: skip
    assert sharded_leaves > matrices


def test_batch_is_split_over_data_and_fsdp_and_results_match():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, axis_types="explicit")
    trainer, state, losses = run("lora", mesh, sharding.LLAMA_RULES)
    want, want_losses = reference("lora")
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert_trees_close(state, want)
    tokens = trainer.place_batch(batches()[0])
    assert tokens.sharding.spec == P(("data", "fsdp"))
    kernel = state.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert spec_of(kernel) == (None, "fsdp", "tensor")  # replicated over data only
    assert kernel.addressable_shards[0].data.shape == (2, 16, 16)


def test_state_shardings_places_init_for_any_transform():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2}, axis_types="auto")
    params = {"w": jnp.ones((16, 8)), "stack": jnp.ones((3, 8, 24)), "bias": jnp.ones(8)}
    specs = {"w": P("fsdp", "tensor"), "stack": P(None, "tensor", "fsdp"), "bias": P()}
    placed = sharding.place(params, sharding.to_shardings(specs, mesh))
    for tx, name in [
        (lorajax.low_rank(optax.scale_by_adam(), rank=2, side="left", basis="random"), "left"),
        (lorajax.low_rank(optax.scale_by_adam(), rank=2, side="right", basis="svd"), "right"),
    ]:
        shardings = sharding.state_shardings(tx, placed)
        state = jax.jit(tx.init, out_shardings=shardings)(placed)
        low = state
        for key, (d_in, d_out) in {"w": ("fsdp", "tensor"), "stack": ("tensor", "fsdp")}.items():
            batch = (None,) * (params[key].ndim - 2)
            mu = low.inner_state.mu[key]
            if name == "left":
                assert spec_of(mu) == (*batch, None, d_out)
            else:
                assert spec_of(mu) == (*batch, d_in, None)
                assert spec_of(low.projectors[key].v) == (*batch, d_out, None)
        assert spec_of(low.key) == (None,) and low.count.sharding.is_fully_replicated


def test_param_specs_follow_the_rules_and_the_mesh():
    model = models.Llama(CONFIG, rngs=nnx.Rngs(0), scan_layers=False)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mesh = sharding.make_mesh({"fsdp": 8})
    specs = sharding.param_specs(params, mesh=mesh)
    layer = specs["model"]["layers"][1]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", None)  # no tensor axis
    assert layer["mlp"]["down_proj"]["kernel"] == P(None, "fsdp")
    assert layer["input_layernorm"]["scale"] == P(None)
    assert specs["lm_head"]["kernel"] == P("fsdp", None)
    assert sharding.param_specs(params)["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")


def test_adapter_specs_follow_the_kernels():
    model = models.Llama(CONFIG, rngs=nnx.Rngs(0), scan_layers=True)
    adapters, params = train.init_adapters(jax.random.key(0), model, rank=RANK)
    specs = sharding.adapter_specs(adapters, sharding.param_specs(params))
    o_proj = specs["model"]["layers"]["self_attn"]["o_proj"]["kernel"]
    assert (o_proj.a, o_proj.b) == (P(None, "tensor", None), P(None, None, "fsdp"))
    assert specs["model"]["embed_tokens"]["embedding"] is None  # not adapted


# --- errors, raised before any work ---------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "must look like"),
        ("fsdp", "axis=size"),
        ("pipe=2", "Unknown mesh axis 'pipe'"),
        ("fsdp=2,fsdp=4", "appears twice"),
        ("fsdp=0", "fsdp=0"),
        ("fsdp=-2", "fsdp=-2"),
    ],
)
def test_parse_mesh_rejects_bad_text(text, match):
    with pytest.raises(ValueError, match=match):
        sharding.parse_mesh(text)


def test_make_mesh_checks_the_device_count():
    assert sharding.make_mesh("data=2,fsdp=-1").shape == {"data": 2, "fsdp": 4}
    assert sharding.make_mesh(None).axis_types == (AxisType.Explicit,)
    with pytest.raises(ValueError, match="has 6 devices but 8"):
        sharding.make_mesh({"fsdp": 3, "tensor": 2})
    with pytest.raises(ValueError, match="does not divide 8"):
        sharding.make_mesh({"fsdp": -1, "tensor": 3})
    with pytest.raises(ValueError, match="Only one mesh axis may be -1"):
        sharding.make_mesh({"fsdp": -1, "tensor": -1})
    with pytest.raises(ValueError, match="`axis_types`"):
        sharding.make_mesh({"fsdp": -1}, axis_types="manual")


def test_param_specs_errors():
    params = {"q_proj": {"kernel": jnp.ones((12, 8))}, "other": jnp.ones(3)}
    with pytest.raises(ValueError, match="No partition rule matches 'other'"):
        sharding.param_specs(params)
    mesh = sharding.make_mesh({"fsdp": 8})
    rules = (*sharding.LLAMA_RULES, (r"other", P()))
    with pytest.raises(ValueError, match=r"'q_proj/kernel' has shape \(12, 8\).*size 12"):
        sharding.param_specs(params, rules, mesh=mesh)
    with pytest.raises(ValueError, match="has 3 axes"):
        sharding.param_specs({"w": jnp.ones((4, 4))}, [("w", P(None, None, None))])


def test_state_shardings_needs_named_shardings():
    tx = optax.adam(1e-3)
    with pytest.raises(ValueError, match="needs a NamedSharding"):
        sharding.state_shardings(tx, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
    one = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    two = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[1:2])
    placed = {
        "a": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(one, P())),
        "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(two, P())),
    }
    with pytest.raises(ValueError, match="found 2 meshes"):
        sharding.state_shardings(tx, placed)


def test_trainer_rules_need_a_mesh_and_divisible_batches():
    model = models.Llama(CONFIG, rngs=nnx.Rngs(0))
    tx = train.make_optimizer("full", learning_rate=1e-3)
    with pytest.raises(ValueError, match="pass `mesh` as well"):
        train.Trainer(model, tx, rules=sharding.LLAMA_RULES)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    trainer = train.Trainer(model, tx, mesh=mesh, rules=sharding.LLAMA_RULES)
    with pytest.raises(ValueError, match="batch size 6 must be divisible by the 4 devices"):
        trainer.place_batch(np.zeros((6, 9), np.int32))

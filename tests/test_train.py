"""lorajax.train: the step builder shared by the CLI, notebooks and pod scripts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

import lorajax
from lorajax import models, train

CONFIG = models.LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500.0,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def make_model(scan_layers=False, config=CONFIG):
    return models.Llama(config, rngs=nnx.Rngs(0), scan_layers=scan_layers)


def batch(seed=0, rows=8, length=17, vocab=CONFIG.vocab_size):
    # A learnable stream: each row counts up from a random start, modulo the vocabulary.
    start = np.random.default_rng(seed).integers(0, vocab, size=(rows, 1))
    return ((start + np.arange(length)) % vocab).astype(np.int32)


def make_trainer(method, model=None, **kwargs):
    model = model if model is not None else make_model()
    lr = train.default_learning_rate(method, CONFIG.hidden_size)
    tx = train.make_optimizer(method, learning_rate=lr, rank=4)
    if method == "adapters":
        plain = train.Trainer(model, tx)
        ad, base = train.init_adapters(jax.random.key(1), plain.params, rank=4)
        return train.Trainer(model, tx, adapters=ad, params=base, **kwargs)
    return train.Trainer(model, tx, **kwargs)


def run(trainer, steps=3, state=None):
    state = trainer.init() if state is None else state
    losses = []
    for t in range(steps):
        state, metrics = trainer.step(state, batch(t))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_default_learning_rate_follows_lora_without_regret():
    full = train.default_learning_rate("full", 576)
    np.testing.assert_allclose(full, 5e-5 * (2000 / 576) ** 0.781, rtol=1e-12)
    for method in ("lora", "adapters", "galore", "flora"):
        np.testing.assert_allclose(train.default_learning_rate(method, 576), 10 * full)


def test_next_token_loss_matches_numpy_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 6))
    total, count = train.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens))
    z = logits.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, tokens[:, 1:, None], -1).sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    assert float(count) == 10


@pytest.mark.parametrize("method", train.METHODS)
def test_each_method_lowers_the_loss_on_a_repeated_batch(method):
    trainer = make_trainer(method)
    state = trainer.init()
    x = batch(0)
    before = trainer.evaluate(state, [x])
    for _ in range(3):
        state, _ = trainer.step(state, x)
    after = trainer.evaluate(state, [x])
    assert int(state.step) == 3
    assert after < before - 1e-3, (method, before, after)


def test_full_step_equals_a_hand_written_adamw_step():
    model = make_model()
    lr = 1e-2
    trainer = train.Trainer(model, optax.adamw(lr, weight_decay=0.0))
    state, _ = run(trainer, steps=2)

    graphdef, params, rest = nnx.split(make_model(), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(lr, weight_decay=0.0)
    opt = tx.init(params)

    def loss(p, x):
        logits = nnx.merge(graphdef, p, rest)(x[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))

    for t in range(2):
        g = jax.grad(loss)(params, jnp.asarray(batch(t)))
        u, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, u)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state.params, params
    )


def test_low_rank_methods_freeze_everything_but_the_targets():
    for method in ("galore", "flora", "lora"):
        trainer = make_trainer(method)
        before = trainer.init()
        after, _ = run(trainer, steps=2)
        flat0 = dict(jax.tree_util.tree_flatten_with_path(before.params)[0])
        flat1 = dict(jax.tree_util.tree_flatten_with_path(after.params)[0])
        for path, leaf in flat0.items():
            name = jax.tree_util.keystr(path)
            moved = not np.array_equal(leaf, flat1[path])
            is_target = "proj" in name
            assert moved == is_target, (method, name)


def test_adapters_method_changes_only_the_adapters():
    trainer = make_trainer("adapters")
    before = trainer.init()
    after, _ = run(trainer, steps=3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before.params, after.params)
    b0 = [x.b for x in jax.tree.leaves(before.adapters, is_leaf=lorajax.adapters.is_lora)]
    b1 = [x.b for x in jax.tree.leaves(after.adapters, is_leaf=lorajax.adapters.is_lora)]
    assert len(b1) == 2 * 7
    assert all(np.abs(np.asarray(b)).max() == 0 for b in b0)
    assert all(np.abs(np.asarray(b)).max() > 0 for b in b1)
    # The merged model is the base plus s·a·b.
    merged = nnx.state(trainer.model(after), nnx.Param)
    merged = nnx.to_pure_dict(merged)
    ad = after.adapters["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    w0 = after.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(
        merged["model"]["layers"][0]["mlp"]["up_proj"]["kernel"],
        np.asarray(w0) + ad.scale * np.asarray(ad.a) @ np.asarray(ad.b),
        rtol=1e-5,
        atol=1e-6,
    )


def _target_shapes(params):
    layouts = lorajax.resolve_targets(params, "all-linear")
    return [lay.matrix_shape for lay in jax.tree.leaves(layouts) if lay is not None]


def test_lora_state_is_smaller_than_adamw_by_the_rank_ratio():
    rank = 4
    model = make_model()
    full = train.Trainer(model, train.make_optimizer("full", learning_rate=1e-3)).init()
    lora = train.Trainer(model, train.make_optimizer("lora", learning_rate=1e-3, rank=rank))
    lora = lora.init()
    n_params = sum(x.size for x in jax.tree.leaves(full.params))
    floats = lambda s: sum(  # noqa: E731
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(s)
        if jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert floats(full.opt_state) == 2 * 4 * n_params  # Adam's two moments, f32
    shapes = _target_shapes(full.params)
    coords = sum(rank * (n + m) for n, m in shapes)  # LoRA's a and b per matrix
    assert floats(lora.opt_state) == 2 * 4 * coords
    ratio = floats(lora.opt_state) / floats(full.opt_state)
    assert ratio < 0.5 * rank * 2 * 3 / CONFIG.hidden_size


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("method", ["full", "lora", "adapters"])
def test_data_parallel_steps_equal_one_device(method, axis_type):
    single, _ = run(make_trainer(method), steps=2)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    sharded_trainer = make_trainer(method, mesh=mesh)
    sharded, _ = run(sharded_trainer, steps=2)
    # Moments of near-cancelling gradient sums differ in the last bits with the reduction
    # order of the 8-way batch split: compare at 1e-5 absolute as well as relative.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        jax.tree.leaves(single),
        jax.tree.leaves(sharded),
    )
    leaf = jax.tree.leaves(sharded.params)[0]
    assert leaf.sharding.is_fully_replicated
    assert set(leaf.sharding.mesh.axis_names) == {"data", "fsdp"}


def test_scanned_and_unscanned_models_train_identically_with_adamw():
    a, la = run(make_trainer("full", model=make_model(False)), steps=2)
    b, lb = run(make_trainer("full", model=make_model(True)), steps=2)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    stacked = np.stack(
        [
            np.asarray(layer["self_attn"]["q_proj"]["kernel"])
            for layer in (a.params["model"]["layers"][0], a.params["model"]["layers"][1])
        ]
    )
    np.testing.assert_allclose(
        stacked,
        b.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_lora_runs_on_scanned_layers_with_one_basis_per_layer():
    trainer = make_trainer("lora", model=make_model(True))
    state, losses = run(trainer, steps=3)
    assert np.all(np.isfinite(losses))
    kernel = state.params["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert kernel.shape == (2, 48, 32)


def test_donated_steps_equal_undonated():
    a, _ = run(make_trainer("lora"), steps=2)
    b, _ = run(make_trainer("lora", donate=True), steps=2)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(a), jax.tree.leaves(b))


def test_evaluate_is_the_token_weighted_mean():
    trainer = make_trainer("full")
    state = trainer.init()
    x1, x2 = batch(1, rows=2), batch(2, rows=4)
    whole = trainer.evaluate(state, [x1, x2])
    want = (2 * trainer.evaluate(state, [x1]) + 4 * trainer.evaluate(state, [x2])) / 6
    np.testing.assert_allclose(whole, want, rtol=1e-6)


def test_memory_reports_the_compiled_step():
    trainer = make_trainer("lora")
    state = trainer.init()
    mem = trainer.memory(state, batch())
    assert mem["argument_bytes"] >= train.tree_bytes(state)
    assert mem["peak_bytes"] >= mem["argument_bytes"]


def test_fit_records_every_step():
    trainer = make_trainer("lora")
    seen = []
    result = train.fit(
        trainer,
        trainer.init(),
        iter([batch(t) for t in range(3)]),
        3,
        on_step=seen.append,
        progress=False,
    )
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert seen == result.history
    assert all(r["tokens_per_s"] > 0 for r in seen)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "sgd"}, "`method` must be one of"),
        ({"method": "lora", "rank": 0}, "`rank` must be a positive int"),
        ({"method": "lora", "learning_rate": -1.0}, "`learning_rate` must be a positive"),
        ({"method": "lora", "lora_pro": True}, "`lora_pro` applies to method='adapters'"),
        ({"method": "galore", "lora_plus_ratio": 16.0}, "`lora_plus_ratio` applies"),
        ({"method": "full", "weight_decay": -0.1}, "`weight_decay` must be"),
        ({"method": "lora", "refresh_every": 0}, "`refresh_every` must be"),
    ],
)
def test_make_optimizer_rejects_bad_arguments(kwargs, match):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        train.make_optimizer(**kwargs)


def test_trainer_rejects_bad_inputs():
    tx = train.make_optimizer("full", learning_rate=1e-3)
    with pytest.raises(TypeError, match="`model` must be a flax.nnx.Module"):
        train.Trainer({"w": jnp.ones(2)}, tx)
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="are not axes of the mesh"):
        train.Trainer(make_model(), tx, mesh=mesh, data_axes="batch")
    trainer = train.Trainer(make_model(), tx, mesh=mesh)
    state = trainer.init()
    with pytest.raises(ValueError, match="must be divisible by the 8 devices"):
        trainer.step(state, batch(rows=4))
    with pytest.raises(ValueError, match=r"must be \(batch, seq \+ 1\) token ids"):
        trainer.step(state, np.zeros((8,), np.int32))
    with pytest.raises(ValueError, match="`batches` is empty"):
        trainer.evaluate(state, [])
    with pytest.raises(ValueError, match="`steps` must be a positive int"):
        train.fit(trainer, state, iter([]), 0, progress=False)


def test_trainer_rejects_adapters_for_other_params():
    other = {"mlp": {"up_proj": {"kernel": jnp.ones((8, 4))}}}
    adapters, _ = train.init_adapters(jax.random.key(0), other, rank=2)
    tx = train.make_optimizer("adapters", learning_rate=1e-3)
    with pytest.raises(ValueError, match="adapter"):
        train.Trainer(make_model(), tx, adapters=adapters)

"""lorajax.checkpoint in one process: round trips across meshes, adapters, metadata, errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import lorajax
from lorajax import adapters as lora_adapters
from lorajax import models, train
from lorajax.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_state,
    restore_adapters,
    save_adapters,
)

CONFIG = models.LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def trained_state(method="lora", rank=2, steps=2):
    """A train state after a few steps (moments, bases and keys are all non-trivial)."""
    model = models.Llama(CONFIG, rngs=nnx.Rngs(0))
    tx = train.make_optimizer(method, learning_rate=1e-2, rank=rank, refresh_every=1)
    trainer = train.Trainer(model, tx)
    state = trainer.init()
    batch = np.arange(2 * 9).reshape(2, 9) % CONFIG.vocab_size
    for _ in range(steps):
        state, _ = trainer.step(state, batch)
    return trainer, state


def with_keys(state):
    """The state plus typed PRNG keys of two impls, as an optimizer state may hold."""
    return {
        "train": state,
        "key": jax.random.key(7),
        "keys": jax.random.split(jax.random.key(8), 3),
        "rbg": jax.random.key(9, impl="rbg"),
    }


def host(tree):
    return jax.tree.map(
        lambda x: np.asarray(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        ),
        tree,
    )


def assert_identical(a, b):
    la, ta = jax.tree.flatten(host(a))
    lb, tb = jax.tree.flatten(host(b))
    assert ta == tb
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


def mesh_shardings(tree, mesh):
    """Shard each leaf's first axis over "data" when it divides by 8, else replicate."""

    def pick(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or x.ndim == 0 or x.shape[0] % 8:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P("data"))

    return jax.tree.map(pick, tree)


@pytest.fixture(scope="module")
def lora_state():
    return trained_state("lora")[1]


def test_single_device_to_mesh_and_back(lora_state, tmp_path):
    state = with_keys(lora_state)
    single = SingleDeviceSharding(jax.devices()[0])
    assert all(x.sharding == single for x in jax.tree.leaves(state))
    mesh = jax.make_mesh((8,), ("data",))
    shardings = mesh_shardings(state, mesh)
    assert any(s.spec == P("data") for s in jax.tree.leaves(shardings))

    with Checkpointer(tmp_path / "one", async_save=False) as ckpt:
        ckpt.save(2, state)
        restored, data_state, _ = ckpt.restore(target=abstract_state(state, shardings))
    assert data_state is None
    assert_identical(restored, state)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # JAX spells P() as P(None,)
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        else:
            assert leaf.sharding == sharding
    assert jax.random.key_impl(restored["rbg"]) == jax.random.key_impl(state["rbg"])

    # The reverse: the mesh-sharded state saved, restored onto one device.
    with Checkpointer(tmp_path / "mesh") as ckpt:
        ckpt.save(5, restored)
        ckpt.wait()
        back, _, meta = ckpt.restore(5, target=abstract_state(state, single))
    assert meta["step"] == 5
    assert_identical(back, state)
    assert all(x.sharding == single for x in jax.tree.leaves(back))


def test_restored_state_keeps_training_identically(tmp_path):
    trainer, state = trained_state("galore")
    batch = np.arange(2 * 9).reshape(2, 9) % CONFIG.vocab_size
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(int(state.step), state)
        restored, _, _ = ckpt.restore(target=trainer.init())
    assert isinstance(restored, train.TrainState)
    a, _ = trainer.step(state, batch)
    b, _ = trainer.step(restored, batch)
    assert_identical(a, b)


def test_max_to_keep_and_steps(tmp_path):
    state = {"w": jnp.arange(3.0)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for step in (1, 2, 3, 4):
            ckpt.save(step, {"w": state["w"] + step}, data_state={"pos": step})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
        old, pos, _ = ckpt.restore(3, target=state)
    assert old["w"].tolist() == [3.0, 4.0, 5.0] and pos == {"pos": 3}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == ["3", "4"]
    # A new Checkpointer on the same directory sees the same steps.
    assert Checkpointer(tmp_path).all_steps() == [3, 4]


def test_metadata_contents(tmp_path):
    config = {"method": "lora", "rank": 2, "targets": "all-linear", "alpha": 32.0, "scale": 16.0}
    state = {"w": jnp.ones((2, 3), jnp.bfloat16), "k": jax.random.key(0)}
    with Checkpointer(tmp_path, config=config) as ckpt:
        ckpt.save(12, state, data_state={"epoch": 1, "step_in_epoch": 3})
    # The files are plain JSON that other tools can read.
    meta = json.loads((tmp_path / "12" / "metadata" / "metadata").read_text())
    data = json.loads((tmp_path / "12" / "data" / "metadata").read_text())
    assert meta["lorajax_version"] == lorajax.__version__
    assert meta["step"] == 12
    assert meta["config"] == config
    assert meta["leaves"] == {
        "w": {"shape": [2, 3], "dtype": "bfloat16"},
        "k": {"shape": [], "dtype": "key", "impl": str(state["k"].dtype._impl)},
    }
    assert data == {"iterator": {"epoch": 1, "step_in_epoch": 3}}
    assert Checkpointer(tmp_path).metadata() == meta


def test_adapters_round_trip_with_dora(tmp_path):
    params = {
        "attn": {"q": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}},
        "mlp": {"kernel": jax.random.normal(jax.random.key(1), (3, 8, 4))},
        "norm": jnp.ones(8),
    }
    spec = {
        "attn": {"q": {"kernel": lorajax.MatrixSpec()}},
        "mlp": {"kernel": lorajax.MatrixSpec(batch_axes=(0,))},
        "norm": None,
    }
    ad, _ = lora_adapters.init(jax.random.key(2), params, rank=2, alpha=4.0, targets=spec)
    ad = jax.tree.map(lambda x: x + 1.0, ad)  # non-zero b
    ad = lora_adapters.dora(params, ad)
    assert ad["mlp"]["kernel"].magnitude.shape == (3, 4)
    path = tmp_path / "adapters"
    save_adapters(path, ad, config={"rank": 2})
    zeros = jax.tree.map(jnp.zeros_like, ad)
    back, meta = restore_adapters(path, zeros)
    assert_identical(back, ad)
    assert back["attn"]["q"]["kernel"].scale == ad["attn"]["q"]["kernel"].scale
    assert meta["config"] == {"rank": 2}
    assert meta["adapters"]["mlp/kernel"]["dora"] is True
    # Merging the restored adapters gives the same weights.
    assert np.array_equal(
        np.asarray(lora_adapters.merge(params, back)["mlp"]["kernel"]),
        np.asarray(lora_adapters.merge(params, ad)["mlp"]["kernel"]),
    )
    with pytest.raises(ValueError, match="exists"):
        save_adapters(path, ad)
    # Adapters of another alpha (same shapes) are refused.
    other, _ = lora_adapters.init(jax.random.key(2), params, rank=2, alpha=8.0, targets=spec)
    with pytest.raises(CheckpointError, match=r"other settings.*alpha"):
        restore_adapters(path, lora_adapters.dora(params, other))
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_adapters(tmp_path / "nope", ad)


# -- errors ----------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    state = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(4), "k": jax.random.key(3)}
    with Checkpointer(tmp_path / "ckpt", config={"method": "lora", "rank": 8}) as ckpt:
        ckpt.save(1, state)
        ckpt.save(3, state, data_state={"epoch": 0})
    return tmp_path / "ckpt", state


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"No checkpoint in .*does not exist"):
        Checkpointer(tmp_path / "missing").restore(target={"w": jnp.ones(2)})
    assert not (tmp_path / "missing").exists()  # nothing was created
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"No checkpoint in .*is empty"):
        Checkpointer(tmp_path / "empty").restore(target={"w": jnp.ones(2)})


def test_missing_step(saved):
    path, state = saved
    with pytest.raises(
        CheckpointError, match=r"No checkpoint of step 2 .*saved steps are \[1, 3\]"
    ):
        Checkpointer(path).restore(2, target=state)


def test_truncated_file(saved):
    path, state = saved
    files = [p for p in (path / "3" / "state").rglob("*") if p.is_file() and p.stat().st_size]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"step 3 .*missing, truncated or corrupt"):
        Checkpointer(path).restore(target=state)
    # The other step is untouched and still restores.
    back, _, _ = Checkpointer(path).restore(1, target=state)
    assert_identical(back, state)


@pytest.mark.parametrize("item", ["metadata", "state", "data"])
def test_missing_item(saved, item):
    path, state = saved
    shutil.rmtree(path / "3" / item)
    with pytest.raises(CheckpointError, match=rf"step 3 .*incomplete.*\['{item}'\]"):
        Checkpointer(path).restore(target=state)


def test_config_mismatch(saved):
    path, state = saved
    with pytest.raises(CheckpointError, match="rank: saved 8, requested 4"):
        Checkpointer(path).restore(target=state, expect_config={"method": "lora", "rank": 4})
    # Matching settings pass.
    _, data_state, _ = Checkpointer(path).restore(target=state, expect_config={"rank": 8})
    assert data_state == {"epoch": 0}


def test_wrong_target(saved):
    path, state = saved
    ckpt = Checkpointer(path)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: \['extra'\]"):
        ckpt.restore(target={**state, "extra": jnp.ones(2)})
    with pytest.raises(CheckpointError, match=r"not in the target: \['b'\]"):
        ckpt.restore(target={"w": state["w"], "k": state["k"]})
    with pytest.raises(
        CheckpointError, match=r"'w' has shape \(8, 8\) in the checkpoint but \(8, 4\)"
    ):
        ckpt.restore(target={**state, "w": jnp.ones((8, 4))})
    with pytest.raises(CheckpointError, match=r"'k' is key in the checkpoint but uint32"):
        ckpt.restore(target={**state, "k": jax.random.key_data(state["k"])})


def test_bad_save_arguments(saved):
    path, state = saved
    ckpt = Checkpointer(path)
    with pytest.raises(ValueError, match="Step 3 is already saved"):
        ckpt.save(3, state)
    with pytest.raises(ValueError, match="`step` must be a non-negative int"):
        ckpt.save(-1, state)
    with pytest.raises(ValueError, match="`data_state` must be JSON-serialisable"):
        ckpt.save(4, state, data_state={"x": object()})
    with pytest.raises(ValueError, match="`max_to_keep` must be a positive int"):
        Checkpointer(path, max_to_keep=0)
    assert ckpt.all_steps() == [1, 3]


def test_unfinished_temporary_is_ignored(saved):
    path, state = saved
    # What a save killed half-way leaves: a temporary directory with partial contents.
    shutil.copytree(path / "3", path / "7.orbax-checkpoint-tmp-1234")
    (path / "7.orbax-checkpoint-tmp-1234" / "metadata").rename(path / "junk")
    ckpt = Checkpointer(path)
    assert ckpt.all_steps() == [1, 3] and ckpt.latest_step() == 3
    back, _, meta = ckpt.restore(target=state)
    assert meta["step"] == 3
    assert_identical(back, state)


# -- the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from tests.test_cli import CONFIG as CLI_CONFIG
    from tests.test_cli import WORDS

    root = tmp_path_factory.mktemp("cli")
    model = models.Llama(CLI_CONFIG, rngs=nnx.Rngs(0))
    models.save_hf(model, root / "model", tokenizer=models.Tokenizer.byte_level())
    rng = np.random.default_rng(0)
    (root / "corpus").mkdir()
    for i in range(4):
        lines = [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(40)]
        (root / "corpus" / f"doc{i}.txt").write_text("\n".join(lines))
    return root / "model", root / "corpus"


def cli_run(out, inputs, *extra):
    from lorajax import cli

    model, data = inputs
    argv = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--batch-size", "2", "--seq-len", "16", "--no-progress", "--method", "lora"]
    argv += ["--rank", "2", "--refresh-every", "3", "--lr", "3e-2"]
    return cli.main([*argv, *extra])


def saved_arrays(out, step):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as reader:
        tree = reader.restore((out / "checkpoints" / str(step) / "state").absolute())
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def snapshot(root):
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_save_every_and_resume_match_a_straight_run(cli_inputs, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli_run(straight, cli_inputs, "--steps", "6", "--save-every", "6") == 0
    assert cli_run(resumed, cli_inputs, "--steps", "4", "--save-every", "2") == 0
    assert Checkpointer(resumed / "checkpoints").all_steps() == [2, 4]
    assert cli_run(resumed, cli_inputs, "--steps", "6", "--resume") == 0
    assert "resumed from step 4" in capsys.readouterr().out
    a, b = saved_arrays(straight, 6), saved_arrays(resumed, 6)
    assert sorted(a) == sorted(b) and len(a) > 10
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    for key in ("eval_loss_before", "eval_loss_after", "train_loss_first", "train_loss_last"):
        assert sa[key] == sb[key], key
    assert sb["resumed_from_step"] == 4
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 6]
    straight_rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in straight_rows if "loss" in r] == [
        r["loss"] for r in rows if "loss" in r
    ]


def test_cli_resume_refusals_leave_files_untouched(cli_inputs, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli_run(out, cli_inputs, "--steps", "4", "--resume")
    assert info.value.code == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert not out.exists()

    assert cli_run(out, cli_inputs, "--steps", "2", "--save-every", "2") == 0
    before = snapshot(out)
    cases = [
        (["--rank", "4"], "--rank was 2, now 4"),
        (["--method", "galore"], "--method was 'lora', now 'galore'"),
        (["--steps", "2"], "already --steps 2"),
        (["--steps", "4", "--overwrite"], "--resume and --overwrite exclude each other"),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit) as info:
            cli_run(out, cli_inputs, "--steps", "4", "--resume", *extra)
        assert info.value.code == 2
        assert match in capsys.readouterr().err
        assert snapshot(out) == before
    # A run without --resume still refuses a non-empty --out.
    with pytest.raises(SystemExit):
        cli_run(out, cli_inputs, "--steps", "4", "--save-every", "2")
    assert "pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == before

"""A child process for tests/test_resume.py: trains, checkpoints, and can be killed.

``train``: trains a tiny Llama for ``--steps`` steps with ``lorajax.train.Trainer``,
checkpointing every ``--save-every`` steps (state and data position); with ``--resume``
it first restores the latest checkpoint. It prints ``step <n> done`` after each step and,
with ``--pause-after n``, sleeps after step ``n`` so that the parent can kill it there.
At the end it writes every leaf of the final state to ``--npz``.

``async-crash``: saves a large state at ``--k1`` (waiting for it), then starts an
asynchronous save at ``--k2``, prints ``saving``, and waits for it to finish (the parent
kills it meanwhile).

The parent sets ``XLA_FLAGS`` and ``JAX_PLATFORMS`` as tests/conftest.py does.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

CONFIG = dict(
    vocab_size=48,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
)


def flat(tree):
    """``{path: numpy array}`` of every leaf (typed keys as their raw data)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def big_state(seed: int, mib: int = 48):
    """A deterministic state of about ``mib`` MiB in several leaves, with a typed key."""
    rng = np.random.default_rng(seed)
    n = mib * (1 << 20) // 4 // 8
    return {
        "w": [jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for _ in range(8)],
        "key": jax.random.key(seed),
        "step": jnp.int32(seed),
    }


def train(args) -> None:
    from flax import nnx

    from lorajax import data, models
    from lorajax import train as train_lib
    from lorajax.checkpoint import Checkpointer

    model = models.Llama(models.LlamaConfig(**CONFIG), rngs=nnx.Rngs(0))
    tx = train_lib.make_optimizer(
        args.method, learning_rate=1e-2, rank=2, refresh_every=args.refresh_every, seed=3
    )
    trainer = train_lib.Trainer(model, tx)
    rows = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(24, 9))
    dataset = data.PackedDataset(rows)
    batches = data.BatchIterator(dataset, 4, seed=1)
    state = trainer.init()
    config = {"method": args.method, "rank": 2, "refresh_every": args.refresh_every}
    ckpt = Checkpointer(args.ckpt, max_to_keep=2, async_save=False, config=config)
    if args.resume:
        state, position, _ = ckpt.restore(target=state, expect_config=config)
        batches.restore(position)
        print(f"resumed at step {int(state.step)}", flush=True)
    while int(state.step) < args.steps:
        state, _ = trainer.step(state, next(batches))
        step = int(state.step)
        if step % args.save_every == 0:
            ckpt.save(step, state, data_state=batches.state())
        print(f"step {step} done", flush=True)
        if step == args.pause_after:
            time.sleep(120)
    ckpt.close()
    np.savez(args.npz, **flat(state))


def async_crash(args) -> None:
    from lorajax.checkpoint import Checkpointer

    ckpt = Checkpointer(args.ckpt, async_save=True)
    ckpt.save(args.k1, big_state(args.k1))
    ckpt.wait()
    state = big_state(args.k2)
    jax.block_until_ready(state)
    ckpt.save(args.k2, state)
    print("saving", flush=True)
    ckpt.wait()
    print("saved", flush=True)
    time.sleep(120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--method", default="lora")
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--save-every", type=int, default=3)
    t.add_argument("--refresh-every", type=int, default=2)
    t.add_argument("--ckpt", required=True)
    t.add_argument("--npz", required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--pause-after", type=int, default=-1)
    a = sub.add_parser("async-crash")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--k1", type=int, default=1)
    a.add_argument("--k2", type=int, default=2)
    args = parser.parse_args(argv)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if args.command == "train":
        train(args)
    else:
        async_crash(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

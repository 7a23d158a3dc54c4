"""A short demonstration: full fine-tuning against lorajax's low-rank optimizers.

A pretrained MLP is fine-tuned on a new task whose ideal weight change is low rank
plus a little full-rank noise, which is the situation LoRA and GaLore are built for.
Each optimizer family runs the same number of steps on the same batches:

- full AdamW (``optax.adamw``);
- one-sided projections: GaLore (exact SVD), randomized SVD, Flora (random bases);
- two-sided, adapter-free LoRA (``lorajax.lora``).

It prints the loss before and after, the optimizer state size and the step time.
Run it with ``python -m lorajax.demo`` (``make demo``).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lorajax

WIDTHS = (256, 512, 512, 128)
DELTA_RANK = 8


def _mlp(params: dict[str, Any], x: jax.Array) -> jax.Array:
    for i in range(len(WIDTHS) - 1):
        x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"][None, :]
        if i < len(WIDTHS) - 2:
            x = jnp.tanh(x)
    return x


def make_task(seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pretrained MLP and a teacher that differs from it by a low-rank change."""
    key = jax.random.key(seed)
    pretrained, teacher = {}, {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        k1, k2, k3, k4, key = jax.random.split(key, 5)
        w0 = jax.random.normal(k1, (d_in, d_out)) / jnp.sqrt(d_in)
        a = jax.random.normal(k2, (d_in, DELTA_RANK)) / jnp.sqrt(d_in)
        b = jax.random.normal(k3, (DELTA_RANK, d_out))
        noise = 0.02 * jax.random.normal(k4, (d_in, d_out)) / jnp.sqrt(d_in)
        pretrained[f"layer{i}"] = {"kernel": w0, "bias": jnp.zeros(d_out)}
        teacher[f"layer{i}"] = {"kernel": w0 + 0.5 * a @ b + noise, "bias": jnp.zeros(d_out)}
    return pretrained, teacher


def _state_bytes(state: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def optimizers(steps: int) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The contenders; learning rates follow each family's usual ratio to AdamW's."""
    rank, refresh = 16, max(steps // 4, 1)
    return {
        "full AdamW": lambda: optax.adamw(1e-3, weight_decay=0.0),
        "GaLore (exact SVD)": lambda: lorajax.galore(
            1e-3, rank=rank, update_proj_gap=refresh, scale=4.0
        ),
        "low_rank (randomized SVD)": lambda: optax.chain(
            lorajax.low_rank(rank=rank, refresh_every=refresh, scale=4.0),
            optax.scale_by_learning_rate(1e-3),
        ),
        "Flora (random bases)": lambda: lorajax.flora(3e-3, rank=rank, refresh_every=refresh),
        "lora (adapter-free LoRA)": lambda: lorajax.lora(1e-2, rank=rank, refresh_every=refresh),
    }


def run(steps: int = 300, batch: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """Trains every optimizer on the same batches and returns one row per optimizer."""
    params0, teacher = make_task(seed)

    def loss_fn(params: Any, x: jax.Array) -> jax.Array:
        return jnp.mean((_mlp(params, x) - _mlp(teacher, x)) ** 2)

    eval_x = jax.random.normal(jax.random.key(seed + 1), (2048, WIDTHS[0]))
    evaluate = jax.jit(loss_fn)
    rows = []
    for name, make in optimizers(steps).items():
        tx = make()

        @jax.jit
        def step(params, state, x, tx=tx):
            loss, grads = jax.value_and_grad(loss_fn)(params, x)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        params, state = params0, tx.init(params0)
        key = jax.random.key(seed + 2)
        compiled = step.lower(params, state, eval_x[:batch]).compile()
        times = []
        for _ in range(steps):
            key, sub = jax.random.split(key)
            x = jax.random.normal(sub, (batch, WIDTHS[0]))
            start = time.perf_counter()
            params, state, _ = compiled(params, state, x)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - start)
        times.sort()
        rows.append(
            {
                "optimizer": name,
                "loss_before": float(evaluate(params0, eval_x)),
                "loss_after": float(evaluate(params, eval_x)),
                "state_bytes": _state_bytes(state),
                "step_ms": 1e3 * times[len(times) // 2],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Prints the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"Fine-tuning an MLP {WIDTHS} towards a rank-{DELTA_RANK} change, {args.steps} steps")
    rows = run(args.steps, args.batch_size, args.seed)
    adam_bytes = rows[0]["state_bytes"]
    header = f"{'optimizer':28s} {'loss before':>12s} {'loss after':>11s} {'state':>10s} "
    print(header + f"{'vs AdamW':>9s} {'step':>9s}")
    for r in rows:
        print(
            f"{r['optimizer']:28s} {r['loss_before']:12.4f} {r['loss_after']:11.4f} "
            f"{r['state_bytes'] / 1024:8.0f}KB {r['state_bytes'] / adam_bytes:8.1%} "
            f"{r['step_ms']:7.2f}ms"
        )


if __name__ == "__main__":
    main()

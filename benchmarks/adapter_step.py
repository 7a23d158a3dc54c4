"""Adapter-mode training step cost against full AdamW and adapter-free LoRA.

One jitted training step (forward, backward, optimizer update, apply) of a residual MLP
stack, ``L`` x (512x2048 up, 2048x512 down), batch 256, rank 16, for:

- ``optax.adamw`` on the full params (the baseline);
- ``lorajax.lora``: adapter-free LoRA (two-sided projection, LoRA-Pro alignment);
- adapters through ``lorajax.adapters.apply`` with Adam, with LoRA+ (ratio 16), with
  ``lorajax.lora_pro`` in ``"sgd"`` mode (Sylvester and zero ``X``) and in ``"adam"`` mode
  (full-size moments), and LoRA-FA (frozen ``a``, ``lora_pro`` gives its projected
  gradient).

Methods are timed round-robin; ratios are medians of per-round ratios against
``optax.adamw`` measured in the same run. Memory is the optimizer state bytes and the
compiled step's ``memory_analysis()``. Steps are measured with the params (or adapters)
and state donated and not donated.

Usage: ``python benchmarks/adapter_step.py [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from optimizer_step import tree_bytes  # the script's own folder is on sys.path

import lorajax

RANK = 16
LR = 1e-3
BATCH = 256


def make_params(layers: int) -> dict:
    key = jax.random.key(0)
    params = {}
    for i in range(layers):
        k1, k2, key = jax.random.split(key, 3)
        params[f"layers_{i}"] = {
            "up_proj": {"kernel": jax.random.normal(k1, (512, 2048)) * 0.02},
            "down_proj": {"kernel": jax.random.normal(k2, (2048, 512)) * 0.02},
        }
    return params


def model(params: dict, x: jax.Array) -> jax.Array:
    for name in sorted(params):
        layer = params[name]
        x = x + jax.nn.gelu(x @ layer["up_proj"]["kernel"]) @ layer["down_proj"]["kernel"]
    return x


def loss_full(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    return jnp.mean((model(params, x) - y) ** 2)


def adam() -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(LR))


def methods() -> dict[str, tuple[str, Callable[[], optax.GradientTransformation], str]]:
    """name -> (what is trained, optimizer factory, adapter init)."""
    return {
        "full: optax.adamw": ("full", lambda: optax.adamw(LR), ""),
        "adapter-free: lorajax.lora": (
            "full",
            lambda: lorajax.lora(10 * LR, rank=RANK, refresh_every=200),
            "",
        ),
        "adapters: adam": ("adapters", adam, "default"),
        "adapters: lora_plus(16) + adam": (
            "adapters",
            lambda: optax.chain(
                optax.scale_by_adam(), lorajax.lora_plus(16.0), optax.scale_by_learning_rate(LR)
            ),
            "default",
        ),
        "adapters: lora_pro(sgd) + adam": (
            "adapters",
            lambda: optax.chain(lorajax.lora_pro(), adam()),
            "default",
        ),
        "adapters: lora_pro(sgd, x_mode=zero) + adam": (
            "adapters",
            lambda: optax.chain(lorajax.lora_pro(x_mode="zero"), adam()),
            "default",
        ),
        "adapters: lora_pro(adam)": (
            "adapters",
            lambda: optax.chain(lorajax.lora_pro(mode="adam"), optax.scale_by_learning_rate(LR)),
            "default",
        ),
        "adapters: lora_fa (lora_pro + freeze) + adam": (
            "adapters",
            lambda: optax.chain(lorajax.lora_pro(), adam(), lorajax.adapters.freeze()),
            "lora_fa",
        ),
    }


def _runner(trained: str, tx: optax.GradientTransformation, params: dict, init: str):
    if trained == "full":
        weights, base = params, None

        def loss(w, batch, base):
            return loss_full(w, batch)

    else:
        weights, base = lorajax.adapters.init(
            jax.random.key(1), params, rank=RANK, alpha=32, init=init
        )
        forward = lorajax.adapters.apply(model)

        def loss(w, batch, base):
            x, y = batch
            return jnp.mean((forward(base, w, x) - y) ** 2)

    def step(w, state, batch, base):
        value, grads = jax.value_and_grad(loss)(w, batch, base)
        updates, state = tx.update(grads, state, w)
        return optax.apply_updates(w, updates), state, value

    return weights, base, step


def bench(layers: int, steps: int) -> dict:
    params = make_params(layers)
    kx, ky = jax.random.split(jax.random.key(2))
    batch = (jax.random.normal(kx, (BATCH, 512)), jax.random.normal(ky, (BATCH, 512)))
    runners = {}
    for name, (trained, make, init) in methods().items():
        tx = make()
        weights, base, step = _runner(trained, tx, params, init)
        for donate in (False, True):
            state = tx.init(weights)
            fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
            t0 = time.perf_counter()
            compiled = fn.lower(weights, state, batch, base).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            w = jax.tree.map(jnp.copy, weights)
            w, state, _ = compiled(w, state, batch, base)  # first step: refreshes, if any
            jax.block_until_ready(w)
            runners[(name, donate)] = {
                "compiled": compiled,
                "carry": (w, state),
                "base": base,
                "times": [],
                "compile_s": compile_s,
                "state_bytes": tree_bytes(state),
                "trainable_bytes": tree_bytes(weights),
                "memory": {
                    "argument_bytes": mem.argument_size_in_bytes,
                    "output_bytes": mem.output_size_in_bytes,
                    "temp_bytes": mem.temp_size_in_bytes,
                },
            }
    for _ in range(steps):  # round-robin: drift hits every method alike
        for run in runners.values():
            w, state = run["carry"]
            t0 = time.perf_counter()
            w, state, value = run["compiled"](w, state, batch, run["base"])
            jax.block_until_ready((w, state, value))
            run["times"].append(time.perf_counter() - t0)
            run["carry"] = (w, state)
    adamw_state = runners[("full: optax.adamw", False)]["state_bytes"]
    results: dict = {}
    for (name, donate), run in runners.items():
        res = results.setdefault(
            name,
            {
                "state_bytes": run["state_bytes"],
                "state_vs_adamw": run["state_bytes"] / adamw_state,
                "trainable_bytes": run["trainable_bytes"],
            },
        )
        base_times = runners[("full: optax.adamw", donate)]["times"]
        res["donated" if donate else "not_donated"] = {
            "median_step_ms": 1e3 * statistics.median(run["times"]),
            "vs_adamw": statistics.median(a / b for a, b in zip(run["times"], base_times)),
            "compile_s": run["compile_s"],
            "memory": run["memory"],
        }
    return {
        "layers": layers,
        "matrices": [[512, 2048], [2048, 512]],
        "batch": BATCH,
        "rank": RANK,
        "timed_steps": steps,
        "methods": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / (
        "adapter_step_quick.json" if args.quick else "adapter_step.json"
    )
    report = {
        "mode": "quick" if args.quick else "full",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "lorajax": lorajax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "steps": bench(layers=2 if args.quick else 8, steps=5 if args.quick else 30),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'method':46s} {'ms':>7s} {'/adamw':>7s} {'donated':>8s} {'/adamw':>7s} {'state':>7s}")
    for name, res in report["steps"]["methods"].items():
        nd, d = res["not_donated"], res["donated"]
        print(
            f"{name:46s} {nd['median_step_ms']:7.2f} {nd['vs_adamw']:7.2f} "
            f"{d['median_step_ms']:8.2f} {d['vs_adamw']:7.2f} {res['state_vs_adamw']:7.4f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

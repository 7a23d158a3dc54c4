"""Optimizer step time, state size and refresh cost of lorajax against optax baselines.

Measures, in one run and on one parameter tree (``L`` x (512x2048 + 2048x512), rank 16):

- the median time of one optimizer step (``update`` + ``apply_updates``, jitted) for
  ``lorajax.low_rank`` with each basis, the aliases, ``optax.adamw`` and
  ``optax.contrib.galore``, with params and state donated and not donated. Methods are
  timed round-robin, so machine drift hits all of them alike; steps that refresh the
  bases are excluded (refresh is measured on its own);
- optimizer state bytes and the compiled executable's ``memory_analysis()``;
- the refresh: randomized SVD against exact SVD on a 2048x2048 gradient with a decaying
  spectrum, r = 32, and the subspace overlap reached.

Usage: ``python benchmarks/optimizer_step.py [--quick] [--out PATH]``. Results are JSON
in ``benchmarks/results/``; ratios are against baselines measured in the same run.

XLA:CPU's default concurrency-optimised scheduler runs every matrix's back-projection
before the in-place parameter updates when params are donated, which inflates the temp
buffer (see ``memory.temp_bytes``) and slows donated projected steps. The step table is
therefore measured twice: with the default scheduler, and in a subprocess with
``--xla_cpu_enable_concurrency_optimized_scheduler=false``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lorajax

RANK = 16
REFRESH = 200  # larger than the timed steps: no refresh inside the timing loop
LR = 1e-3


def make_params(layers: int) -> dict:
    key = jax.random.key(0)
    params = {}
    for i in range(layers):
        k1, k2, key = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "up": jax.random.normal(k1, (512, 2048)) * 0.02,
            "down": jax.random.normal(k2, (2048, 512)) * 0.02,
        }
    return params


def methods() -> dict:
    def low_rank(basis: str):
        return lambda: optax.chain(
            lorajax.low_rank(rank=RANK, basis=basis, refresh_every=REFRESH),
            optax.scale_by_learning_rate(LR),
        )

    return {
        "optax.adamw": lambda: optax.adamw(LR),
        "optax.contrib.galore": lambda: optax.contrib.galore(
            LR, rank=RANK, update_proj_gap=REFRESH
        ),
        "low_rank[svd]": low_rank("svd"),
        "low_rank[randomized_svd]": low_rank("randomized_svd"),
        "low_rank[random]": low_rank("random"),
        "low_rank[random_orthogonal]": low_rank("random_orthogonal"),
        "lorajax.galore": lambda: lorajax.galore(LR, rank=RANK, update_proj_gap=REFRESH),
        "lorajax.flora": lambda: lorajax.flora(LR, rank=RANK, refresh_every=REFRESH),
        "lorajax.lora": lambda: lorajax.lora(LR, rank=RANK, refresh_every=REFRESH),
    }


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench_steps(layers: int, steps: int) -> dict:
    params = make_params(layers)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-2, params)
    runners = {}
    for name, make in methods().items():
        tx = make()

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for donate in (False, True):
            state = tx.init(params)
            fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
            t0 = time.perf_counter()
            compiled = fn.lower(params, state, grads).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            # One step first: it computes the bases (the refresh at count 0).
            p = jax.tree.map(jnp.copy, params)
            p, state = compiled(p, state, grads)
            jax.block_until_ready(p)
            runners[(name, donate)] = {
                "compiled": compiled,
                "carry": (p, state),
                "times": [],
                "compile_s": compile_s,
                "state_bytes": tree_bytes(state),
                "memory": {
                    "argument_bytes": mem.argument_size_in_bytes,
                    "output_bytes": mem.output_size_in_bytes,
                    "temp_bytes": mem.temp_size_in_bytes,
                    "alias_bytes": mem.alias_size_in_bytes,
                },
            }
    for _ in range(steps):  # round-robin
        for run in runners.values():
            p, state = run["carry"]
            t0 = time.perf_counter()
            p, state = run["compiled"](p, state, grads)
            jax.block_until_ready((p, state))
            run["times"].append(time.perf_counter() - t0)
            run["carry"] = (p, state)
    adam_bytes = runners[("optax.adamw", False)]["state_bytes"]
    m, n = 512, 2048
    bound = RANK * (m + n) / (2 * m * n)
    results = {}
    for (name, donate), run in runners.items():
        med = statistics.median(run["times"])
        results.setdefault(name, {"state_bytes": run["state_bytes"]})
        results[name]["state_vs_adamw"] = run["state_bytes"] / adam_bytes
        results[name]["donated" if donate else "not_donated"] = {
            "median_step_ms": 1e3 * med,
            "min_step_ms": 1e3 * min(run["times"]),
            "compile_s": run["compile_s"],
            "memory": run["memory"],
        }
    # Ratios are medians of per-round ratios: each round times every method once, so a
    # ratio compares two measurements taken seconds apart, whatever the machine's drift.
    for name, res in results.items():
        for donate, mode in ((False, "not_donated"), (True, "donated")):
            mine = runners[(name, donate)]["times"]
            for base, key in (
                ("optax.adamw", "vs_adamw"),
                ("optax.contrib.galore", "vs_optax_galore"),
            ):
                theirs = runners[(base, donate)]["times"]
                res[mode][key] = statistics.median(a / b for a, b in zip(mine, theirs))
    return {
        "layers": layers,
        "matrices": [[512, 2048], [2048, 512]],
        "rank": RANK,
        "timed_steps": steps,
        "state_bound_r(m+n)/(2mn)": bound,
        "methods": results,
    }


def _with_spectrum(n: int, spectrum: jax.Array) -> jax.Array:
    k1, k2 = jax.random.split(jax.random.key(7))
    a = jnp.linalg.qr(jax.random.normal(k1, (n, n)))[0]
    b = jnp.linalg.qr(jax.random.normal(k2, (n, n)))[0]
    return (a * spectrum[None, :]) @ b.T


def bench_refresh(n: int, rank: int, repeats: int) -> dict:
    g = _with_spectrum(n, 1.0 / jnp.arange(1.0, n + 1))  # harmonic decay
    exact_fn = jax.jit(lambda g: jnp.linalg.svd(g, full_matrices=False)[0][:, :rank])
    u_exact = exact_fn(g)
    out = {"matrix": [n, n], "rank": rank, "spectrum": "sigma_i = 1/i", "variants": {}}

    def timed(fn, *args):
        fn(*args)  # compile + warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    exact_s = timed(exact_fn, g)
    out["exact_svd_ms"] = 1e3 * exact_s
    for oversample, power_iters in ((16, 2), (rank, 2), (16, 1)):
        fn = jax.jit(
            lambda g, k, p=oversample, q=power_iters: lorajax.randomized_svd(
                g, rank, key=k, oversample=p, power_iters=q
            )[0]
        )
        key = jax.random.key(3)
        seconds = timed(fn, g, key)
        overlap = float(lorajax.subspace_overlap(u_exact, fn(g, key)))
        # Warm start: the refresh inside low_rank continues from the previous basis.
        warm_fn = jax.jit(
            lambda g, k, u0, p=oversample, q=power_iters: lorajax.randomized_svd(
                g, rank, key=k, oversample=p, power_iters=q, warm_start=u0
            )[0]
        )
        perturbed = g + 0.05 * _with_spectrum(n, 1.0 / jnp.arange(1.0, n + 1)).T
        u_prev = exact_fn(perturbed)
        warm_overlap = float(lorajax.subspace_overlap(u_exact, warm_fn(g, key, u_prev)))
        out["variants"][f"oversample={oversample},power_iters={power_iters}"] = {
            "ms": 1e3 * seconds,
            "speedup_vs_exact": exact_s / seconds,
            "overlap_cold": overlap,
            "overlap_warm_from_previous_basis": warm_overlap,
        }
    return out


def bench_compile(layers: int) -> dict:
    """Compile time of one update on a SmolLM2-shaped tree of unscanned layers."""
    d, kv, ff = 576, 192, 1536
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}  # fmt: skip
    params = {
        f"layers_{i}": {
            k: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)} for k, s in shapes.items()
        }
        for i in range(layers)
    }
    out = {"matrices": 7 * layers}
    for name, make in methods().items():
        if name.endswith("[svd]") or name == "lorajax.galore":
            continue
        tx = make()
        state = jax.eval_shape(tx.init, params)
        t0 = time.perf_counter()
        jax.jit(tx.update).lower(params, state, params).compile()
        out[name] = time.perf_counter() - t0
    return out


MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def steps_with_memory_scheduler(layers: int, steps: int) -> dict:
    """The step table, measured in a subprocess with the alternative XLA:CPU scheduler."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER).strip()
    cmd = [sys.executable, __file__, "--steps-only", str(layers), str(steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    report["xla_flags"] = MEMORY_SCHEDULER
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and steps")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps-only", nargs=2, type=int, metavar=("LAYERS", "STEPS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.steps_only:
        print(json.dumps(bench_steps(*args.steps_only)))
        return
    quick = args.quick
    out = args.out or Path(__file__).parent / "results" / (
        "optimizer_step_quick.json" if quick else "optimizer_step.json"
    )
    report = {
        "mode": "quick" if quick else "full",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "lorajax": lorajax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "steps": bench_steps(layers=2 if quick else 8, steps=5 if quick else 40),
        "steps_memory_scheduler": steps_with_memory_scheduler(
            layers=2 if quick else 8, steps=5 if quick else 40
        ),
        "refresh": bench_refresh(512 if quick else 2048, 32, repeats=2 if quick else 5),
    }
    if not quick:
        report["compile_s"] = bench_compile(layers=30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for key in ("steps", "steps_memory_scheduler"):
        steps = report[key]
        print(f"[{key}] state bound r(m+n)/(2mn) = {steps['state_bound_r(m+n)/(2mn)']:.4f}")
        print(
            f"{'method':30s} {'ms':>7s} {'/adamw':>7s} {'/galore':>8s} "
            f"{'donated':>8s} {'/adamw':>7s} {'/galore':>8s} {'state':>7s}"
        )
        for name, res in steps["methods"].items():
            nd, d = res["not_donated"], res["donated"]
            print(
                f"{name:30s} {nd['median_step_ms']:7.2f} {nd['vs_adamw']:7.2f} "
                f"{nd['vs_optax_galore']:8.2f} {d['median_step_ms']:8.2f} {d['vs_adamw']:7.2f} "
                f"{d['vs_optax_galore']:8.2f} {res['state_vs_adamw']:7.4f}"
            )
    ref = report["refresh"]
    print(f"exact SVD {ref['matrix']} r={ref['rank']}: {ref['exact_svd_ms']:.0f} ms")
    for name, v in ref["variants"].items():
        print(
            f"  randomized {name}: {v['ms']:.0f} ms ({v['speedup_vs_exact']:.0f}x), overlap "
            f"{v['overlap_cold']:.4f} cold, {v['overlap_warm_from_previous_basis']:.4f} warm"
        )
    if "compile_s" in report:
        print("compile (s):", json.dumps(report["compile_s"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

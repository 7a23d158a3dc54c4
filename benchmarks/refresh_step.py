"""Cost of a basis refresh: lorajax's randomized SVD against optax's GaLore exact SVD.

Measures, in one process and on one parameter tree (``L`` x (512x2048 + 2048x512) f32,
random gradients, rank 16), the median time of one jitted optimizer step (``update`` +
``apply_updates``, not donated) for:

- ``optax.contrib.galore`` refreshing its bases (exact SVD) at every step
  (``update_proj_gap=1``), and between refreshes;
- ``lorajax.low_rank(basis="randomized_svd")`` (Adam inside, ``on_refresh="rotate"``) and
  ``lorajax.galore(basis="randomized_svd")`` (``on_refresh="keep"``), refreshing at every
  step (``refresh_every=1``) and between refreshes.

Methods are timed round-robin, one step each per round (each round starting one method
later), so machine drift hits all of them alike; every ratio is the median over rounds
of the ratio within a round. The "between refreshes" runs are first stepped once past
their refresh at count 0.

It also records the accuracy of the refreshed bases: the subspace overlap
``‖U_exactᵀ U‖²_F / r`` (1 = the exact top-r singular subspace) of ``low_rank``'s basis
after its first (cold) refresh and after further warm-started refreshes on a slowly
drifting gradient with a decaying spectrum, for several ``power_iters``.

Usage: ``python benchmarks/refresh_step.py [--quick] [--out PATH]``. Results are JSON in
``benchmarks/results/`` (``refresh_step.json`` or ``refresh_step_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from optimizer_step import make_params  # the same parameter tree as the step benchmark

import lorajax

RANK = 16
LR = 1e-3
NEVER = 10**6  # a refresh period longer than any run: only the refresh at count 0


def methods() -> dict:
    def low_rank(every: int):
        return lambda: optax.chain(
            lorajax.low_rank(rank=RANK, basis="randomized_svd", refresh_every=every),
            optax.scale_by_learning_rate(LR),
        )

    def galore(every: int):
        return lambda: lorajax.galore(LR, rank=RANK, update_proj_gap=every, basis="randomized_svd")

    def optax_galore(every: int):
        return lambda: optax.contrib.galore(LR, rank=RANK, update_proj_gap=every)

    return {
        "optax.contrib.galore/refresh": optax_galore(1),
        "low_rank[randomized_svd]/refresh": low_rank(1),
        "lorajax.galore[randomized_svd]/refresh": galore(1),
        "optax.contrib.galore/between": optax_galore(NEVER),
        "low_rank[randomized_svd]/between": low_rank(NEVER),
        "lorajax.galore[randomized_svd]/between": galore(NEVER),
    }


def bench_steps(layers: int, rounds: int) -> dict:
    params = make_params(layers)
    # A few gradient draws, cycled, so consecutive refreshes see different matrices.
    grads = [
        jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape) * 1e-2, params)
        for i in range(1, 4)
    ]
    runners = {}
    for name, make in methods().items():
        tx = make()

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        t0 = time.perf_counter()
        compiled = jax.jit(step).lower(params, state, grads[0]).compile()
        compile_s = time.perf_counter() - t0
        p, state = compiled(params, state, grads[0])  # count 0: every method refreshes
        jax.block_until_ready((p, state))
        runners[name] = {
            "compiled": compiled,
            "carry": (p, state),
            "times": [],
            "compile_s": compile_s,
        }
    order = list(runners.values())
    for i in range(rounds):
        g = grads[(i + 1) % len(grads)]
        # Each round starts one method later: a step right after optax's LAPACK-heavy
        # one can find OpenBLAS's threads still spinning, so no method always pays that.
        for run in order[i % len(order) :] + order[: i % len(order)]:
            p, state = run["carry"]
            t0 = time.perf_counter()
            p, state = run["compiled"](p, state, g)
            jax.block_until_ready((p, state))
            run["times"].append(time.perf_counter() - t0)
            run["carry"] = (p, state)

    def ratio(num: str, den: str) -> float:
        pairs = zip(runners[num]["times"], runners[den]["times"])
        return statistics.median(a / b for a, b in pairs)

    def overhead(name: str) -> list[float]:  # refresh step minus step between, per round
        a, b = runners[f"{name}/refresh"]["times"], runners[f"{name}/between"]["times"]
        return [x - y for x, y in zip(a, b)]

    results = {
        name: {
            "median_step_ms": 1e3 * statistics.median(run["times"]),
            "min_step_ms": 1e3 * min(run["times"]),
            "compile_s": run["compile_s"],
        }
        for name, run in runners.items()
    }
    base = "optax.contrib.galore"
    speedups = {}
    for name in ("low_rank[randomized_svd]", "lorajax.galore[randomized_svd]"):
        theirs, mine = overhead(base), overhead(name)
        speedups[name] = {
            "refresh_step": ratio(f"{base}/refresh", f"{name}/refresh"),
            "between_step": ratio(f"{base}/between", f"{name}/between"),
            # What the refresh adds to a step, optax's over ours (medians over rounds).
            "refresh_overhead": statistics.median(theirs) / statistics.median(mine),
            "refresh_vs_own_between": ratio(f"{name}/refresh", f"{name}/between"),
        }
    return {
        "layers": layers,
        "matrices": [[512, 2048], [2048, 512]],
        "rank": RANK,
        "rounds": rounds,
        "methods": results,
        "speedup_vs_optax_galore": speedups,
    }


def _with_spectrum(n: int, m: int, spectrum: jax.Array, key: int) -> jax.Array:
    k1, k2 = jax.random.split(jax.random.key(key))
    a = jnp.linalg.qr(jax.random.normal(k1, (n, m)))[0]
    b = jnp.linalg.qr(jax.random.normal(k2, (m, m)))[0]
    return (a * spectrum[None, :]) @ b.T


def bench_accuracy(power_iters: tuple[int, ...], refreshes: int) -> dict:
    """Subspace overlap of low_rank's refreshed basis with the exact top-r subspace."""
    n, m = 2048, 512
    i = jnp.arange(1.0, m + 1)
    out = {"matrix": [n, m], "rank": RANK, "refreshes": refreshes, "spectra": {}}
    for label, spectrum in (("1/i", 1.0 / i), ("1/i^2", i**-2.0), ("0.97^i", 0.97 ** (i - 1))):
        g0 = _with_spectrum(n, m, spectrum, key=11)
        drift = _with_spectrum(n, m, spectrum, key=12)
        # The gradient drifts slowly: each refresh warm-starts from the previous basis.
        gs = [g0 + 0.05 * t * drift for t in range(refreshes)]
        exact = [jnp.linalg.svd(g, full_matrices=False)[0][:, :RANK] for g in gs]
        rows = {}
        for q in power_iters:
            tx = lorajax.low_rank(
                optax.sgd(1.0), rank=RANK, side="left", refresh_every=1, power_iters=q
            )
            step = jax.jit(tx.update)
            state = tx.init({"w": gs[0]})
            overlaps = []
            for g, u_exact in zip(gs, exact):
                _, state = step({"w": g}, state)
                u = lorajax.current_bases(state)["w"][0]
                overlaps.append(float(lorajax.subspace_overlap(u_exact, u)))
            rows[f"power_iters={q}"] = {
                "overlap_first_refresh": overlaps[0],
                "overlap_last_refresh": overlaps[-1],
                "overlap_min_warm": min(overlaps[1:]) if len(overlaps) > 1 else None,
            }
        out["spectra"][label] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and rounds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    quick = args.quick
    out = args.out or Path(__file__).parent / "results" / (
        "refresh_step_quick.json" if quick else "refresh_step.json"
    )
    report = {
        "mode": "quick" if quick else "full",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "lorajax": lorajax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_before": list(os.getloadavg()),
        "steps": bench_steps(layers=8, rounds=5 if quick else 25),
        "accuracy": bench_accuracy((2,) if quick else (0, 1, 2), refreshes=3 if quick else 6),
        "load_average_after": list(os.getloadavg()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    steps = report["steps"]
    print(f"{'method':42s} {'median ms':>10s} {'min ms':>9s}")
    for name, res in steps["methods"].items():
        print(f"{name:42s} {res['median_step_ms']:10.1f} {res['min_step_ms']:9.1f}")
    for name, s in steps["speedup_vs_optax_galore"].items():
        print(
            f"optax galore / {name}: refresh step {s['refresh_step']:.1f}x, between "
            f"{s['between_step']:.2f}x, refresh overhead {s['refresh_overhead']:.1f}x"
        )
    for label, rows in report["accuracy"]["spectra"].items():
        for q, row in rows.items():
            print(
                f"overlap sigma_i={label} {q}: first {row['overlap_first_refresh']:.5f}, "
                f"last {row['overlap_last_refresh']:.5f}"
            )
    print(f"load average before/after: {report['load_average_before']} "
          f"{report['load_average_after']}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The learning-rate ratio of LoRA to full fine-tuning (LoRA Without Regret)
#
# LoRA Without Regret (Schulman et al., Thinking Machines Lab, 2025) sweeps the learning
# rate of full fine-tuning and of LoRA with `alpha = 32` and reports two regularities:
#
# 1. the best LoRA learning rate is about **10×** the best full fine-tuning rate;
# 2. under the `alpha / r` scaling, the best LoRA rate **hardly moves with the rank**
#    (at initialisation, `b = 0`, the first steps do not depend on `r` at all).
#
# This notebook repeats the sweep on SmolLM2-135M with the embedded corpus, for full
# AdamW, LoRA adapters at ranks 4, 16 and 64, `lorajax.lora` (adapter-free, rank 16) and
# LoRA+ (ratio 16, Hayou et al., arXiv:2402.12354), whose base rate needs its own sweep.
#
# Quick mode (`LORAJAX_QUICK=1`) runs a tiny random Llama for a few steps, to check the
# code; only the full mode measures anything.

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from common import QUICK, load_model, save_figure, save_table, training_data

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lorajax import train

HALF_DECADE = math.sqrt(10.0)
model, tokenizer = load_model()  # SmolLM2-135M-Instruct; a tiny random Llama if QUICK
config = model.config
if QUICK:
    STEPS, SEQ, BATCH, EVAL_BATCHES, MAX_EXTEND = 3, 32, 4, 1, 1
    RANKS = (2, 8)
    FULL_GRID, LORA_GRID, PLUS_GRID = (1e-4, 1e-3), (1e-3, 1e-2), (1e-4, 1e-3)
else:
    STEPS, SEQ, BATCH, EVAL_BATCHES, MAX_EXTEND = 20, 64, 4, 4, 2
    RANKS = (4, 16, 64)
    FULL_GRID = (3e-5, 1e-4, 3e-4, 1e-3)
    LORA_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
    PLUS_GRID = (3e-5, 1e-4, 3e-4)

ALPHA = 32
train_set, batches, evals = training_data(
    tokenizer, seq_len=SEQ, batch_size=BATCH, steps=STEPS, eval_batches=EVAL_BATCHES
)
print(f"{len(train_set)} training sequences of {SEQ} tokens; {STEPS} steps of {BATCH}")

# %% [markdown]
# ## One compiled step per method, every learning rate
#
# With weight decay 0, each method's update is linear in the learning rate, so the rate
# can sit at the end of the chain as a hyperparameter in the optimizer state: each
# method runs at `learning_rate=1` (its update already points downhill) and the last
# link, `optax.inject_hyperparams(optax.scale)`, multiplies it by `lr`. One compiled step
# then serves the whole sweep; a run starts from `trainer.init()` with `step_size = lr`.
#
# A run is the same `STEPS` batches from the same start; its result is the eval loss at
# the end. When the best rate of a sweep is at the edge of its grid, the grid is
# extended by half decades; when it sits next to a rate that diverged, the gap between
# the two is split, up to `MAX_EXTEND` extra runs. A run whose training loss stops
# being finite or exceeds its first value by 2 nats is stopped and counted as diverged.

# %%
d = config.hidden_size


def make_trainer(method, **options):
    rate = optax.inject_hyperparams(optax.scale)(step_size=1.0)
    tx = optax.chain(train.make_optimizer(method, learning_rate=1.0, **options), rate)
    adapters = base = None
    if method == "adapters":
        rank = options["rank"]
        adapters, base = train.init_adapters(jax.random.key(0), model, rank=rank, alpha=ALPHA)
    return train.Trainer(model, tx, adapters=adapters, params=base)


def run(trainer, lr):
    state = trainer.init()
    chained = state.opt_state
    rate = chained[1]._replace(hyperparams={"step_size": jnp.asarray(lr, jnp.float32)})
    state = state._replace(opt_state=(chained[0], rate))
    first = None
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        loss = float(metrics["loss"])
        first = loss if first is None else first
        if not math.isfinite(loss) or loss > first + 2.0:
            return float("nan")
    value = trainer.evaluate(state, evals)
    return value if math.isfinite(value) else float("nan")


def sweep(name, trainer, grid):
    """Runs ``grid``, then refines it while the best finite rate is at an edge of the
    finite ones: half-way (in log scale) to the next rate when that one diverged, a half
    decade beyond the grid otherwise."""
    results = {lr: run(trainer, lr) for lr in grid}
    for _ in range(MAX_EXTEND):
        finite = sorted(lr for lr, v in results.items() if math.isfinite(v))
        if not finite:
            break
        best = min(finite, key=results.get)
        if best not in (finite[0], finite[-1]):
            break
        beyond = [lr for lr in results if (lr > best if best == finite[-1] else lr < best)]
        if beyond:  # the neighbour diverged: split the gap
            new = math.sqrt(best * min(beyond, key=lambda lr: abs(math.log(lr / best))))
        else:
            new = best * HALF_DECADE if best == finite[-1] else best / HALF_DECADE
        results[new] = run(trainer, new)
    results = dict(sorted(results.items()))
    for lr, value in results.items():
        print(f"{name:16s} lr {lr:.1e}  eval {value:.4f}")
    return results


def best_rate(results):
    """The grid's best rate, refined by a parabola in log10(lr) through it and its
    neighbours (the grid's best itself when it sits at an edge)."""
    lrs = [lr for lr, v in results.items() if math.isfinite(v)]
    values = [results[lr] for lr in lrs]
    i = int(np.argmin(values))
    if i == 0 or i == len(lrs) - 1:
        return lrs[i], lrs[i]
    x = np.log10(lrs[i - 1 : i + 2])
    a, b, _ = np.polyfit(x, values[i - 1 : i + 2], 2)
    vertex = -b / (2 * a) if a > 0 else x[1]
    return lrs[i], float(10 ** np.clip(vertex, x[0], x[2]))


# %% [markdown]
# ## The sweeps

# %%
sweeps = {"full AdamW": sweep("full AdamW", make_trainer("full"), FULL_GRID)}
for rank in RANKS:
    name = f"LoRA r={rank}"
    sweeps[name] = sweep(name, make_trainer("adapters", rank=rank), LORA_GRID)
middle = RANKS[len(RANKS) // 2]
name = f"lorajax.lora r={middle}"
sweeps[name] = sweep(name, make_trainer("lora", rank=middle), LORA_GRID)
name = f"LoRA+ (16) r={middle}"
sweeps[name] = sweep(name, make_trainer("adapters", rank=middle, lora_plus_ratio=16.0), PLUS_GRID)

# %% [markdown]
# ## Results

# %%
best = {name: best_rate(results) for name, results in sweeps.items()}
full_grid_best, full_best = best["full AdamW"]
ratios = {name: refined / full_best for name, (_, refined) in best.items()}

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
top = max((v for r in sweeps.values() for v in r.values() if math.isfinite(v)), default=0) + 0.05
for name, results in sweeps.items():
    lrs, values = zip(*results.items())
    (line,) = left.plot(lrs, values, "o-", label=name)
    left.axvline(best[name][1], color=line.get_color(), lw=0.8, ls=":")
    diverged = [lr for lr, v in results.items() if not math.isfinite(v)]
    left.plot(diverged, [top] * len(diverged), "x", color=line.get_color(), markersize=8)
left.set(xscale="log", xlabel="learning rate", ylabel=f"eval loss after {STEPS} steps")
left.set_title("final loss against learning rate (dotted: refined best; ×: diverged)")
left.legend(fontsize=8)
lora_names = [f"LoRA r={rank}" for rank in RANKS]
right.plot(RANKS, [best[n][1] for n in lora_names], "o-", label="best LoRA rate (refined)")
right.plot(RANKS, [best[n][0] for n in lora_names], "x", label="best LoRA rate (grid)")
right.axhline(full_best, color="k", ls="--", label="best full fine-tuning rate")
right.axhline(10 * full_best, color="grey", ls=":", label="10 × full")
right.set(xscale="log", yscale="log", xlabel="LoRA rank (alpha = 32)", ylabel="learning rate")
right.set_xticks(RANKS, [str(r) for r in RANKS])
right.minorticks_off()
right.set_title("best rate against rank")
right.legend(fontsize=8)
save_figure(fig, "02_lr_ratio")

table = {
    "steps": STEPS,
    "seq_len": SEQ,
    "batch": BATCH,
    "alpha": ALPHA,
    "sweeps": {name: {f"{lr:.3g}": v for lr, v in r.items()} for name, r in sweeps.items()},
    "best_lr_grid": {name: grid for name, (grid, _) in best.items()},
    "best_lr_refined": {name: refined for name, (_, refined) in best.items()},
    "ratio_to_full": ratios,
}
save_table(table, "02_lr_ratio")
for name, (grid, refined) in best.items():
    print(f"{name:16s} best lr {grid:.1e} (refined {refined:.2e})  × full {ratios[name]:.1f}")
spread = max(best[n][1] for n in lora_names) / min(best[n][1] for n in lora_names)
print(f"best LoRA rate varies by {spread:.2f}× over ranks {RANKS}")

# %% [markdown]
# ## What the full run measured
#
# SmolLM2-135M, 20 steps of 4 × 64 tokens at a constant rate, eval loss on 16 held-out
# sequences, one seed (numbers in `results/02_lr_ratio.json`). Rates are half a decade
# apart; a rate between 3e-3 and 1e-2 (5.5e-3) was added where 1e-2 diverged.
#
# | method | best rate (grid) | refined | × full (refined / grid) | eval at best |
# |---|---:|---:|---:|---:|
# | full AdamW | 1e-4 | 9.9e-5 | 1 | **2.906** |
# | LoRA r=4 | 3e-3 | 1.75e-3 | 17.6 / 30 | 2.956 |
# | LoRA r=16 | 3e-3 | 1.77e-3 | 17.8 / 30 | 2.938 |
# | LoRA r=64 | 3e-3 | 1.77e-3 | 17.9 / 30 | 2.938 |
# | `lorajax.lora` r=16 | 1e-3 | 1.60e-3 | 16.1 / 10 | 2.987 |
# | LoRA+ (16) r=16, base rate | 3e-4 | 1.85e-4 | 1.9 / 3 | 2.942 |
#
# - **The ratio.** The best LoRA rate is 18–30× the best full fine-tuning rate here (the
#   parabola is pulled towards lower rates by the steep rise just past 3e-3, so the
#   truth is likely between the two). That is above the blog's ~10×; the blog also
#   finds the ratio larger in very short runs (about 15×), and 20 steps is very short.
#   The direction and the order of magnitude agree; the exact factor is not pinned
#   down by a half-decade grid and one seed.
# - **Rank independence.** Under `alpha = 32` the best rate does not move with the rank
#   at all: 3e-3 on the grid and 1.75–1.77e-3 refined for ranks 4, 16 and 64, and the
#   three curves nearly coincide at every rate. This agrees with the blog: with `b = 0`
#   at the start, `alpha/r` makes the first steps independent of `r`.
# - **`lorajax.lora`** wants a similar rate (16× full, refined), with a flatter optimum
#   (2.987 at 1e-3, 3.002 at 3e-3) and a higher loss after 20 steps than the adapters.
# - **LoRA+** with ratio 16 needs a base rate about 10× lower than LoRA's (3e-4 against
#   3e-3, so `b`'s rate is 4.8e-3, close to LoRA's best); at its best it matches LoRA
#   (2.942 against 2.938) rather than beating it in 20 steps.
# - In 20 steps, full fine-tuning at its best rate (2.906) is ahead of every low-rank
#   method at theirs (2.938–2.987).

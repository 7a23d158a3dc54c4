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
# # 05 · Which subspace? Exact SVD, randomized SVD and random bases
#
# `lorajax.low_rank` runs Adam on rank-`r` coordinates `Pᵀ G` of each gradient and maps
# the step back with `P`. Where `P` comes from is the `basis` argument:
#
# - `"svd"`: the top-`r` singular vectors of the gradient at the refresh step, from an
#   exact SVD (GaLore);
# - `"randomized_svd"`: the same subspace estimated by a randomized range finder warm
#   started from the previous basis (the default);
# - `"random"`: a Gaussian matrix regenerated from a key, never stored (Flora).
#
# Every `refresh_every` steps the basis is recomputed, and `on_refresh` says what happens
# to Adam's moments, which were written in the old coordinates: `"keep"` them (GaLore),
# `"rotate"` them into the new basis (the default, Flora's rule) or `"reset"` them.
#
# On SmolLM2-135M and the embedded corpus (the Python documentation), with every linear
# layer projected at rank 8 and a short refresh period, this notebook measures
#
# 1. how far the subspace moves at each refresh (overlap of the new basis with the old)
#    and how much of the gradient's energy each basis holds, at the refresh and at the
#    end of its period;
# 2. what a refresh costs: the time of a training step that refreshes against one that
#    does not;
# 3. the effect of `on_refresh` on the training loss, for randomized-SVD bases;
# 4. the optimizer-state memory of full AdamW, the three bases and `lorajax.lora`.
#
# Quick mode (`LORAJAX_QUICK=1`) runs a tiny random Llama for a few steps, to check the
# code; only the full mode measures anything.

# %%
import os

# jax's CPU factorisations (the SVDs and QRs of a refresh) run in OpenBLAS's LAPACK, whose
# own threads compete with XLA's for the cores: on a busy CPU that slows a refresh up to
# a hundredfold. One LAPACK thread keeps the refresh timings meaningful. It has to be set
# before jax is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from common import QUICK, load_model, mean_loss_fn, save_figure, save_table, training_data

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx

import lorajax
from lorajax import train

RANK = 8
model, tokenizer = load_model()  # SmolLM2-135M-Instruct; a tiny random Llama if QUICK
config = model.config
if QUICK:
    STEPS, REFRESH, SEQ, BATCH, EVAL_BATCHES = 6, 2, 32, 4, 2
else:
    STEPS, REFRESH, SEQ, BATCH, EVAL_BATCHES = 30, 10, 64, 4, 4

train_set, batches, evals = training_data(
    tokenizer, seq_len=SEQ, batch_size=BATCH, steps=STEPS, eval_batches=EVAL_BATCHES
)
print(f"{len(train_set)} training sequences of {SEQ} tokens; {STEPS} steps of {BATCH}")
print(f"rank {RANK}, bases refreshed at steps {list(range(0, STEPS, REFRESH))}")

# %% [markdown]
# ## The optimizers, and reading their bases
#
# Each projected optimizer is `low_rank(scale_by_adam(), rank=8, basis=…)` followed by
# the learning rate, on the `"all-linear"` matrices (attention and MLP projections);
# every other parameter is frozen (`train.only_targets`, as `make_optimizer` does). All use the
# learning rate `train.default_learning_rate("lora", d)` and `side="auto"`: each matrix
# is projected on the side that keeps the state small.
#
# The bases in use are read from the optimizer state with `lorajax.current_bases`
# (stored ones from the `Projector`s, random ones regenerated from the state's key); the
# notebook never recomputes them. Two measures, averaged over the matrices:
#
# - **overlap** of the new basis with the one it replaces, `‖Q_oldᵀ Q_new‖_F² / r`
#   (`lorajax.subspace_overlap`; 1: the subspace did not move, `r/d`: unrelated);
# - **captured energy** `‖Qᵀ G‖² / ‖G‖²` of the full gradient `G` (computed by
#   `jax.grad`), where `Q` is an orthonormal basis of the span of `P` (a Gaussian `P`
#   is not orthonormal; its span is what the update can reach). A random subspace
#   captures `r/d` on average; the exact SVD captures the most any rank-`r` subspace can
#   of the gradient it was computed from.

# %%
d = config.hidden_size
LR = train.default_learning_rate("lora", d)
params0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
loss_fn = mean_loss_fn(model)


def projected(basis, on_refresh="rotate"):
    """Adam on rank-RANK projections of the linear layers; everything else frozen."""
    inner = optax.chain(
        lorajax.low_rank(
            optax.scale_by_adam(), rank=RANK, basis=basis, refresh_every=REFRESH,
            on_refresh=on_refresh, targets="all-linear",
        ),
        optax.scale_by_learning_rate(LR),
    )  # fmt: skip
    return train.only_targets(inner, "all-linear")


full_gradient = jax.jit(jax.grad(loss_fn))
eval_loss_fn = jax.jit(loss_fn)


def eval_loss(params):
    return float(np.mean([eval_loss_fn(params, b) for b in evals]))


def low_rank_state(opt_state):
    is_state = lambda x: isinstance(x, lorajax.LowRankState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x))


def by_path(tree, is_leaf):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {jax.tree_util.keystr(path): x for path, x in flat if x is not None}


def bases_in_use(opt_state):
    """``{path: (projector, basis on its side)}`` for every projected matrix."""
    state = low_rank_state(opt_state)
    is_projector = lambda x: x is None or isinstance(x, lorajax.Projector)  # noqa: E731
    projectors = by_path(state.projectors, is_projector)
    pairs = by_path(lorajax.current_bases(state), lambda x: x is None or isinstance(x, tuple))
    return {path: (p, pairs[path][0] if p.side == "left" else pairs[path][1])
            for path, p in projectors.items()}  # fmt: skip


@jax.jit
def captured(basis, g):
    """‖Qᵀ G‖² / ‖G‖², with Q an orthonormal basis of span(basis) and G oriented to it."""
    q = jnp.linalg.qr(basis.astype(jnp.float32))[0]
    return jnp.sum((q.T @ g) ** 2) / jnp.sum(g**2)


overlap = jax.jit(lorajax.subspace_overlap)


def mean_captured(bases, grads):
    grads = by_path(grads, lambda x: x is None)
    values = []
    for path, (p, basis) in bases.items():
        g = p.layout.to_matrix(grads[path])
        values.append(float(captured(basis, g if p.side == "left" else g.T)))
    return float(np.mean(values))


def mean_overlap(old, new):
    return float(np.mean([float(overlap(old[k][1], new[k][1])) for k in new]))


# %% [markdown]
# ## Training runs
#
# Five runs of `STEPS` steps on the same batches: the three bases with the default
# `on_refresh="rotate"`, then randomized SVD with `"keep"` and `"reset"`. In the three
# basis runs, at each refresh step the gradient of that step's batch is computed before
# the step, and the bases before and after it are read; at the last step of each period
# the stale basis is scored against that step's gradient. Each step is timed after
# `block_until_ready`, with the measurements finished before its clock starts; step 0
# includes compilation and is left out of the timings.
# LAPACK runs on one thread (`OPENBLAS_NUM_THREADS=1`, set above).

# %%
RUNS = {
    "svd": ("svd", "rotate"),
    "randomized_svd": ("randomized_svd", "rotate"),
    "random": ("random", "rotate"),
    "randomized_svd, keep": ("randomized_svd", "keep"),
    "randomized_svd, reset": ("randomized_svd", "reset"),
}
BASES = ("svd", "randomized_svd", "random")
eval_before = eval_loss(params0)
print(f"eval loss before training {eval_before:.4f}; learning rate {LR:.2e}")

results = {}
for name, (basis, on_refresh) in RUNS.items():
    measure = name in BASES
    trainer = train.Trainer(model, projected(basis, on_refresh))
    state = trainer.init()
    losses, seconds, overlaps, at_refresh, at_end = [], [], [], [], []
    for step, batch in enumerate(batches):
        refresh, last = step % REFRESH == 0, step % REFRESH == REFRESH - 1 or step == STEPS - 1
        if measure and (refresh or last):
            grads = jax.block_until_ready(full_gradient(state.params, batch))
            old = bases_in_use(state.opt_state)
            jax.block_until_ready([basis for _, basis in old.values()])  # none in the timing
            if last and not refresh:  # the basis of this period, about to be replaced
                at_end.append((step, mean_captured(old, grads)))
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
        if measure and refresh:
            new = bases_in_use(state.opt_state)
            at_refresh.append((step, mean_captured(new, grads)))
            if step > 0:
                overlaps.append((step, mean_overlap(old, new)))
    is_refresh = np.arange(STEPS) % REFRESH == 0
    timed = np.arange(STEPS) > 0
    results[name] = {
        "loss": losses,
        "eval_after": eval_loss(state.params),
        "seconds": seconds,
        "first_step_s": seconds[0],
        "step_s": float(np.median(np.asarray(seconds)[timed & ~is_refresh])),
        "refresh_step_s": float(np.mean(np.asarray(seconds)[timed & is_refresh])),
        "opt_state_bytes": train.tree_bytes(state.opt_state),
    }
    if measure:
        results[name] |= {"overlap": overlaps, "captured_at_refresh": at_refresh,
                          "captured_at_end": at_end}  # fmt: skip
    r = results[name]
    print(f"{name:22s} eval {r['eval_after']:.4f}  step {r['step_s']:.2f} s  refresh "
          f"step {r['refresh_step_s']:.2f} s  (first {r['first_step_s']:.1f} s)")  # fmt: skip

# %% [markdown]
# ## 1 · How far the subspace moves, and how much of the gradient it holds
#
# The dashed line is `r/d` averaged over the matrices, what a subspace unrelated to the
# gradient holds on average.

# %%
chance = np.mean([p.rank / basis.shape[0] for p, basis in bases_in_use(state.opt_state).values()])
fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
for name in BASES:
    r = results[name]
    if r["overlap"]:
        left.plot(*zip(*r["overlap"]), "o-", label=name)
    points = sorted(r["captured_at_refresh"] + r["captured_at_end"])
    line = middle.plot(*zip(*points), "-", label=name)[0]
    middle.plot(*zip(*r["captured_at_refresh"]), "o", color=line.get_color())
    if r["captured_at_end"]:
        middle.plot(*zip(*r["captured_at_end"]), "x", color=line.get_color())
    right.plot(r["loss"], label=name)
for ax in (left, middle):
    ax.axhline(chance, ls="--", color="gray", lw=1)
    ax.set_yscale("log")
left.set(
    xlabel="refresh step", ylabel="‖Q_oldᵀ Q_new‖² / r", title="overlap with the previous basis"
)
middle.set(xlabel="step", ylabel="‖Qᵀ G‖² / ‖G‖²",
           title="gradient energy captured (o: at refresh, x: end of period)")  # fmt: skip
right.set(xlabel="step", ylabel="train loss", title=f"rank {RANK}, refresh every {REFRESH}")
for ax in (middle, right):
    for step in range(REFRESH, STEPS, REFRESH):
        ax.axvline(step, color="gray", lw=0.5, alpha=0.5)
for ax in (left, middle, right):
    ax.legend()
save_figure(fig, "05_subspaces_overlap")

# %% [markdown]
# ## 2 · What a refresh costs
#
# The median time of a step that does not refresh against the mean time of the steps
# that do (step 0 excluded). The exact SVD factors every targeted matrix in full; the
# randomized SVD multiplies it by a few skinny blocks; a random basis is regenerated at
# every step from its key, so its cost is in every step and a refresh only changes the
# key.

# %%
cost = {name: {"step_s": results[name]["step_s"],
               "refresh_step_s": results[name]["refresh_step_s"],
               "refresh_extra_s": results[name]["refresh_step_s"] - results[name]["step_s"]}
        for name in RUNS}  # fmt: skip
fig, ax = plt.subplots(figsize=(6, 4))
x = np.arange(len(BASES))
for shift, key, label in ((-0.2, "step_s", "step without refresh"),
                          (0.2, "refresh_step_s", "step with refresh")):  # fmt: skip
    bars = ax.bar(x + shift, [cost[n][key] for n in BASES], 0.4, label=label)
    ax.bar_label(bars, fmt="%.2f")
ax.set_xticks(x, BASES)
ax.set(ylabel="seconds", title=f"training step time, {BATCH} × {SEQ} tokens, rank {RANK}")
ax.legend()
save_figure(fig, "05_subspaces_refresh_cost")
for name, c in cost.items():
    print(f"{name:22s} step {c['step_s']:.3f} s  with refresh {c['refresh_step_s']:.3f} s  "
          f"refresh costs {c['refresh_extra_s']:+.3f} s")  # fmt: skip

# %% [markdown]
# ## 3 · `on_refresh`: keep, rotate or reset the moments
#
# Randomized-SVD bases, the three policies, the same batches: the right panel subtracts
# the `"rotate"` run's loss step by step, which removes the batch-to-batch noise.

# %%
policies = {"keep": "randomized_svd, keep", "rotate": "randomized_svd",
            "reset": "randomized_svd, reset"}  # fmt: skip
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
reference = np.asarray(results["randomized_svd"]["loss"])
for policy, name in policies.items():
    loss = np.asarray(results[name]["loss"])
    left.plot(loss, label=policy)
    right.plot(loss - reference, label=policy)
for ax in (left, right):
    for step in range(REFRESH, STEPS, REFRESH):
        ax.axvline(step, color="gray", lw=0.5, alpha=0.5)
    ax.legend()
left.set(xlabel="step", ylabel="train loss", title="randomized SVD, on_refresh")
right.set(xlabel="step", ylabel="train loss − rotate's", title="difference to on_refresh='rotate'")
save_figure(fig, "05_subspaces_on_refresh")
for policy, name in policies.items():
    print(f"on_refresh={policy!r:9s} eval loss after {results[name]['eval_after']:.4f}")

# %% [markdown]
# ## 4 · Optimizer-state memory
#
# The bytes of `tx.init(params)` (`train.tree_bytes`, from `jax.eval_shape`: nothing is
# allocated) for full AdamW, the three projected optimizers trained above and
# `lorajax.lora` (two-sided, random orthonormal bases) at the same rank. Stored bases
# (`"svd"`, `"randomized_svd"`) are counted apart from the moments.

# %%
optimizers = {
    "full AdamW": train.make_optimizer(
        "full", learning_rate=train.default_learning_rate("full", d)
    ),
    "galore (svd)": projected("svd"),
    "randomized_svd": projected("randomized_svd"),
    "flora (random)": projected("random"),
    "lorajax.lora": train.make_optimizer("lora", learning_rate=LR, rank=RANK),
}
memory = {}
for name, tx in optimizers.items():
    shapes = jax.eval_shape(tx.init, params0)
    is_state = lambda x: isinstance(x, lorajax.LowRankState)  # noqa: E731
    states = [x for x in jax.tree.leaves(shapes, is_leaf=is_state) if is_state(x)]
    total = train.tree_bytes(shapes)
    stored = sum(train.tree_bytes(s.projectors) for s in states)
    memory[name] = {"total_bytes": total, "bases_bytes": stored, "moments_bytes": total - stored}
assert memory["randomized_svd"]["total_bytes"] == results["randomized_svd"]["opt_state_bytes"]
param_bytes = train.tree_bytes(params0)

fig, ax = plt.subplots(figsize=(7, 4))
names = list(memory)
moments = np.array([memory[n]["moments_bytes"] for n in names]) / 2**20
stored = np.array([memory[n]["bases_bytes"] for n in names]) / 2**20
ax.bar(names, moments, label="moments (and counters, keys)")
bars = ax.bar(names, stored, bottom=moments, label="stored bases")
ax.bar_label(bars, labels=[f"{v:.2f}" for v in moments + stored])
ax.set_yscale("log")
ax.set_ylim((moments + stored).min() / 3, (moments + stored).max() * 3)
ax.set(
    ylabel="MiB (log scale)",
    title=f"optimizer state, rank {RANK}; params {param_bytes / 2**20:.1f} MiB",
)
ax.tick_params(axis="x", rotation=20)
ax.legend()
save_figure(fig, "05_subspaces_memory")
for name, m in memory.items():
    mib, bases_mib = m["total_bytes"] / 2**20, m["bases_bytes"] / 2**20
    print(f"{name:16s} {mib:9.2f} MiB  (bases {bases_mib:.2f} MiB)  "
          f"{m['total_bytes'] / param_bytes:.4f} × params")  # fmt: skip

# %%
table = {
    "steps": STEPS,
    "rank": RANK,
    "refresh_every": REFRESH,
    "seq_len": SEQ,
    "batch": BATCH,
    "learning_rate": LR,
    "eval_loss_before": eval_before,
    "chance_overlap": float(chance),
    "runs": {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in results.items()},
    "refresh_cost_s": cost,
    "memory_bytes": memory,
    "param_bytes": param_bytes,
}
save_table(table, "05_subspaces")

# %% [markdown]
# ## What the full run measured
#
# SmolLM2-135M, 30 steps of 4 × 64 tokens, rank 8, bases refreshed every 10 steps, one
# seed (numbers in `results/05_subspaces.json`):
#
# | basis | overlap with previous | `‖Qᵀ G‖²/‖G‖²`: fresh → stale | eval after | refresh | state |
# |---|---|---|---:|---:|---:|
# | `"svd"` (GaLore) | 0.246, 0.271 | 0.79–0.81 → 0.44–0.47 | 3.026 | +12.1 s | 12.3 MiB |
# | `"randomized_svd"` | 0.247, 0.271 | 0.79–0.81 → 0.44–0.47 | 3.023 | +0.65 s | 12.3 MiB |
# | `"random"` (Flora) | 0.010, 0.010 | 0.010 → 0.010 | 3.096 | none | 6.0 MiB |
#
# "Fresh" is at the refresh step, "stale" at the last step of the period. The eval loss
# before training is 3.591, the chance level `r/d` is 0.010, and a step without a
# refresh takes 1.8 s. Full AdamW's state is 1026 MiB and `lorajax.lora`'s 18.6 MiB.
#
# - **Randomized SVD finds the exact SVD's subspace.** Its bases hold the same share of
#   the gradient as the exact ones to three digits, move the same way, and train to the
#   same loss, for a refresh that costs 0.65 s instead of 12.1 s (19× less) on 2 cores:
#   the exact SVD factors all 210 matrices in full. A random basis costs nothing to
#   refresh (it is regenerated from the key at every step) and needs no memory.
# - **The gradient's top subspace is informative but short-lived here.** Eight singular
#   directions hold 80% of `‖G‖²` when computed, 100× chance; the next period's basis
#   shares only a quarter of the span (overlap 0.25–0.27), and by the end of a period
#   the stale basis holds 44–47%. With batches of 4 sequences, the gradient's top
#   directions change from step to step; larger batches and longer runs would average
#   that noise out.
# - **Random bases** hold `r/d` of the gradient, as they must, and after 30 steps trail
#   the SVD bases by 0.07 nats (3.096 against 3.023–3.026).
# - **`on_refresh`**: keep 2.998, reset 3.017, rotate 3.023. The spread (0.025) is within
#   what one seed and 30 steps resolve, and rotating the moments into the new basis
#   (Flora's rule, the default) shows no gain here. With only a quarter of the span
#   shared between consecutive bases, little of the old moments carries over under
#   any policy.
# - **Memory**: the stored bases are half of GaLore's and randomized SVD's state at
#   rank 8 (6.3 of 12.3 MiB); Flora's random bases store none, and `lorajax.lora`'s
#   two-sided state (18.6 MiB) is LoRA's Adam memory. All are 55–170× less than full
#   AdamW's.

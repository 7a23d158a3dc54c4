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
# # 04 · LoRA learns less and forgets less
#
# Biderman et al., "LoRA Learns Less and Forgets Less" (arXiv:2405.09673), fine-tune on
# one domain and measure both how well the model learns it and how much it loses on the
# domains it knew. Their findings:
#
# 1. full fine-tuning learns the target domain faster and further than LoRA;
# 2. LoRA forgets less of the source domain; the paper reads the two as a trade-off
#    between learning and forgetting, and compares methods along it;
# 3. full fine-tuning's weight change `ΔW` is far from low rank: the rank needed to hold
#    90% of its spectral energy is 10–100× the ranks LoRA uses.
#
# Here the target domain is the embedded corpus, the Python documentation's prose, and
# the held-out source domain is Python *code*: the source of a fixed list of
# standard-library modules, which SmolLM2-135M saw in pretraining and models well. Both
# come with every Python installation, so the experiment runs anywhere without a
# download. Each method trains on the same batches at its LoRA Without Regret default
# rate, and both losses are measured along the way.
#
# Quick mode (`LORAJAX_QUICK=1`) runs a tiny random Llama for a few steps, to check the
# code; only the full mode measures anything.

# %%
import importlib
from pathlib import Path

import jax
import matplotlib
import numpy as np
from common import QUICK, load_model, save_figure, save_table, training_data

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import lorajax
from lorajax import data, train

model, tokenizer = load_model()  # SmolLM2-135M-Instruct; a tiny random Llama if QUICK
config = model.config
if QUICK:
    STEPS, SEQ, BATCH, EVAL_BATCHES, MEASURE_EVERY = 4, 32, 4, 1, 2
    RANKS = (2, 8)
else:
    STEPS, SEQ, BATCH, EVAL_BATCHES, MEASURE_EVERY = 40, 64, 4, 4, 10
    RANKS = (4, 16, 64)

# The held-out domain: Python source code of standard-library modules.
MODULES = ("argparse", "bisect", "calendar", "csv", "difflib", "fractions", "functools",
           "heapq", "json.decoder", "json.encoder", "shlex", "statistics", "string",
           "textwrap")  # fmt: skip
code = [Path(importlib.import_module(name).__file__).read_text() for name in MODULES]
code_set, _ = data.make_datasets(code, tokenizer, seq_len=SEQ, seed=0)
forget_batches = [
    b for _, b in zip(range(EVAL_BATCHES), data.BatchIterator(code_set, BATCH, seed=1))
]

train_set, batches, learn_batches = training_data(
    tokenizer, seq_len=SEQ, batch_size=BATCH, steps=STEPS, eval_batches=EVAL_BATCHES
)
print(f"target: {len(train_set)} sequences of {SEQ} tokens; {STEPS} steps of {BATCH}")
print(f"held-out code: {len(code_set)} sequences, {len(forget_batches)} eval batches")

# %% [markdown]
# ## Training, measuring both domains
#
# Every `MEASURE_EVERY` steps, `learned` is the eval loss on held-out documentation
# (lower: learned more) and `forgot` is the loss on the standard-library code (higher:
# forgot more). LoRA adapters have `alpha = 32`; `lorajax.lora` is the adapter-free
# two-sided projection at the middle rank.

# %%
d = config.hidden_size
middle = RANKS[len(RANKS) // 2]
methods = {"full AdamW": dict(method="full")}
methods.update({f"LoRA r={r}": dict(method="adapters", rank=r) for r in RANKS})
methods[f"lorajax.lora r={middle}"] = dict(method="lora", rank=middle)

curves, final_params = {}, {}
for name, options in methods.items():
    method = options["method"]
    lr = train.default_learning_rate(method, d)
    tx = train.make_optimizer(learning_rate=lr, **options)
    adapters = base = None
    if method == "adapters":
        rank = options["rank"]
        adapters, base = train.init_adapters(jax.random.key(0), model, rank=rank, alpha=32)
    trainer = train.Trainer(model, tx, adapters=adapters, params=base)
    state = trainer.init()
    points = []
    for step, batch in enumerate([*batches, None]):
        if step % MEASURE_EVERY == 0 or batch is None:
            learned = trainer.evaluate(state, learn_batches)
            forgot = trainer.evaluate(state, forget_batches)
            points.append((step, learned, forgot))
        if batch is not None:
            state, _ = trainer.step(state, batch)
    curves[name] = points
    if method == "full":
        initial, final_params["full AdamW"] = trainer.params, state.params
    _, learned, forgot = points[-1]
    print(f"{name:18s} lr {lr:.2e}  learned {learned:.4f}  forgot {forgot:.4f}")

# %% [markdown]
# ## The spectrum of full fine-tuning's update
#
# For every matrix that LoRA adapts (all linear layers; the stacked layers are read as a
# batch of matrices), take the singular values `σ` of `ΔW = W_after − W_before` and the
# smallest rank `k` with `Σ_{i≤k} σ_i² ≥ 0.9 Σ σ_i²`.

# %%
layouts = lorajax.resolve_targets(initial, "all-linear")
after = final_params["full AdamW"]
deltas = jax.tree.map(lambda a, b: a - b, after, initial)
flat_layouts = jax.tree.leaves(layouts, is_leaf=lambda x: x is None)
spectra, by_module, ranks90, max_ranks = {}, {}, [], []
for (path, delta), layout in zip(jax.tree_util.tree_leaves_with_path(deltas), flat_layouts):
    if layout is None:
        continue
    delta = layout.to_matrix(delta)
    delta = np.asarray(delta, np.float64).reshape(-1, *delta.shape[-2:])
    sigma = np.linalg.svd(delta, compute_uv=False)
    energy = np.cumsum(sigma**2, axis=-1) / np.sum(sigma**2, axis=-1, keepdims=True)
    name = jax.tree_util.keystr(path[-2:], simple=True, separator="/")
    spectra.setdefault(name, []).extend(energy)
    rank = (np.argmax(energy >= 0.9, axis=-1) + 1).tolist()
    by_module.setdefault(name, []).extend(rank)
    ranks90.extend(rank)
    max_ranks.extend([min(delta.shape[-2:])] * delta.shape[0])
ranks90, max_ranks = np.array(ranks90), np.array(max_ranks)
spectra = {name: np.mean(energies, axis=0) for name, energies in spectra.items()}
print(f"{len(ranks90)} matrices: rank for 90% of ‖ΔW‖² median {np.median(ranks90):.0f}, "
      f"range {ranks90.min()}–{ranks90.max()}, median share of full rank "
      f"{np.median(ranks90 / max_ranks):.2f}")  # fmt: skip

# %% [markdown]
# ## Results

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
for name, points in curves.items():
    _, learned, forgot = zip(*points)
    left.plot(learned, forgot, "o-", label=name, markersize=4)
    left.annotate(str(points[-1][0]), (learned[-1], forgot[-1]), fontsize=7)
left.set(xlabel="documentation eval loss (learned →  lower)",
         ylabel="stdlib code loss (forgot →  higher)",
         title=f"learning vs forgetting, every {MEASURE_EVERY} steps")  # fmt: skip
left.invert_xaxis()
left.legend(fontsize=8)
for name, energy in spectra.items():
    right.plot(np.arange(1, len(energy) + 1), energy, label=name)
for r in RANKS:
    right.axvline(r, color="grey", ls=":", lw=0.8)
right.axhline(0.9, color="k", ls="--", lw=0.8)
right.set(xscale="log", xlabel="rank k", ylabel="share of ‖ΔW‖² in the top k",
          title="full fine-tuning's ΔW (mean over layers; dotted: LoRA ranks)")  # fmt: skip
right.legend(fontsize=7)
save_figure(fig, "04_learns_less_forgets_less")

table = {
    "steps": STEPS,
    "seq_len": SEQ,
    "batch": BATCH,
    "curves": {
        name: [dict(step=s, learned=a, forgot=b) for s, a, b in pts] for name, pts in curves.items()
    },
    "rank90": {
        "matrices": len(ranks90),
        "median": float(np.median(ranks90)),
        "min": int(ranks90.min()),
        "max": int(ranks90.max()),
        "median_share_of_full_rank": float(np.median(ranks90 / max_ranks)),
        "median_by_module": {name: float(np.median(r)) for name, r in by_module.items()},
    },
}
save_table(table, "04_learns_less_forgets_less")
start = curves["full AdamW"][0]
print(f"before: learned {start[1]:.4f}  forgot {start[2]:.4f}")
for name, points in curves.items():
    _, learned, forgot = points[-1]
    print(f"{name:18s} Δlearned {learned - start[1]:+.4f}  Δforgot {forgot - start[2]:+.4f}")

# %% [markdown]
# ## What the full run measured
#
# SmolLM2-135M, 40 steps of 4 × 64 tokens at each method's default rate (full 1.3e-4,
# low-rank 1.3e-3), one seed (numbers in `results/04_learns_less_forgets_less.json`).
# Before training: documentation eval loss 3.591, stdlib code loss 3.112.
#
# | method | documentation loss after 40 steps | code loss at step 10 → 40 | code loss change |
# |---|---:|---|---:|
# | full AdamW | **2.798** | 3.008 → 3.110 | −0.003 |
# | LoRA r=4 | 2.854 | 3.008 → 3.045 | −0.067 |
# | LoRA r=16 | 3.039 (2.873 at step 30) | 3.014 → 3.035 | −0.078 |
# | LoRA r=64 | 2.835 | 3.010 → 3.036 | −0.077 |
# | `lorajax.lora` r=16 | 2.867 | 2.981 → 3.027 | **−0.086** |
#
# - **Learns less.** Full fine-tuning reaches the lowest documentation loss (2.798);
#   LoRA at ranks 4 and 64 and `lorajax.lora` end 0.04–0.07 nats behind. LoRA r=16's
#   last point is a loss spike at its 40th step (2.873 at step 30); with one seed, the
#   order of the LoRA ranks is within that noise.
# - **Forgets less.** The documentation is prose about Python, so the first steps help
#   on code too: every method's code loss falls from 3.112 to about 3.01 by step 10.
#   After that, full fine-tuning gives it all back (3.110 at step 40), while the
#   low-rank methods stay 0.07–0.08 nats lower. At matched documentation loss the
#   low-rank runs also sit lower: LoRA r=64 at step 40 (2.835, 3.036) has learned more
#   and forgotten less than full fine-tuning at step 30 (2.863, 3.091). This agrees in
#   direction with the paper; our forgetting domain is close to the target domain and
#   the runs are short, so the sizes are not comparable to its benchmark numbers.
# - **ΔW is not low rank.** Over the 210 adapted matrices, full fine-tuning's 40-step
#   update needs a median rank of 130 (18–272) to hold 90% of its energy, 39% of the
#   full rank: 33×, 8× and 2× the LoRA ranks 4, 16 and 64, highest in the MLP (median
#   237–258) against 70–123 in attention. The paper reports 10–100× the ranks typical
#   LoRA configurations use; our 40-step update is of that order for ranks 4–16. We
#   measured one training length only, far shorter than the paper's.

"""Training steps of SmolLM2-135M with each fine-tuning method, against full AdamW.

Every method of ``lorajax finetune`` (full AdamW, galore, flora, lora, adapters) trains
the same model on the same batches (seq 256, batch 4 by default). Reported per method:

- step time, as the median over rounds of the ratio to full AdamW's step in the same
  round (steps run round-robin, so the machine's drift cancels);
- tokens per second;
- optimizer state bytes (and the ratio to AdamW's);
- the compiled step's ``memory_analysis()`` (arguments, outputs, temporaries, peak).

Steps run without and with the train state donated. ``--random-init`` builds the model
from the default's config with random weights (step time and memory do not depend on the
values), for machines where the GGUF file is not at hand.

Usage::

    python benchmarks/finetune_step.py --quick     # 2 timed rounds, no donation
    python benchmarks/finetune_step.py             # 6 rounds, both donation settings
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lorajax import models, train

RESULTS = Path(__file__).parent / "results"
SMOLLM2_135M = models.LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def build_model(args):
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.random_init:
        return models.Llama(SMOLLM2_135M, rngs=nnx.Rngs(0), dtype=dtype, scan_layers=True)
    model, _ = models.load(None, dtype=dtype, scan_layers=True)
    return model


def make_trainer(model, method, rank, donate):
    lr = train.default_learning_rate(method, model.config.hidden_size)
    tx = train.make_optimizer(method, learning_rate=lr, rank=rank)
    ad, base = None, None
    if method == "adapters":
        ad, base = train.init_adapters(jax.random.key(0), model, rank=rank)
    return train.Trainer(model, tx, adapters=ad, params=base, donate=donate)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(train.METHODS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    donations = (False,) if args.quick else (False, True)
    if "full" not in args.methods:
        parser.error("--methods must include full, the baseline")

    model = build_model(args)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    batches = [
        rng.integers(0, vocab, size=(args.batch_size, args.seq_len + 1), dtype=np.int32)
        for _ in range(rounds + 1)
    ]
    tokens = args.batch_size * args.seq_len

    runners = {}
    for donate in donations:
        for method in args.methods:
            trainer = make_trainer(model, method, args.rank, donate)
            state = trainer.init()
            t0 = time.perf_counter()
            memory = trainer.memory(state, batches[0])
            compile_s = time.perf_counter() - t0
            state, m = trainer.step(state, batches[0])  # compiles (cached) and refreshes
            jax.block_until_ready(m["loss"])
            runners[(method, donate)] = {
                "trainer": trainer,
                "state": state,
                "times": [],
                "compile_s": compile_s,
                "memory": memory,
                "state_bytes": train.tree_bytes(state.opt_state),
            }
            print(f"compiled {method:9s} donate={donate!s:5s} in {compile_s:.1f}s", flush=True)

    for r in range(rounds):
        for run in runners.values():
            t0 = time.perf_counter()
            run["state"], m = run["trainer"].step(run["state"], batches[r + 1])
            jax.block_until_ready((run["state"], m["loss"]))
            run["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}", flush=True)

    rows = []
    for (method, donate), run in runners.items():
        base = runners[("full", donate)]
        ratios = [t / b for t, b in zip(run["times"], base["times"])]
        step_s = statistics.median(run["times"])
        rows.append(
            {
                "method": method,
                "donate": donate,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "step_ratio_vs_full": statistics.median(ratios),
                "state_bytes": run["state_bytes"],
                "state_ratio_vs_full": run["state_bytes"] / base["state_bytes"],
                "peak_bytes": run["memory"]["peak_bytes"],
                "peak_ratio_vs_full": run["memory"]["peak_bytes"] / base["memory"]["peak_bytes"],
                "memory": run["memory"],
                "compile_s": run["compile_s"],
                "times_s": run["times"],
            }
        )
    result = {
        "benchmark": "finetune_step",
        "model": "SmolLM2-135M (random weights)" if args.random_init else "SmolLM2-135M",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "dtype": args.dtype,
        "rounds": rounds,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    out = (
        Path(args.out)
        if args.out
        else RESULTS
        / (f"finetune_step{'_quick' if args.quick else ''}_{jax.default_backend()}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{'method':9s} {'donate':>6s} {'step':>8s} {'vs full':>8s} {'tok/s':>8s} "
        f"{'state':>10s} {'vs full':>8s} {'peak':>10s}"
    )
    for row in rows:
        print(
            f"{row['method']:9s} {row['donate']!s:>6s} {row['step_s']:7.3f}s "
            f"{row['step_ratio_vs_full']:7.2f}x {row['tokens_per_s']:8.0f} "
            f"{row['state_bytes'] / 2**20:8.1f}MB {row['state_ratio_vs_full']:7.3f}x "
            f"{row['peak_bytes'] / 2**20:8.0f}MB"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

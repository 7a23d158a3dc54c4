"""Compiled peak memory of one training step of a 1B-parameter Llama, per method.

The model has Llama-3.2-1B's shape (vocab 128256, width 2048, MLP 8192, 16 layers, 32
query and 8 key/value heads of width 64, tied embedding; its rope scaling, which does not
change memory, is left out), with scanned and rematerialised layers. Nothing is
allocated: the model comes from ``nnx.eval_shape``, every state from ``jax.eval_shape``
and the batch is a ``jax.ShapeDtypeStruct``; each step is lowered and compiled for the
default backend, and its ``memory_analysis()`` gives the peak as ``Trainer.memory``
counts it (arguments + outputs + temporaries - aliased).

Rows: full AdamW through ``train.Trainer``'s step (the baseline), the Trainer methods
galore, flora, lora and adapters (rank 16), and the LoRA floor of
``finetune_step.py`` (unmerged ``lorajax.nnx`` adapters, gradients of the factors only,
Adam). For reference, the bytes of the full gradient tree (one gradient per parameter,
in the params' dtype) and their ratio to full AdamW's peak.

The Trainer has no public way to lower its step without concrete arrays; this script
lowers ``trainer._step`` on the state that ``jax.eval_shape(trainer._init_fn, ...)``
describes.

Usage::

    python benchmarks/peak_1b.py --tiny             # a 2-layer model: checks the script
    python benchmarks/peak_1b.py --quick            # 1B shape, batch 1 x 128, float32
    python benchmarks/peak_1b.py                    # 1B shape, batch 8 x 2048, f32 and bf16

Each variant takes a minute or two to compile on 2 CPU cores at the 1B shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from finetune_step import (  # the script's own folder is on sys.path
    TINY,
    add_floor_lora,
    floor_optimizer,
    floor_step,
    make_trainer,
    memory_of,
)
from flax import nnx

from lorajax import models, train

RESULTS = Path(__file__).parent / "results"
LLAMA_3_2_1B = models.LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def abstract_llama(cfg: models.LlamaConfig, dtype: Any, param_dtype: Any) -> models.Llama:
    """The model with ``jax.ShapeDtypeStruct`` weights: scanned, rematerialised layers."""
    return nnx.eval_shape(
        lambda: models.Llama(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=True,
            remat=True,
        )
    )


def trainer_step(
    cfg: models.LlamaConfig,
    dtypes: tuple,
    rank: int,
    donate: bool,
    tokens: Any,
    *,
    method: str,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """The compiled Trainer step of a method: memory, state bytes, and the refresh step.

    A Trainer on the projected path with stored bases runs a second program at a basis
    refresh; its memory is measured too (``refresh_memory``).
    """
    trainer = make_trainer(abstract_llama(cfg, *dtypes), method, rank, donate, **trainer_kwargs)
    state = jax.eval_shape(trainer._init_fn, trainer.params, trainer.adapters)
    projected = getattr(trainer, "projected", False)
    out = {
        "memory": memory_of(trainer._step.lower(state, tokens).compile()),
        "state_bytes": train.tree_bytes(state.opt_state),
        "projected": projected,
    }
    if projected and trainer.adapters is None and getattr(trainer, "_stored_bases", False):
        out["refresh_memory"] = memory_of(trainer._step.lower(state, tokens, True).compile())
    return out


def floor_row(
    cfg: models.LlamaConfig, dtypes: tuple, rank: int, donate: bool, tokens: Any
) -> dict[str, Any]:
    """The compiled LoRA floor step: memory and state bytes."""
    model = nnx.eval_shape(lambda: add_floor_lora(abstract_llama(cfg, *dtypes), rank))
    tx = floor_optimizer(cfg.hidden_size)
    jitted, factors, base = floor_step(model, tx, donate)
    opt_state = jax.eval_shape(tx.init, factors)
    compiled = jitted.lower(factors, opt_state, base, tokens).compile()
    return {"memory": memory_of(compiled), "state_bytes": train.tree_bytes(opt_state)}


#: Row name -> ``(cfg, dtypes, rank, donate, tokens) -> {"memory", "state_bytes", ...}``.
#: A Trainer variant is one more line, e.g.
#: ``"galore/full-gradient": partial(trainer_step, method="galore", projected=False)``.
ROWS: dict[str, Callable[..., dict[str, Any]]] = {
    **{method: partial(trainer_step, method=method) for method in train.METHODS},
    "floor": floor_row,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 x 128, float32 only")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (quick: 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (quick: 128)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--param-dtype",
        nargs="+",
        choices=tuple(DTYPES),
        default=None,
        help="params dtypes to measure (default: both; quick: float32)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=tuple(DTYPES),
        default=None,
        help="dtype of the matmuls (default: the params dtype)",
    )
    parser.add_argument("--donate", choices=("on", "off"), default="on")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if "full" not in args.rows:
        parser.error("--rows must include full, the baseline")
    small = args.quick or args.tiny
    batch = args.batch_size or (1 if small else 8)
    seq = args.seq_len or (128 if small else 2048)
    param_dtypes = args.param_dtype or (["float32"] if small else list(DTYPES))
    donate = args.donate == "on"
    cfg = TINY if args.tiny else LLAMA_3_2_1B
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)

    results = []
    for name in param_dtypes:
        param_dtype = DTYPES[name]
        dtype = DTYPES[args.compute_dtype] if args.compute_dtype else param_dtype
        dtypes = (dtype, param_dtype)
        params = nnx.state(abstract_llama(cfg, *dtypes), nnx.Param)
        param_count = sum(x.size for x in jax.tree.leaves(params))
        grad_bytes = train.tree_bytes(params)
        rows = {}
        for row in args.rows:
            t0 = time.perf_counter()
            rows[row] = ROWS[row](cfg, dtypes, args.rank, donate, tokens)
            rows[row]["compile_s"] = time.perf_counter() - t0
            peak = rows[row]["memory"]["peak_bytes"]
            state_bytes = rows[row]["state_bytes"]
            refresh = rows[row].get("refresh_memory")
            at_refresh = (
                "" if refresh is None else f" (refresh {refresh['peak_bytes'] / 2**20:.1f})"
            )
            print(
                f"{name:8s} {row:18s} peak {peak / 2**20:9.1f} MiB{at_refresh}, state "
                f"{state_bytes / 2**20:9.1f} MiB (compiled in {rows[row]['compile_s']:.0f}s)",
                flush=True,
            )
        full_peak = rows["full"]["memory"]["peak_bytes"]
        for row in rows.values():
            row["peak_bytes"] = row["memory"]["peak_bytes"]
            row["peak_ratio_vs_full"] = row["peak_bytes"] / full_peak
            if "refresh_memory" in row:
                row["refresh_peak_bytes"] = row["refresh_memory"]["peak_bytes"]
                row["refresh_peak_ratio_vs_full"] = row["refresh_peak_bytes"] / full_peak
        results.append(
            {
                "param_dtype": name,
                "compute_dtype": jnp.dtype(dtype).name,
                "param_count": param_count,
                "params_bytes": grad_bytes,
                "full_gradient_bytes": grad_bytes,
                "full_gradient_ratio_vs_full_peak": grad_bytes / full_peak,
                "rows": rows,
            }
        )

    report = {
        "benchmark": "peak_1b",
        "model": "tiny Llama" if args.tiny else "Llama-3.2-1B shape",
        "config": dataclasses.asdict(cfg),
        "scan_layers": True,
        "remat": True,
        "batch_size": batch,
        "seq_len": seq,
        "rank": args.rank,
        "donate": donate,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    mode = "_tiny" if args.tiny else "_quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS / f"peak_1b{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\n{'dtype':9s} {'row':18s} {'peak MiB':>10s} {'vs full':>8s} {'state MiB':>10s} "
        f"{'projected':>9s} {'refresh MiB':>12s} {'vs full':>8s}"
    )
    for res in results:
        for row, r in res["rows"].items():
            refresh = ""
            if "refresh_peak_bytes" in r:
                refresh = (
                    f" {r['refresh_peak_bytes'] / 2**20:12.1f} "
                    f"{r['refresh_peak_ratio_vs_full']:7.3f}x"
                )
            print(
                f"{res['param_dtype']:9s} {row:18s} {r['peak_bytes'] / 2**20:10.1f} "
                f"{r['peak_ratio_vs_full']:7.3f}x {r['state_bytes'] / 2**20:10.1f} "
                f"{r.get('projected', '-')!s:>9s}{refresh}"
            )
        print(
            f"{res['param_dtype']:9s} {'gradient':18s} {res['full_gradient_bytes'] / 2**20:10.1f} "
            f"{res['full_gradient_ratio_vs_full_peak']:7.3f}x  (the full gradient tree)"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

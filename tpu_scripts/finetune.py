r"""Multi-host fine-tuning of a Llama-family model with lorajax.

Every host (process) of a run starts this same script with the same arguments. It

1. joins the other processes with ``jax.distributed.initialize`` when the run has more
   than one (see *Processes* below);
2. builds a mesh over the devices of every process (``--mesh``, default ``fsdp=-1``: FSDP
   over all devices) and shards the parameters with :data:`lorajax.sharding.LLAMA_RULES`,
   the adapters and the optimizer state by the layouts derived from them;
3. loads the model (``--model``: a Hugging Face directory or a ``.gguf`` file; default the
   embedded SmolLM2-135M-Instruct) or, with ``--random-init``, draws random weights of the
   same configuration directly in their shards;
4. tokenises the data (``--data`` or the embedded corpus) and reads *its own* rows of each
   global batch (``--batch-size`` is the global batch: process ``i`` of ``n`` reads rows
   ``[i·b/n, (i+1)·b/n)``);
5. trains ``--steps`` steps with :class:`lorajax.train.Trainer`, evaluates every
   ``--eval-every`` steps, checkpoints every ``--save-every`` steps into
   ``--checkpoint-dir`` (a local or shared path, or a bucket URI such as
   ``gs://bucket/run``) and, with ``--resume``, first restores the latest checkpoint and
   the data position onto the current mesh (which may differ from the saved one).

Process 0 logs each step's loss, throughput and MFU, writes ``--metrics`` (JSON lines)
and ``--summary`` (JSON), and prints the summary as its last line.

Processes:
    * ``--coordinator HOST:PORT --num-processes N --process-id I``: these values, always.
    * ``--distributed auto``: ``jax.distributed.initialize()`` with no arguments, which
      finds them itself on Cloud TPU VM pod slices, under SLURM and under Open MPI.
    * ``--distributed off``: one process, never initialised.
    * default: initialise (with no arguments) only when the environment shows a
      multi-process launcher: ``JAX_COORDINATOR_ADDRESS``, SLURM with more than one task,
      Open MPI with more than one rank, or a multi-host TPU slice whose
      ``TPU_WORKER_HOSTNAMES`` lists several hosts. Otherwise one process.

    On CPU, cross-process collectives use gloo, JAX 0.10's default
    (``jax_cpu_collectives_implementation``); nothing needs setting.

Model FLOPs and MFU:
    FLOPs per trained token = ``6·N + 12·L·(H·d_head)·T`` (the PaLM appendix-B count):
    ``N`` is the number of parameters that take part in matrix products (every parameter
    but the input embedding table of an untied model), ``L`` the layers, ``H·d_head`` the
    attention width and ``T`` ``--seq-len``. The same count serves every method (a frozen
    weight still costs its forward and input-gradient products), so MFU compares methods
    on one footing. MFU = tokens/s × FLOPs per token / (devices × peak FLOP/s per device);
    the peak is ``--peak-tflops`` or, by ``device_kind``, the dense bf16 peak of H100/H200
    (989 TFLOP/s; PCIe H100 756), A100 (312), TPU v4 (275), v5e (197), v5p (459) and v6e
    (918). For other devices (e.g. CPU) MFU is left out.

Examples:
    One host, 8 fake CPU devices::

        XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
            python tpu_scripts/finetune.py --mesh fsdp=4,tensor=2 --steps 10

    Two processes on one machine, 4 fake CPU devices each::

        XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
            python tpu_scripts/finetune.py --coordinator localhost:12355 \
            --num-processes 2 --process-id 0 --mesh fsdp=4,tensor=2 &
        # ... and the same with --process-id 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorajax._src import cli_args

#: Dense bf16 peak TFLOP/s per device, by a substring of ``jax.Device.device_kind``
#: (matched in this order, case-insensitively).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)

# The settings a resumed run must share with its checkpoint: they shape the train state
# or decide the data order and the updates. The mesh is not one of them.
_RESUME_KEYS = (
    "model",
    "random_init",
    "method",
    "rank",
    "alpha",
    "lr",
    "weight_decay",
    "refresh_every",
    "dtype",
    "scan_layers",
    "seed",
    "batch_size",
    "seq_len",
    "eval_fraction",
)


class UsageError(Exception):
    """A bad argument or input, found before any work started."""


# -- arguments ------------------------------------------------------------------------


def _device_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated device ids such as '0' or '0,1', got {text!r}"
        ) from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"device ids are >= 0, got {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tpu_scripts/finetune.py``."""
    from lorajax.train import METHODS

    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Multi-host fine-tuning with lorajax (run the same command on every host).",
    )
    dist = parser.add_argument_group("processes")
    dist.add_argument(
        "--distributed",
        choices=("auto", "off"),
        default=None,
        help="'auto': jax.distributed.initialize() with no arguments (TPU VM pods, SLURM, "
        "Open MPI); 'off': one process. Default: initialise when --coordinator is given or "
        "the environment shows a multi-process launcher",
    )
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT")
    dist.add_argument("--num-processes", type=cli_args.positive_int, default=None, metavar="N")
    dist.add_argument("--process-id", type=cli_args.non_negative_int, default=None, metavar="I")
    dist.add_argument(
        "--local-device-ids",
        type=_device_ids,
        default=None,
        metavar="IDS",
        help="the accelerators this process uses, e.g. '3' for one process per GPU",
    )

    mesh = parser.add_argument_group("mesh")
    mesh.add_argument(
        "--mesh",
        default="fsdp=-1",
        help="axis sizes over data, fsdp and tensor, e.g. 'data=2,fsdp=4'; one size may be "
        "-1 (the remaining devices). Default: fsdp=-1",
    )
    mesh.add_argument("--axis-types", choices=("explicit", "auto"), default="explicit")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help="a Hugging Face directory (config.json + *.safetensors + tokenizer.json) or a "
        ".gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    model.add_argument(
        "--random-init",
        action="store_true",
        help="random weights of --model's configuration, drawn in their shards (for "
        "benchmarks; an HF directory then needs only config.json and tokenizer.json)",
    )
    model.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (parameters and optimizer state stay float32)",
    )
    model.add_argument(
        "--no-scan-layers",
        dest="scan_layers",
        action="store_false",
        help="one module per layer instead of a scanned stack",
    )
    model.add_argument("--remat", action="store_true", help="gradient checkpointing")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files or directories (default: the embedded Python documentation text)",
    )
    data.add_argument("--seq-len", type=cli_args.positive_int, default=128, help="default: 128")
    data.add_argument(
        "--batch-size",
        type=cli_args.positive_int,
        default=None,
        help="the global batch in sequences, divisible by the data x fsdp devices and the "
        "process count (default: 4 per data x fsdp device)",
    )
    data.add_argument(
        "--eval-fraction", type=cli_args.fraction, default=0.1, help="held-out share (default: 0.1)"
    )
    data.add_argument("--seed", type=cli_args.non_negative_int, default=0, help="default: 0")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--method", choices=METHODS, default="lora", help="default: lora")
    opt.add_argument("--rank", type=cli_args.positive_int, default=16, help="default: 16")
    opt.add_argument(
        "--alpha", type=cli_args.positive_float, default=32.0, help="adapters' alpha (default: 32)"
    )
    opt.add_argument(
        "--lr",
        type=cli_args.positive_float,
        default=None,
        help="learning rate (default: lorajax.train.default_learning_rate(method, d_model))",
    )
    opt.add_argument("--weight-decay", type=float, default=0.0, help="default: 0")
    opt.add_argument("--refresh-every", type=cli_args.positive_int, default=None)
    opt.add_argument("--steps", type=cli_args.positive_int, default=40, help="default: 40")
    opt.add_argument(
        "--no-donate",
        dest="donate",
        action="store_false",
        help="keep the old state alive during a step (default: donate it, update in place)",
    )

    ev = parser.add_argument_group("evaluation and logging")
    ev.add_argument(
        "--eval-every",
        type=cli_args.non_negative_int,
        default=0,
        help="evaluate every N steps (0: only before and after training)",
    )
    ev.add_argument(
        "--eval-batches",
        type=cli_args.non_negative_int,
        default=4,
        help="batches per evaluation, of --batch-size rows or fewer if the held-out data is "
        "small (0: no evaluation). Default: 4",
    )
    ev.add_argument(
        "--metrics", default=None, metavar="PATH", help="JSON lines, one per step (process 0)"
    )
    ev.add_argument("--summary", default=None, metavar="PATH", help="final JSON (process 0)")
    ev.add_argument(
        "--warmup-steps",
        type=cli_args.non_negative_int,
        default=2,
        help="first steps left out of the median tokens/s (compilation). Default: 2",
    )
    ev.add_argument(
        "--peak-tflops",
        type=cli_args.positive_float,
        default=None,
        help="peak TFLOP/s per device for MFU (default: by device kind; none for CPU)",
    )
    ev.add_argument("--quiet", action="store_true", help="no per-step lines")

    ck = parser.add_argument_group("checkpoints")
    ck.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="PATH",
        help="a path every process reaches (shared disk or a bucket URI, gs://bucket/run)",
    )
    ck.add_argument(
        "--save-every",
        type=cli_args.positive_int,
        default=None,
        metavar="N",
        help="checkpoint every N steps (needs --checkpoint-dir; the last step is always "
        "saved there)",
    )
    ck.add_argument(
        "--resume",
        action="store_true",
        help="restore the latest checkpoint of --checkpoint-dir, then train up to --steps",
    )
    ck.add_argument("--max-to-keep", type=cli_args.positive_int, default=3, help="default: 3")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Checks what can be checked before JAX starts.

    Raises:
        UsageError: naming the argument, its value and the fix.
    """
    from lorajax.sharding import parse_mesh

    try:
        args.mesh_shape = parse_mesh(args.mesh)
    except ValueError as err:
        raise UsageError(f"--mesh {args.mesh!r}: {err}") from None
    explicit = {
        "--coordinator": args.coordinator,
        "--num-processes": args.num_processes,
        "--process-id": args.process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) != len(explicit):
        missing = [name for name in explicit if name not in given]
        raise UsageError(
            f"{', '.join(given)} given without {', '.join(missing)}: pass all three of "
            "--coordinator HOST:PORT --num-processes N --process-id I, or none of them."
        )
    if given:
        if args.distributed == "off":
            raise UsageError("--distributed off contradicts --coordinator; drop one of them.")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(
                f"--coordinator {args.coordinator!r} must be HOST:PORT, e.g. 10.0.0.2:12355."
            )
        if args.process_id >= args.num_processes:
            raise UsageError(
                f"--process-id {args.process_id} must be below --num-processes "
                f"{args.num_processes} (ids run from 0)."
            )
    if (args.save_every or args.resume) and not args.checkpoint_dir:
        flag = "--resume" if args.resume else "--save-every"
        raise UsageError(f"{flag} needs --checkpoint-dir PATH (or gs://bucket/run).")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(
            f"--model {args.model!r} does not exist; pass a Hugging Face directory, a .gguf "
            "file, or leave it out for the embedded SmolLM2-135M."
        )
    model_dir = args.model is not None and Path(args.model).is_dir()
    if args.random_init and model_dir and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--random-init: --model {args.model!r} has no config.json.")
    for path in args.data or ():
        if not Path(path).exists():
            raise UsageError(f"--data {path!r} does not exist; pass text files or directories.")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay {args.weight_decay} must be >= 0.")
    if args.refresh_every and args.method in ("full", "adapters"):
        raise UsageError(
            f"--refresh-every applies to the projected methods (galore, flora, lora), not "
            f"--method {args.method}; drop it."
        )


# -- processes ------------------------------------------------------------------------


def _launcher_in_environment() -> str | None:
    """The multi-process launcher the environment shows, if any."""
    env = os.environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and max(count("SLURM_NTASKS"), count("SLURM_NPROCS")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "TPU_WORKER_HOSTNAMES"
    return None


def init_distributed(args: argparse.Namespace) -> str:
    """Calls ``jax.distributed.initialize`` as the arguments and environment say.

    Returns:
        How the processes were set up, for the log.
    """
    import jax

    kwargs: dict[str, Any] = {}
    if args.local_device_ids is not None:
        kwargs["local_device_ids"] = args.local_device_ids
    if args.coordinator is not None:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id, **kwargs)
        return f"--coordinator {args.coordinator}"
    if args.distributed == "off":
        return "one process (--distributed off)"
    launcher = "--distributed auto" if args.distributed == "auto" else _launcher_in_environment()
    if launcher is None:
        return "one process"
    jax.distributed.initialize(**kwargs)
    return launcher


# -- model ----------------------------------------------------------------------------


@contextlib.contextmanager
def _on_host():
    """Creates arrays in host memory (when a CPU backend is there), not on device 0."""
    import jax

    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        yield
        return
    with jax.default_device(cpu):
        yield


def _config_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    """For --random-init: the model's configuration and tokenizer, without its weights."""
    from lorajax import models

    if args.model is not None and Path(args.model).is_dir():
        directory = Path(args.model)
        config = models.LlamaConfig.from_hf(
            json.loads((directory / "config.json").read_text()),
            source=str(directory / "config.json"),
        )
        if not (directory / "tokenizer.json").is_file():
            raise UsageError(f"--model {args.model!r} has no tokenizer.json; add one.")
        if config.eos_token_id is None:
            raise UsageError(
                f"--random-init: {args.model!r}/config.json has no eos_token_id; add it."
            )
        return config, models.Tokenizer.from_file(directory, eos_id=config.eos_token_id)
    model, tokenizer = models.load(args.model)
    return model.config, tokenizer


def load_model(args: argparse.Namespace, mesh: Any) -> tuple[Any, Any]:
    """The model (weights in host memory, or already in their shards) and its tokenizer."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lorajax import models, sharding

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    kwargs = {"dtype": dtype, "scan_layers": args.scan_layers, "remat": args.remat}
    if not args.random_init:
        with _on_host():
            model, tokenizer = models.load(args.model, **kwargs)
        if tokenizer is None:
            raise UsageError(f"--model {args.model!r} has no tokenizer.json; add one.")
        return model, tokenizer

    with _on_host():
        config, tokenizer = _config_and_tokenizer(args)

    def build() -> Any:
        return models.Llama(config, rngs=nnx.Rngs(args.seed), **kwargs)

    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise UsageError("--random-init supports models whose only state is nnx.Param.")
    specs = sharding.param_specs(nnx.to_pure_dict(params), sharding.LLAMA_RULES, mesh=mesh)
    shardings = sharding.to_shardings(specs, mesh)
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(), nnx.Param)), out_shardings=shardings)
    with jax.set_mesh(mesh):
        values = init()
    nnx.replace_by_pure_dict(params, values)
    return nnx.merge(graphdef, params, rest), tokenizer


def matmul_params(model: Any) -> int:
    """Parameters that take part in matrix products: all but an untied input embedding."""
    import jax
    from flax import nnx

    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    config = model.config
    if not config.tie_word_embeddings:
        total -= config.vocab_size * config.hidden_size
    return total


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: ``6·N + 12·L·(H·d_head)·T`` (see the module docstring)."""
    config = model.config
    width = config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params(model) + 12.0 * config.num_hidden_layers * width * seq_len


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: ``override_tflops`` or the table; ``None`` if unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in kind:
            return tflops * 1e12
    return None


# -- the run --------------------------------------------------------------------------


def run_config(args: argparse.Namespace, learning_rate: float) -> dict[str, Any]:
    """The settings stored with every checkpoint and compared on ``--resume``."""
    config = {key: getattr(args, key) for key in _RESUME_KEYS}
    config["lr"] = learning_rate
    config["targets"] = "all-linear"
    return config


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the mesh, model, data, trainer and checkpointer; checks them; trains nothing."""
    import jax
    import numpy as np

    from lorajax import data, sharding, train
    from lorajax.checkpoint import Checkpointer, CheckpointError

    try:
        mesh = sharding.make_mesh(args.mesh_shape, axis_types=args.axis_types)
    except ValueError as err:
        raise UsageError(
            f"--mesh {args.mesh!r} does not fit the {jax.device_count()} devices of "
            f"{jax.process_count()} process(es): {err}"
        ) from None
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    processes = jax.process_count()
    if args.batch_size is None:
        args.batch_size = 4 * shards
    step = math.lcm(shards, processes)
    if args.batch_size % step:
        raise UsageError(
            f"--batch-size {args.batch_size} must be divisible by the {shards} data x fsdp "
            f"devices of --mesh {args.mesh!r} and by the {processes} processes; use a "
            f"multiple of {step}, e.g. {step * max(1, round(args.batch_size / step))}."
        )

    model, tokenizer = load_model(args, mesh)
    config = model.config
    if args.seq_len + 1 > config.max_position_embeddings:
        raise UsageError(
            f"--seq-len {args.seq_len} is longer than the model supports "
            f"(max_position_embeddings={config.max_position_embeddings}; a row holds seq_len + "
            f"1 tokens). Use --seq-len {config.max_position_embeddings - 1} or less."
        )
    texts = data.default_corpus() if args.data is None else data.read_texts(args.data)
    train_set, eval_set = data.make_datasets(
        texts, tokenizer, seq_len=args.seq_len, eval_fraction=args.eval_fraction, seed=args.seed
    )
    if len(train_set) < args.batch_size:
        raise UsageError(
            f"The training data holds {len(train_set)} sequences of {args.seq_len + 1} tokens, "
            f"fewer than --batch-size {args.batch_size}: give more --data, or lower "
            "--batch-size or --seq-len."
        )
    eval_sets: list[np.ndarray] = []
    if args.eval_batches:
        # Evaluation batches of --batch-size rows, or fewer when the held-out data is small
        # (still a multiple of the data x fsdp devices and of the processes).
        eval_size = min(args.batch_size, len(eval_set) // step * step)
        if eval_size == 0:
            raise UsageError(
                f"The held-out data holds {len(eval_set)} sequences, fewer than the {step} "
                "an evaluation batch needs (one per data x fsdp device and process): raise "
                "--eval-fraction, give more --data, or pass --eval-batches 0."
            )
        rows = args.eval_batches * eval_size
        eval_sets = data.eval_batches(
            data.PackedDataset(eval_set.tokens[:rows]),
            eval_size,
            shard_index=jax.process_index(),
            num_shards=processes,
        )

    lr = args.lr or train.default_learning_rate(args.method, config.hidden_size)
    tx = train.make_optimizer(
        args.method,
        learning_rate=lr,
        rank=args.rank,
        weight_decay=args.weight_decay,
        refresh_every=args.refresh_every,
        seed=args.seed,
    )
    adapters, base = None, None
    if args.method == "adapters":
        with _on_host():
            adapters, base = train.init_adapters(
                jax.random.key(args.seed), model, rank=args.rank, alpha=args.alpha
            )
    try:
        trainer = train.Trainer(
            model,
            tx,
            adapters=adapters,
            params=base,
            mesh=mesh,
            rules=sharding.LLAMA_RULES,
            donate=args.donate,
        )
    except ValueError as err:
        raise UsageError(f"--mesh {args.mesh!r} does not fit the model: {err}") from None

    ckpt, resume_step = None, None
    if args.checkpoint_dir:
        try:
            ckpt = Checkpointer(
                args.checkpoint_dir, max_to_keep=args.max_to_keep, config=run_config(args, lr)
            )
            ckpt.latest_step()  # reaches the storage now, not after the first steps
        except ImportError as err:
            raise UsageError(
                f"--checkpoint-dir {args.checkpoint_dir!r} needs a file-system package that is "
                f"not installed ({err}); for gs:// run `pip install gcsfs`."
            ) from None
        if args.resume:
            resume_step = ckpt.latest_step()
            if resume_step is None:
                raise UsageError(
                    f"--resume: no checkpoint in {args.checkpoint_dir!r}; run without --resume "
                    "(with --save-every N) to start the run."
                )
            try:
                saved = ckpt.metadata(resume_step)["config"]
            except CheckpointError as err:
                raise UsageError(str(err)) from None
            diffs = cli_args.changed_settings(saved, run_config(args, lr))
            if diffs:
                raise UsageError(
                    f"--resume: the checkpoint of step {resume_step} in "
                    f"{args.checkpoint_dir!r} was saved with other settings "
                    f"({'; '.join(diffs)}). Pass the saved values, or use another "
                    "--checkpoint-dir."
                )
            if resume_step >= args.steps:
                raise UsageError(
                    f"--resume: the checkpoint is at step {resume_step}, already --steps "
                    f"{args.steps}; pass a larger --steps to train further."
                )
        elif ckpt.latest_step() is not None:
            raise UsageError(
                f"--checkpoint-dir {args.checkpoint_dir!r} already holds checkpoints (up to "
                f"step {ckpt.latest_step()}); pass --resume to continue, or another directory."
            )
        elif processes > 1 and "://" not in args.checkpoint_dir:
            _log(
                f"note: --checkpoint-dir {args.checkpoint_dir!r} is a local path; with "
                f"{processes} processes on several hosts it must be a disk they all share "
                "(or use a bucket, gs://...)."
            )
    batches = data.BatchIterator(
        train_set,
        args.batch_size,
        seed=args.seed,
        shard_index=jax.process_index(),
        num_shards=processes,
    )
    return {
        "mesh": mesh,
        "model": model,
        "trainer": trainer,
        "train_set": train_set,
        "batches": batches,
        "eval_batches": eval_sets,
        "learning_rate": lr,
        "checkpointer": ckpt,
        "resume_step": resume_step,
    }


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _log(message: str) -> None:
    if _is_main():
        print(message, flush=True)


def _open_metrics(path: Path, first: int) -> Any:
    """Opens the metrics file for appending, keeping only rows up to step ``first``.

    Rows of steps after the checkpoint a run resumes from (lost by an interruption) are
    dropped; a fresh run (``first == 0``) starts an empty file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if first and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and json.loads(line).get("step", 0) <= first:
                rows.append(line + "\n")
    path.write_text("".join(rows))
    return open(path, "a")


def train(args: argparse.Namespace, parts: dict[str, Any]) -> dict[str, Any]:
    """The training loop; returns the summary (the same on every process)."""
    import jax

    from lorajax import train as train_lib
    from lorajax.checkpoint import abstract_state

    trainer: train_lib.Trainer = parts["trainer"]
    batches = parts["batches"]
    ckpt = parts["checkpointer"]
    model = parts["model"]
    start = time.perf_counter()
    state = trainer.init()
    if parts["resume_step"] is not None:
        target = abstract_state(state, trainer.shardings)
        del state
        state, position, _ = ckpt.restore(parts["resume_step"], target=target)
        batches.restore(position)
        _log(f"resumed from step {int(state.step)} of {args.checkpoint_dir}")
    first = int(state.step)

    local_rows = args.batch_size // jax.process_count()
    memory = trainer.memory(state, parts["train_set"].tokens[:local_rows])
    tokens_per_step = args.batch_size * args.seq_len
    per_token = flops_per_token(model, args.seq_len)
    devices = jax.devices()
    peak = peak_flops(devices[0].device_kind, args.peak_tflops)

    stack = contextlib.ExitStack()
    metrics = None
    if _is_main() and args.metrics:
        metrics = stack.enter_context(_open_metrics(Path(args.metrics), first))

    def write(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    evals: dict[int, float] = {}

    def evaluate(step: int) -> None:
        if parts["eval_batches"]:
            evals[step] = trainer.evaluate(state, parts["eval_batches"])
            write({"step": step, "eval_loss": evals[step]})
            _log(f"step {step}: eval loss {evals[step]:.4f}")

    history: list[dict[str, float]] = []
    with stack:
        evaluate(first)
        for step in range(first + 1, args.steps + 1):
            batch = next(batches)
            tick = time.perf_counter()
            state, out = trainer.step(state, batch)
            loss = float(out["loss"])  # waits for the step
            seconds = time.perf_counter() - tick
            row = {
                "step": step,
                "loss": loss,
                "grad_norm": float(out["grad_norm"]),
                "seconds": seconds,
                "tokens_per_s": tokens_per_step / seconds,
            }
            if peak is not None:
                row["mfu"] = row["tokens_per_s"] * per_token / (peak * len(devices))
            history.append(row)
            write(row)
            if not args.quiet:
                mfu = f" mfu {100 * row['mfu']:.1f}%" if "mfu" in row else ""
                _log(
                    f"step {step}/{args.steps} loss {loss:.4f} "
                    f"{row['tokens_per_s']:,.0f} tok/s{mfu}"
                )
            if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                evaluate(step)
            every = args.save_every and step % args.save_every == 0
            if ckpt is not None and (every or step == args.steps):
                ckpt.save(step, state, data_state=batches.state())
        if args.steps > first:
            evaluate(args.steps)
        if ckpt is not None:
            ckpt.close()

    steady = history[args.warmup_steps :] or history[1:] or history
    speeds = sorted(r["tokens_per_s"] for r in steady)
    median = (speeds[(len(speeds) - 1) // 2] + speeds[len(speeds) // 2]) / 2 if speeds else None
    trainable = state.adapters if state.adapters is not None else state.params
    summary = {
        "method": args.method,
        "mesh": dict(parts["mesh"].shape),
        "axis_types": args.axis_types,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "processes": jax.process_count(),
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "random_init": args.random_init,
        "model_config": dataclasses.asdict(model.config),
        "dtype": args.dtype,
        "matmul_params": matmul_params(model),
        "flops_per_token": per_token,
        "peak_flops_per_device": peak,
        "learning_rate": parts["learning_rate"],
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step,
        "first_step": first + 1,
        "steps": args.steps,
        "losses": [r["loss"] for r in history],
        "eval_losses": {str(k): v for k, v in evals.items()},
        "tokens_per_s": median,
        "mfu": None
        if median is None or peak is None
        else median * per_token / (peak * len(devices)),
        "optimizer_state_bytes": train_lib.tree_bytes(state.opt_state),
        "trainable_bytes": train_lib.tree_bytes(trainable),
        "memory": memory,
        "wall_s": time.perf_counter() - start,
    }
    if _is_main() and args.summary:
        path = Path(args.summary)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the arguments, joins the processes, checks everything, then trains."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        how = init_distributed(args)
        import jax

        from lorajax.models import ModelFileError

        try:
            parts = setup(args)
        except (ModelFileError, FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from err
    except UsageError as err:
        parser.exit(2, f"finetune.py: error: {err}\n")
    config = parts["model"].config
    _log(
        f"{jax.process_count()} process(es) ({how}), {jax.device_count()} "
        f"{jax.devices()[0].device_kind} devices, mesh {dict(parts['mesh'].shape)} "
        f"({args.axis_types}) | model {args.model or 'SmolLM2-135M-Instruct'}"
        f"{' (random init)' if args.random_init else ''}: {config.num_hidden_layers} layers, "
        f"d={config.hidden_size} | {args.method}, rank {args.rank}, lr "
        f"{parts['learning_rate']:.3g} | batch {args.batch_size} x {args.seq_len} tokens"
    )
    summary = train(args, parts)
    _log(json.dumps({k: v for k, v in summary.items() if k not in ("model_config", "losses")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

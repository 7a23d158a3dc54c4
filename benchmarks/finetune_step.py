"""Training steps of SmolLM2-135M with each fine-tuning method, against full AdamW.

Every method of ``lorajax finetune`` (full AdamW, galore, flora, lora, adapters) trains
the same model on the same batches (seq 256, batch 4 by default), through
``train.Trainer`` with its defaults (the JSON says whether a row's step took the
projected backward), next to two reference rows:

- ``floor``: a plain LoRA step, nothing added. ``lorajax.nnx.add_lora`` (rank
  16, alpha 32, every linear layer) puts unmerged adapters in the model (an adapted
  ``nnx.Linear`` computes ``base(x) + s·(x a) b``) and a jitted step differentiates the
  ``nnx.LoRAParam`` factors only (the frozen base is an argument of the step) and
  updates them with ``optax.adam``.
- ``peft``: Hugging Face PEFT on transformers' ``LlamaForCausalLM`` with the same
  config and weights, LoRA of the same rank, alpha and targets, ``torch.optim.AdamW``
  over the trainable params, 2 torch threads, float32 (bf16 autocast with
  ``--dtype bfloat16``). Skipped, with a note, when torch, peft or transformers is not
  installed (``pip install lorajax[interop]``).

Reported per row:

- step time, as the median over rounds of the ratio to full AdamW's step in the same
  round (every row runs one step per round, in turn, so the machine's drift cancels);
  the first step, a basis refresh, is a warm-up, so timed steps are steps between
  refreshes, except in the ``*-refresh`` rows, whose optimizers refresh their bases at
  every step (``sketch-refresh``: randomized-SVD bases from the single-pass sketch of
  the projected backward; ``svd-refresh``: GaLore's exact SVD of the full gradient);
- tokens per second, and the loss of the first step (the same batch for every row, so
  rows on the same weights start from the same loss);
- optimizer state bytes (and the ratio to AdamW's);
- the compiled step's ``memory_analysis()`` (arguments, outputs, temporaries, aliased,
  and peak = arguments + outputs + temporaries - aliased); none for the torch row.

Rows are measured with and without the train state donated (the torch row updates in
place and is compared with the donated full AdamW row when there is one), and with and
without rematerialisation (``remat``: each layer's activations recomputed in the
backward pass; for the torch row, transformers' gradient checkpointing).

A row is one entry of :data:`ENTRIES`: a name, a variant and a builder that returns a
step, its state, its memory and its state bytes. ``--rows`` picks entries by name or
``name/variant``.

``--random-init`` builds the model from the default's config with random weights (step
time and memory do not depend on the values), for machines where the GGUF file is not
at hand. ``--tiny`` runs a two-layer model of small width, to check the script.

Usage::

    python benchmarks/finetune_step.py --quick     # 2 timed rounds, no donation or remat
    python benchmarks/finetune_step.py             # 6 rounds, both donations and remats
    python benchmarks/finetune_step.py --rows full floor peft --remat on
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorajax.nnx
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
TINY = models.LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
LORA_ALPHA = 32.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- rows ---------------------------------------------------------------------------------


class RowKey(NamedTuple):
    """What identifies a row: entry name and variant, donation and remat.

    ``donate`` is ``None`` for a row where it does not apply (torch updates in place).
    """

    name: str
    variant: str
    donate: bool | None
    remat: bool


@dataclasses.dataclass
class Built:
    """What a row builder returns.

    Attributes:
        step: ``(state, i) -> (state, loss)``: one training step on batch ``i`` of the
            run, returning when the step has finished.
        state: The state after the first (warm-up) step on batch 0.
        memory: Byte counts of the compiled step (see :func:`memory_of`), or ``None``.
        state_bytes: Bytes of the optimizer state.
        compile_s: Seconds to compile (for the torch row: the warm-up step).
        first_loss: The loss of the warm-up step (before any update).
        info: Facts about the row for the JSON (e.g. which path a Trainer took).
    """

    step: Callable[[Any, int], tuple[Any, float]]
    state: Any
    memory: dict[str, int] | None
    state_bytes: int
    compile_s: float
    first_loss: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class RowSkipped(Exception):
    """A row that cannot run here (a missing optional dependency); the message says why."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One kind of row: measured for each donation in ``donations`` and each remat.

    Attributes:
        name: Row name (``--rows`` matches it, or ``name/variant``).
        variant: Which form of the method (``"default"``: ``train.Trainer``'s defaults).
        build: ``(key, setup) -> Built``; raises :class:`RowSkipped` to skip.
        donations: The donation settings the row has (``(None,)``: not applicable).
    """

    name: str
    variant: str
    build: Callable[[RowKey, Setup], Built]
    donations: tuple[bool | None, ...] = (False, True)


class Setup:
    """What every row builder shares: arguments, config, batches and the base weights."""

    def __init__(self, args: argparse.Namespace, batches: list[np.ndarray]) -> None:
        self.args = args
        self.dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        self.np_batches = batches
        self.batches = [jnp.asarray(b) for b in batches]
        self.tokens_per_batch = batches[0].shape[0] * (batches[0].shape[1] - 1)
        self._models: dict[bool, nnx.Module] = {}

    @property
    def config(self) -> models.LlamaConfig:
        return self.model(False).config

    def model(self, remat: bool) -> nnx.Module:
        """The model (scanned layers) with the run's weights; one graph per remat."""
        if not self._models:
            args = self.args
            kw = dict(dtype=self.dtype, scan_layers=True)
            if args.tiny or args.random_init:
                cfg = TINY if args.tiny else SMOLLM2_135M
                self._models[False] = models.Llama(cfg, rngs=nnx.Rngs(0), **kw)
            else:
                self._models[False], _ = models.load(None, **kw)
        if remat not in self._models:
            base = self._models[False]
            self._models[remat] = with_remat(base, remat)
        return self._models[remat]


def with_remat(model: models.Llama, remat: bool) -> models.Llama:
    """The same weights (shared arrays) in a model graph with ``remat`` set."""
    abstract = nnx.eval_shape(
        lambda: models.Llama(
            model.config,
            rngs=nnx.Rngs(0),
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            scan_layers=model.scan_layers,
            remat=remat,
        )
    )
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))


def memory_of(compiled: Any) -> dict[str, int]:
    """``memory_analysis()`` byte counts, with the peak as ``Trainer.memory`` counts it."""
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


# -- Trainer rows ---------------------------------------------------------------------------


def make_trainer(
    model: nnx.Module,
    method: str,
    rank: int,
    donate: bool,
    optimizer: Callable[[float, int], optax.GradientTransformation] | None = None,
    **trainer_kwargs: Any,
) -> train.Trainer:
    """The Trainer of ``lorajax finetune`` for a method (model concrete or abstract).

    ``optimizer(learning_rate, rank)`` replaces the method's optimizer of ``lorajax
    finetune`` when given; ``trainer_kwargs`` go to ``train.Trainer`` (the variant of a
    row).
    """
    lr = train.default_learning_rate(method, model.config.hidden_size)
    if optimizer is None:
        tx = train.make_optimizer(method, learning_rate=lr, rank=rank)
    else:
        tx = optimizer(lr, rank)
    ad, base = None, None
    if method == "adapters":
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        key = jax.random.key(0)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            ad, base = jax.eval_shape(lambda p: train.init_adapters(key, p, rank=rank), params)
        else:
            ad, base = train.init_adapters(key, params, rank=rank)
    return train.Trainer(model, tx, adapters=ad, params=base, donate=donate, **trainer_kwargs)


def trainer_row(
    method: str,
    optimizer: Callable[[float, int], optax.GradientTransformation] | None = None,
    **trainer_kwargs: Any,
) -> Callable[[RowKey, Setup], Built]:
    """A row builder for ``train.Trainer`` with a method's optimizer (or ``optimizer``)."""

    def build(key: RowKey, setup: Setup) -> Built:
        model = setup.model(key.remat)
        trainer = make_trainer(
            model, method, setup.args.rank, key.donate, optimizer, **trainer_kwargs
        )
        state = trainer.init()
        t0 = time.perf_counter()
        memory = trainer.memory(state, setup.batches[0], refresh=trainer.refresh_due(state))
        compile_s = time.perf_counter() - t0

        def step(state: train.TrainState, i: int) -> tuple[train.TrainState, float]:
            state, metrics = trainer.step(state, setup.batches[i])
            jax.block_until_ready(state)
            return state, float(metrics["loss"])

        state, loss = step(state, 0)  # a refresh step: timed rounds run between refreshes
        info = {
            "projected": getattr(trainer, "projected", False),
            "refreshes": bool(trainer.refresh_due(state)),
        }
        bytes_ = train.tree_bytes(state.opt_state)
        return Built(step, state, memory, bytes_, compile_s, loss, info)

    return build


# -- the floor: unmerged NNX adapters, gradients of the factors only ----------------------


def floor_step(
    model: nnx.Module, tx: optax.GradientTransformation, donate: bool
) -> tuple[Callable[..., Any], Any, Any]:
    """A jitted LoRA step on a model with ``lorajax.nnx`` adapters.

    The model is split into its ``nnx.LoRAParam`` factors and the rest (the frozen
    base); the step differentiates the loss with respect to the factors only and
    updates them with ``tx``. Works on a concrete model or one from ``nnx.eval_shape``.

    Returns:
        ``(step, factors, base)`` with ``step(factors, opt_state, base, tokens) ->
        (factors, opt_state, loss)``, jitted, donating the factors and the optimizer
        state when ``donate``.
    """
    graphdef, factors, base = nnx.split(model, nnx.LoRAParam, ...)

    def loss_fn(factors: Any, base: Any, tokens: jax.Array) -> jax.Array:
        adapted = nnx.merge(graphdef, factors, base)
        total, count = train.next_token_loss(adapted(tokens[:, :-1]), tokens)
        return total / count

    def step(factors: Any, opt_state: Any, base: Any, tokens: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(factors, base, tokens)
        updates, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return jitted, nnx.to_pure_dict(factors), nnx.to_pure_dict(base)


def add_floor_lora(model: nnx.Module, rank: int) -> nnx.Module:
    """``model`` with unmerged rank-``rank`` adapters on every linear layer (alpha 32)."""
    return lorajax.nnx.add_lora(model, rank=rank, alpha=LORA_ALPHA, targets="all-linear")


def floor_optimizer(hidden_size: int) -> optax.GradientTransformation:
    return optax.adam(train.default_learning_rate("adapters", hidden_size))


def build_floor(key: RowKey, setup: Setup) -> Built:
    model = setup.model(key.remat)
    adapted = add_floor_lora(nnx.merge(*nnx.split(model)), setup.args.rank)  # a copy
    tx = floor_optimizer(model.config.hidden_size)
    jitted, factors, base = floor_step(adapted, tx, key.donate)
    opt_state = tx.init(factors)
    t0 = time.perf_counter()
    compiled = jitted.lower(factors, opt_state, base, setup.batches[0]).compile()
    compile_s = time.perf_counter() - t0

    def step(state: Any, i: int) -> tuple[Any, float]:
        factors, opt_state, loss = compiled(*state, base, setup.batches[i])
        jax.block_until_ready((factors, opt_state))
        return (factors, opt_state), float(loss)

    state, loss = step((factors, opt_state), 0)
    return Built(step, state, memory_of(compiled), train.tree_bytes(opt_state), compile_s, loss)


# -- the peer: PEFT on transformers' LlamaForCausalLM ---------------------------------------


def copy_into_torch(hf_model: Any, model: models.Llama) -> None:
    """Copies our (scanned) Llama's weights into transformers' ``LlamaForCausalLM``.

    Kernels are ``(d_in, d_out)``, torch weights ``(d_out, d_in)``; layer ``i`` is index
    ``i`` of the stacked leaves.
    """
    import torch

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = params["model"]["layers"]
    ours = {
        "model.embed_tokens.weight": params["model"]["embed_tokens"]["embedding"],
        "model.norm.weight": params["model"]["norm"]["scale"],
    }
    if "lm_head" in params:
        ours["lm_head.weight"] = params["lm_head"]["kernel"].T
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for block, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])):
            for name in names:
                ours[f"{prefix}{block}.{name}.weight"] = layers[block][name]["kernel"][i].T
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ours[f"{prefix}{norm}.weight"] = layers[norm]["scale"][i]
    theirs = dict(hf_model.named_parameters())
    if set(theirs) != set(ours):
        raise ValueError(f"parameter names differ: {sorted(set(theirs) ^ set(ours))[:6]}")
    with torch.no_grad():
        for name, value in ours.items():
            theirs[name].copy_(torch.from_numpy(np.array(value, np.float32)))


def build_peft(key: RowKey, setup: Setup) -> Built:
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        raise RowSkipped(
            f"needs torch, peft and transformers ({e}); pip install 'lorajax[interop]'"
        ) from None
    torch.set_num_threads(2)
    model = setup.model(False)
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg.to_hf()))
    copy_into_torch(hf, model)
    hf.config.use_cache = False
    lora = peft.LoraConfig(
        r=setup.args.rank,
        lora_alpha=LORA_ALPHA,
        target_modules=list(PROJECTIONS),
        lora_dropout=0.0,
    )
    with warnings.catch_warnings():
        # transformers 5 renamed gradient to activation checkpointing; peft reads the
        # old names.
        warnings.filterwarnings("ignore", "`.*` is deprecated", FutureWarning)
        if key.remat:
            kwargs = {"use_reentrant": False}
            if hasattr(hf, "activation_checkpointing_enable"):
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        peft_model = peft.get_peft_model(hf, lora)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    lr = train.default_learning_rate("adapters", cfg.hidden_size)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    batches = [torch.from_numpy(b.astype(np.int64)) for b in setup.np_batches]
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if setup.args.dtype == "bfloat16"
        else contextlib.nullcontext
    )

    def step(state: Any, i: int) -> tuple[Any, float]:
        tokens = batches[i]
        with autocast():
            logits = peft_model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return state, float(loss.detach())

    t0 = time.perf_counter()
    state, loss = step(None, 0)
    warm_s = time.perf_counter() - t0
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    info = {"attention": hf.config._attn_implementation, "torch": torch.__version__}
    return Built(step, state, None, state_bytes, warm_s, loss, info)


TARGETS = "all-linear"


def refreshing(method: str, basis: str) -> Callable[[float, int], optax.GradientTransformation]:
    """``method``'s optimizer with ``basis`` bases refreshed at every step.

    Every timed step of such a row is a refresh step: with ``"randomized_svd"`` the
    projected backward takes the single-pass sketch of each targeted gradient (one
    backward pass); with ``"svd"`` (GaLore's exact bases) it takes the targeted full
    gradients.
    """

    def make(learning_rate: float, rank: int) -> optax.GradientTransformation:
        if method == "galore":
            inner = lorajax.galore(
                learning_rate, rank=rank, update_proj_gap=1, basis=basis, targets=TARGETS
            )
        else:
            inner = lorajax.lora(learning_rate, rank, refresh_every=1, basis=basis, targets=TARGETS)
        return train.only_targets(inner, TARGETS)

    return make


#: Every kind of row. A Trainer variant is one more line, e.g.
#: ``Entry("galore", "full-gradient", trainer_row("galore", projected=False))``.
ENTRIES: list[Entry] = [
    Entry("full", "default", trainer_row("full")),
    *(
        Entry(method, "projected", trainer_row(method, projected=True))
        for method in train.METHODS
        if method != "full"
    ),
    *(
        Entry(method, "full-gradient", trainer_row(method, projected=False))
        for method in train.METHODS
        if method != "full"
    ),
    Entry(
        "galore", "sketch-refresh", trainer_row("galore", refreshing("galore", "randomized_svd"))
    ),
    Entry("lora", "sketch-refresh", trainer_row("lora", refreshing("lora", "randomized_svd"))),
    Entry("galore", "svd-refresh", trainer_row("galore", refreshing("galore", "svd"))),
    Entry("floor", "nnx-unmerged", build_floor),
    Entry("peft", "torch", build_peft, donations=(None,)),
]


# -- the run --------------------------------------------------------------------------------


def select(entries: list[Entry], wanted: list[str]) -> list[Entry]:
    chosen = [e for e in entries if e.name in wanted or f"{e.name}/{e.variant}" in wanted]
    known = {e.name for e in entries} | {f"{e.name}/{e.variant}" for e in entries}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; choose from {sorted(known)}")
    return chosen


def baseline_of(key: RowKey, runs: dict[RowKey, Any]) -> RowKey | None:
    """The full AdamW row a row is compared with: same remat, same donation.

    A row without a donation setting (torch, in place) is compared with the donated
    full row when there is one.
    """
    order = (key.donate,) if key.donate is not None else (True, False)
    for donate in order:
        base = RowKey("full", "default", donate, key.remat)
        if base in runs:
            return base
    return None


def label(key: RowKey) -> str:
    donate = "n/a" if key.donate is None else str(key.donate)
    return f"{key.name}/{key.variant} donate={donate} remat={key.remat}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, no donation, no remat")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument(
        "--rows",
        "--methods",
        dest="rows",
        nargs="+",
        default=None,
        help="entries by name or name/variant (default: all); must include full",
    )
    parser.add_argument(
        "--donate",
        choices=("off", "on", "both"),
        default=None,
        help="donate the train state (default: off with --quick, else both)",
    )
    parser.add_argument(
        "--remat",
        choices=("off", "on", "both"),
        default=None,
        help="rematerialise layers (default: off with --quick, else both)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    settings = {"off": (False,), "on": (True,), "both": (False, True)}
    donations = settings[args.donate or ("off" if args.quick else "both")]
    remats = settings[args.remat or ("off" if args.quick else "both")]
    entries = select(ENTRIES, args.rows or [e.name for e in ENTRIES])
    if not any(e.name == "full" for e in entries):
        parser.error("--rows must include full, the baseline")

    rng = np.random.default_rng(0)
    vocab = (TINY if args.tiny else SMOLLM2_135M).vocab_size
    batches = [
        rng.integers(0, vocab, size=(args.batch_size, args.seq_len + 1), dtype=np.int32)
        for _ in range(rounds + 1)
    ]
    setup = Setup(args, batches)

    keys: list[RowKey] = []
    for remat in remats:
        for donate in donations:
            for entry in entries:
                d = None if entry.donations == (None,) else donate
                key = RowKey(entry.name, entry.variant, d, remat)
                if (d is None or d in entry.donations) and key not in keys:
                    keys.append(key)
    runs: dict[RowKey, Built] = {}
    skipped: dict[RowKey, str] = {}
    builders = {(e.name, e.variant): e.build for e in entries}
    for key in keys:
        try:
            runs[key] = builders[key.name, key.variant](key, setup)
        except RowSkipped as e:
            skipped[key] = str(e)
            print(f"skipped  {label(key)}: {e}", flush=True)
            continue
        print(
            f"compiled {label(key)} in {runs[key].compile_s:.1f}s, "
            f"first loss {runs[key].first_loss:.4f}",
            flush=True,
        )

    times: dict[RowKey, list[float]] = {key: [] for key in runs}
    for r in range(rounds):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run.state, _ = run.step(run.state, r + 1)
            times[key].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}", flush=True)

    rows = []
    for key, run in runs.items():
        base_key = baseline_of(key, runs)
        base = runs[base_key]
        ratios = [t / b for t, b in zip(times[key], times[base_key])]
        step_s = statistics.median(times[key])
        peak = run.memory["peak_bytes"] if run.memory else None
        base_peak = base.memory["peak_bytes"] if base.memory else None
        rows.append(
            {
                "method": key.name,
                "variant": key.variant,
                "donate": key.donate,
                "remat": key.remat,
                "baseline": base_key._asdict(),
                "step_s": step_s,
                "tokens_per_s": setup.tokens_per_batch / step_s,
                "step_ratio_vs_full": statistics.median(ratios),
                "first_loss": run.first_loss,
                "state_bytes": run.state_bytes,
                "state_ratio_vs_full": run.state_bytes / base.state_bytes,
                "peak_bytes": peak,
                "peak_ratio_vs_full": peak / base_peak if peak is not None else None,
                "memory": run.memory,
                "compile_s": run.compile_s,
                "times_s": times[key],
                **run.info,
            }
        )
    for key, why in skipped.items():
        rows.append(
            {
                "method": key.name,
                "variant": key.variant,
                "donate": key.donate,
                "remat": key.remat,
                "skipped": why,
            }
        )

    cfg = setup.config
    if args.tiny:
        model_name = "tiny Llama (random weights)"
    else:
        model_name = "SmolLM2-135M" + (" (random weights)" if args.random_init else "")
    result = {
        "benchmark": "finetune_step",
        "model": model_name,
        "config": dataclasses.asdict(cfg),
        "scan_layers": True,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "lora_alpha": LORA_ALPHA,
        "dtype": args.dtype,
        "rounds": rounds,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    mode = "_tiny" if args.tiny else "_quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS / f"finetune_step{mode}_{result['backend']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{'row':24s} {'donate':>6s} {'remat':>5s} {'step':>8s} {'vs full':>8s} "
        f"{'tok/s':>8s} {'state':>10s} {'vs full':>8s} {'peak':>10s} {'vs full':>8s}"
    )
    for row in rows:
        name = f"{row['method']}/{row['variant']}"
        donate = "n/a" if row["donate"] is None else str(row["donate"])
        if "skipped" in row:
            print(f"{name:24s} {donate:>6s} {row['remat']!s:>5s} skipped: {row['skipped']}")
            continue
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:8.0f}MB"
        peak_ratio = (
            "-" if row["peak_ratio_vs_full"] is None else f"{row['peak_ratio_vs_full']:.2f}x"
        )
        print(
            f"{name:24s} {donate:>6s} {row['remat']!s:>5s} {row['step_s']:7.3f}s "
            f"{row['step_ratio_vs_full']:7.2f}x {row['tokens_per_s']:8.0f} "
            f"{row['state_bytes'] / 2**20:8.1f}MB {row['state_ratio_vs_full']:7.3f}x "
            f"{peak:>10s} {peak_ratio:>8s}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Fine-tuning a causal language model with any lorajax method.

One step builder serves the ``lorajax finetune`` command, the notebooks and the pod
scripts:

- :func:`make_optimizer` builds the optimizer of a method: full AdamW, ``lorajax.galore``,
  ``lorajax.flora``, adapter-free ``lorajax.lora``, or Adam over LoRA adapters with
  optional ``lorajax.lora_pro`` and ``lorajax.lora_plus``;
- :class:`Trainer` splits a Flax NNX model into a static graph and a params tree, and
  compiles one training step (next-token cross-entropy, gradient, optimizer update) and
  one evaluation step, placed on a mesh when one is given;
- :func:`fit` runs steps from a batch iterator with a progress bar and metrics.

In every low-rank method only the targeted matrices train (``targets``, by default
``"all-linear"``: the attention and MLP projections); embeddings and norms stay frozen,
as they do under LoRA, so the optimizer state is LoRA-sized. ``"full"`` trains
everything.

Examples:
    >>> import jax, lorajax
    >>> from flax import nnx
    >>> from lorajax import models, train
    >>> config = models.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                             num_hidden_layers=1, num_attention_heads=2,
    ...                             num_key_value_heads=1)
    >>> model = models.Llama(config, rngs=nnx.Rngs(0))
    >>> tx = train.make_optimizer("lora", learning_rate=1e-2, rank=2)
    >>> trainer = train.Trainer(model, tx)
    >>> state = trainer.init()
    >>> batch = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
    >>> state, metrics = trainer.step(state, batch)
    >>> int(state.step), bool(metrics["loss"] > 0)
    (1, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

import lorajax
from lorajax import adapters as lora_adapters
from lorajax import sharding
from lorajax._src.adapters.tree import LoRA, is_adapter_leaf, lora_leaves
from lorajax._src.checks import static_int
from lorajax._src.nnx_probe import ProbedGraph
from lorajax._src.probe import Coordinates, Probe
from lorajax._src.probing import FULL_GRADIENT
from lorajax._src.state import LowRankState, Projector, is_projector_leaf
from lorajax._src.targets import path_str, resolve_targets

__all__ = [
    "METHODS",
    "default_learning_rate",
    "make_optimizer",
    "only_targets",
    "init_adapters",
    "next_token_loss",
    "TrainState",
    "Trainer",
    "FitResult",
    "fit",
    "tree_bytes",
]

#: The fine-tuning methods, by the name the command line uses.
METHODS: tuple[str, ...] = ("full", "galore", "flora", "lora", "adapters")

# LoRA Without Regret: the best LoRA learning rate is about 10x full fine-tuning's. The
# projected methods take the same multiplier: an orthonormal rank-r projection moves W
# less per step than full Adam, as an adapter does.
_LR_MULTIPLIER = {"full": 1.0, "galore": 10.0, "flora": 10.0, "lora": 10.0, "adapters": 10.0}
_DEFAULT_REFRESH = {"galore": 200, "flora": 1000, "lora": 200}


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}.")
    return method


def _check_positive_float(name: str, value: Any) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a positive float, got {value!r}.")


def default_learning_rate(method: str, hidden_size: int) -> float:
    r"""The starting learning rate for a method, following LoRA Without Regret.

    .. math:: \eta = 5\cdot10^{-5}\; M \;(2000 / d_{\text{model}})^{0.781},

    with ``M = 1`` for full fine-tuning and ``M = 10`` for LoRA, the ratio the study
    measured between the best LoRA and the best full fine-tuning learning rates (the
    exponent is its fit for the Llama family). lorajax's projected methods use ``M = 10``
    as well. It is a starting point for a sweep, not a tuned value.

    Args:
        method: One of :data:`METHODS`.
        hidden_size: The model width ``d_model``.

    Returns:
        The learning rate.

    Examples:
        >>> from lorajax.train import default_learning_rate
        >>> round(default_learning_rate("full", 576), 6)
        0.000132
        >>> round(default_learning_rate("lora", 576), 5)
        0.00132

    References:
        Schulman et al., "LoRA Without Regret", Thinking Machines Lab (2025).
        https://thinkingmachines.ai/blog/lora/
    """
    _check_method(method)
    static_int(hidden_size, "hidden_size")
    return 5e-5 * _LR_MULTIPLIER[method] * (2000.0 / hidden_size) ** 0.781


def _is_coordinates(x: Any) -> bool:
    return isinstance(x, lorajax.Coordinates)


def only_targets(
    tx: optax.GradientTransformation, targets: Any = "all-linear"
) -> optax.GradientTransformation:
    """Runs ``tx`` on the ``targets`` matrices only; every other leaf is frozen.

    The leaves that :func:`lorajax.resolve_targets` selects go through ``tx`` (one call,
    over that subtree); every other leaf gets a zero update and no optimizer state. This is
    how :func:`make_optimizer` builds the low-rank methods: ``lorajax.low_rank`` alone would
    run its inner optimizer at full size on the leaves it does not project.

    Args:
        tx: The optimizer of the targeted matrices.
        targets: Any ``targets`` value of :func:`lorajax.low_rank`.

    Returns:
        An ``optax.multi_transform`` over the labels ``"train"`` and ``"frozen"``.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from lorajax.train import only_targets
        >>> params = {"mlp": {"up_proj": {"kernel": jnp.ones((8, 4))}}, "norm": jnp.ones(4)}
        >>> tx = only_targets(optax.sgd(0.1))
        >>> updates, _ = tx.update(params, tx.init(params), params)
        >>> float(updates["mlp"]["up_proj"]["kernel"][0, 0]), float(updates["norm"][0])
        (-0.1, 0.0)
    """
    # Labels are a function of the tree's structure and shapes; they are computed from
    # the params at init and reused for update trees of the same structure, whose
    # targeted leaves may be lorajax.Coordinates (a projected backward pass).
    known: dict[Any, Any] = {}

    def labels(tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_coordinates)
        if treedef in known:
            return known[treedef]
        if any(_is_coordinates(x) for x in leaves):
            raise ValueError(
                "only_targets got lorajax.Coordinates in an update tree whose structure it "
                "has not seen at init. Initialise the optimizer on the same params tree."
            )
        layouts = resolve_targets(tree, targets)
        out = jax.tree.map(
            lambda layout, _: "frozen" if layout is None else "train",
            layouts,
            tree,
            is_leaf=lambda x: x is None,
        )
        known[treedef] = out
        return out

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_optimizer(
    method: str,
    *,
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 16,
    weight_decay: float = 0.0,
    targets: Any = "all-linear",
    refresh_every: int | None = None,
    lora_pro: bool = False,
    lora_plus_ratio: float = 1.0,
    seed: int = 0,
) -> optax.GradientTransformation:
    """The optimizer of a fine-tuning method.

    - ``"full"``: ``optax.adamw`` on every parameter.
    - ``"galore"``, ``"flora"``, ``"lora"``: ``lorajax.galore`` / ``lorajax.flora`` /
      ``lorajax.lora`` on the ``targets`` matrices (the params are updated in place, the
      state is rank-``r``); every other parameter is frozen.
    - ``"adapters"``: AdamW over a LoRA adapter tree (see :func:`init_adapters`),
      preceded by ``lorajax.lora_pro()`` when ``lora_pro`` and followed by
      ``lorajax.lora_plus(lora_plus_ratio)`` when the ratio is not 1.

    Args:
        method: One of :data:`METHODS`.
        learning_rate: A scalar or an optax schedule.
        rank: The rank ``r`` of the projections (ignored by ``"full"`` and
            ``"adapters"``, whose rank is the adapters').
        weight_decay: Decoupled weight decay.
        targets: Which matrices train in the low-rank methods (any ``targets`` value of
            :func:`lorajax.low_rank`).
        refresh_every: Steps between basis refreshes (default: 200 for galore and
            lora, 1000 for flora).
        lora_pro: Adapters only: use LoRA-Pro's equivalent gradient.
        lora_plus_ratio: ``"lora"`` and ``"adapters"``: the LoRA+ ratio of ``b``'s step.
        seed: Seed of the random bases.

    Returns:
        An optax transformation. For ``"adapters"`` it runs over the adapter tree (pass
        the adapters as ``params`` to ``update``); otherwise over the model params.

    Raises:
        ValueError: On an unknown method or an out-of-range argument.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax.train import make_optimizer
        >>> params = {"mlp": {"up_proj": {"kernel": jnp.ones((8, 4))}}, "norm": jnp.ones(4)}
        >>> tx = make_optimizer("lora", learning_rate=1e-3, rank=2)
        >>> updates, _ = tx.update(params, tx.init(params), params)
        >>> float(jnp.abs(updates["norm"]).max())  # frozen: not a target
        0.0
    """
    _check_method(method)
    static_int(rank, "rank")
    if not callable(learning_rate):
        _check_positive_float("learning_rate", learning_rate)
    if not isinstance(weight_decay, int | float) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a float >= 0, got {weight_decay!r}.")
    if refresh_every is not None:
        static_int(refresh_every, "refresh_every")
    _check_positive_float("lora_plus_ratio", lora_plus_ratio)
    if lora_pro and method != "adapters":
        raise ValueError(
            f"`lora_pro` applies to method='adapters', got method={method!r}; "
            "method='lora' aligns its update with LoRA-Pro already."
        )
    if lora_plus_ratio != 1.0 and method not in ("lora", "adapters"):
        raise ValueError(
            f"`lora_plus_ratio` applies to method 'lora' or 'adapters', got {method!r}."
        )

    if method == "full":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if method == "adapters":
        parts: list[optax.GradientTransformation] = []
        if lora_pro:
            parts.append(lorajax.lora_pro())
        parts.append(optax.scale_by_adam())
        if lora_plus_ratio != 1.0:
            parts.append(lorajax.lora_plus(lora_plus_ratio))
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.scale_by_learning_rate(learning_rate))
        return optax.chain(*parts)

    refresh = refresh_every or _DEFAULT_REFRESH[method]
    if method == "galore":
        inner = lorajax.galore(
            learning_rate,
            rank=rank,
            update_proj_gap=refresh,
            weight_decay=weight_decay,
            targets=targets,
        )
    elif method == "flora":
        inner = lorajax.flora(
            learning_rate,
            rank,
            refresh_every=refresh,
            weight_decay=weight_decay,
            seed=seed,
            targets=targets,
        )
    else:
        inner = lorajax.lora(
            learning_rate,
            rank,
            refresh_every=refresh,
            lora_plus_ratio=lora_plus_ratio,
            weight_decay=weight_decay,
            seed=seed,
            targets=targets,
        )
    return only_targets(inner, targets)


def init_adapters(
    key: jax.Array,
    params: Any,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Any = "all-linear",
    init: str = "default",
) -> tuple[Any, Any]:
    """LoRA adapters for a params tree; LoRA Without Regret's ``alpha=32`` by default.

    A thin front to :func:`lorajax.adapters.init` with the defaults of the fine-tuning
    command: every linear layer, ``alpha = 32`` (so the ``alpha/r`` scaling keeps the
    best learning rate almost independent of the rank).

    Args:
        key: A PRNG key.
        params: The model params (e.g. :attr:`Trainer.params`), or the NNX model itself
            (its ``nnx.Param`` values are taken).
        rank: Adapter rank.
        alpha: LoRA alpha.
        targets: Which matrices get adapters.
        init: An init of :data:`lorajax.adapters.INITS`.

    Returns:
        ``(adapters, base_params)`` as :func:`lorajax.adapters.init` returns them.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax.train import init_adapters
        >>> params = {"self_attn": {"q_proj": {"kernel": jnp.ones((16, 8))}}}
        >>> adapters, base = init_adapters(jax.random.key(0), params, rank=4)
        >>> lora = adapters["self_attn"]["q_proj"]["kernel"]
        >>> lora.a.shape, lora.b.shape, lora.scale
        ((16, 4), (4, 8), 8.0)
    """
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
    return lora_adapters.init(key, params, rank=rank, alpha=alpha, targets=targets, init=init)


def next_token_loss(
    logits: jax.Array, tokens: Int[Array, "batch seq"]
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    Args:
        logits: ``(batch, seq - 1, vocab)``: the model's output on ``tokens[:, :-1]``.
        tokens: ``(batch, seq)`` token ids; targets are ``tokens[:, 1:]``.

    Returns:
        ``(sum of negative log-likelihoods, count)`` as float32 scalars.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax.train import next_token_loss
        >>> total, count = next_token_loss(jnp.zeros((1, 2, 4)), jnp.array([[0, 1, 2]]))
        >>> round(float(total / count), 4)  # uniform over 4 tokens: log 4
        1.3863
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)


class TrainState(NamedTuple):
    """Everything a training step reads and writes (a pytree).

    Attributes:
        params: The model's parameters as a nested dict (for ``"adapters"``: the frozen
            base weights).
        adapters: The LoRA adapter tree, or ``None`` when the params themselves train.
        opt_state: The optimizer state.
        step: Number of steps taken (int32).
    """

    params: Any
    adapters: Any
    opt_state: Any
    step: jax.Array


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays in a pytree (``ShapeDtypeStruct`` leaves count too).

    Args:
        tree: Any pytree; leaves without ``shape`` and ``dtype`` count zero.

    Returns:
        The number of bytes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax.train import tree_bytes
        >>> tree_bytes({"w": jnp.zeros((4, 8)), "n": jax.ShapeDtypeStruct((3,), jnp.bfloat16)})
        134
    """
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


class Trainer:
    """Compiled training and evaluation steps for a Flax NNX causal language model.

    The model is split once into its graph and a params tree (a nested dict of arrays);
    a step merges them inside ``jax.jit``, so the compiled program is a pure function of
    :class:`TrainState` and the batch. A batch is ``(batch, seq + 1)`` token ids: the
    model reads ``[:, :-1]`` and predicts ``[:, 1:]``.

    With a ``mesh`` and no ``rules``, the batch is split over ``data_axes`` (by default
    every mesh axis) and the state is replicated: data parallelism. With ``rules`` (e.g.
    :data:`lorajax.sharding.LLAMA_RULES`), every param is sharded by its rule, the
    adapters and every optimizer-state leaf by the layout derived from it
    (:func:`lorajax.sharding.state_shardings`), and the batch is split over the ``data``
    and ``fsdp`` axes: FSDP and tensor parallelism. The compiled step takes and returns
    the state with exactly these shardings (:attr:`shardings`). Both Explicit and Auto
    axis types work; on an Explicit mesh the model's forward and backward pass run with
    the compiler choosing the layout of activations, and the optimizer update with the
    layouts lorajax states.

    In a multi-process run (``jax.distributed``), every process builds the Trainer with
    the same model and mesh, and passes its own rows of each batch (e.g. from a
    :class:`lorajax.data.BatchIterator` with ``shard_index=jax.process_index()``).

    Args:
        model: A Flax NNX module mapping ``(batch, seq)`` token ids to logits.
        tx: The optimizer, e.g. from :func:`make_optimizer`.
        adapters: A LoRA adapter tree for the model's params (:func:`init_adapters`);
            then the adapters train and the params stay frozen. ``params`` must then be
            the base params :func:`init_adapters` returned (PiSSA-like inits change
            them).
        params: The params to start from (default: the model's own).
        mesh: An optional ``jax.sharding.Mesh`` (see :func:`lorajax.sharding.make_mesh`).
        rules: Partition rules for the params (``(regex, PartitionSpec)`` pairs); needs
            a ``mesh``. ``None`` replicates the state.
        data_axes: Mesh axes the batch dimension is split over (default: every axis
            without ``rules``, the ``data`` and ``fsdp`` axes with them).
        donate: Donate the state to the step (update in place).
        projected: Run the step through the projected backward (see below). ``None``
            (default) uses it whenever it applies: with adapters, or with an optimizer
            built on :func:`lorajax.low_rank`, and targeted layers that take probes.
            ``True`` raises an error when it cannot apply; ``False`` differentiates the
            full params (or the merged adapters): the oracle path.

    The projected backward. A low-rank optimizer never needs the full weight gradients,
    only their coordinates in its bases, so the step differentiates zero coordinates at
    each targeted layer instead of the weights (:func:`lorajax.probes`,
    :class:`lorajax.Probe`): ``∂L/∂Z_ℓ = (x P_ℓ)ᵀ dY = P_ℓᵀ G`` and
    ``∂L/∂Z_r = xᵀ (dY P_r) = G P_r``. No ``G`` is formed, and frozen leaves (embeddings,
    norms) are not differentiated at all. Adapters are applied unmerged, ``s·(x a) b``,
    and only the factors are differentiated. At a refresh of randomized-SVD bases the
    probes are the test matrices of a single-pass sketch, so that step compiles a second
    program; an exact-SVD refresh (``galore``) differentiates the targeted kernels
    themselves at that step only. ``metrics["grad_norm"]`` is then the norm of what the
    optimizer receives (coordinates, or adapter gradients).

    Attributes:
        params: The model's params as a nested dict.
        graphdef: The model's static graph.
        shardings: A :class:`TrainState` of ``NamedSharding`` (``None`` without a mesh).
        projected: Whether the step runs through the projected backward.

    Examples:
        >>> import numpy as np, optax
        >>> from flax import nnx
        >>> from lorajax import models, train
        >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
        ...                          num_hidden_layers=1, num_attention_heads=2,
        ...                          num_key_value_heads=1)
        >>> trainer = train.Trainer(models.Llama(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-2))
        >>> state = trainer.init()
        >>> batch = np.arange(18).reshape(2, 9) % 32
        >>> before = trainer.evaluate(state, [batch])
        >>> for _ in range(3):
        ...     state, _ = trainer.step(state, batch)
        >>> trainer.evaluate(state, [batch]) < before
        True
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        *,
        adapters: Any = None,
        params: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | None = None,
        data_axes: str | Sequence[str] | None = None,
        donate: bool = False,
        projected: bool | None = None,
    ) -> None:
        if not isinstance(model, nnx.Module):
            raise TypeError(f"`model` must be a flax.nnx.Module, got {type(model).__name__}.")
        self.graphdef, state, self._rest = nnx.split(model, nnx.Param, ...)
        self.params = nnx.to_pure_dict(state) if params is None else params
        self.tx = tx
        self.adapters = adapters
        if adapters is not None:
            jax.eval_shape(lora_adapters.merge, self.params, adapters)  # checks, computes nothing
        if projected not in (None, True, False):
            raise TypeError(f"`projected` must be None, True or False, got {projected!r}.")
        self.graph: ProbedGraph | None = None
        self._stored_bases = False
        if projected is not False:
            self.graph = self._probed_graph(model, projected)
        self.projected = self.graph is not None
        if rules is not None and mesh is None:
            raise ValueError("`rules` shard params over a mesh: pass `mesh` as well.")
        self.mesh = mesh
        self.rules = rules
        self.shardings: TrainState | None = None
        self._explicit = False
        self._data_axes: tuple[str, ...] = ()
        self._data_size = 1
        jit_shardings: dict[str, Any] = {}
        if mesh is not None:
            self._setup_mesh(mesh, rules, data_axes)
            batch = sharding.batch_sharding(mesh, self._data_axes)
            jit_shardings = {
                "in_shardings": (self.shardings, batch),
                "out_shardings": (self.shardings, self._replicated),
            }
        donate_args = (0,) if donate else ()
        self._step = jax.jit(
            self._step_fn, static_argnums=(2,), donate_argnums=donate_args, **jit_shardings
        )
        self._compiled: dict[Any, Any] = {}
        if jit_shardings:
            jit_shardings["out_shardings"] = self._replicated  # (nll sum, token count)
        self._eval = jax.jit(self._eval_fn, **jit_shardings)
        self._init = jax.jit(
            self._init_fn, out_shardings=self.shardings if mesh is not None else None
        )

    def _probed_graph(self, model: nnx.Module, projected: bool | None) -> ProbedGraph | None:
        """The probed model graph, or None where the projected backward does not apply."""
        if self.adapters is not None:
            loras = lora_leaves(self.adapters)
            others = [
                x
                for x in jax.tree.leaves(self.adapters, is_leaf=is_adapter_leaf)
                if x is not None and not isinstance(x, LoRA)
            ]
            paths, why = [p for p, _ in loras], "other adapters than LoRA (e.g. DoRA)"
            layouts = {p: lora.layout for p, lora in loras} if not others else None
        else:
            abstract = jax.eval_shape(self.tx.init, self.params)
            states = [
                x
                for x in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, LowRankState))
                if isinstance(x, LowRankState)
            ]
            layouts = {}
            for st in states:
                flat, _ = jax.tree_util.tree_flatten_with_path(
                    st.projectors, is_leaf=is_projector_leaf
                )
                for path, proj in flat:
                    if isinstance(proj, Projector):
                        layouts[path_str(path)] = proj.layout
                        self._stored_bases |= proj.basis in ("svd", "randomized_svd")
            paths, why = list(layouts), "an optimizer that is not built on lorajax.low_rank"
            if not states:
                layouts = None
        if not layouts:
            if projected:
                raise ValueError(
                    f"`projected`=True, but this Trainer has {why}: there is nothing to "
                    "probe. Pass projected=None or False."
                )
            return None
        pattern = "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
        try:
            graph = ProbedGraph.build(model, pattern)
        except (TypeError, ValueError) as e:
            if projected:
                raise ValueError(
                    f"`projected`=True, but the model cannot take probes: {e} Pass "
                    "projected=False to train on full gradients."
                ) from e
            return None
        for path, layout in layouts.items():
            theirs = graph.layouts.get(path)
            if theirs is None or theirs.matrix_shape != layout.matrix_shape:
                if projected:
                    raise ValueError(
                        f"`projected`=True, but the optimizer reads {path!r} as matrices "
                        f"{layout.matrix_shape} and its layer as "
                        f"{None if theirs is None else theirs.matrix_shape}. Build the "
                        "optimizer with targets=trainer.graph.specs, or pass projected=False."
                    )
                return None
        return graph

    def _setup_mesh(
        self, mesh: jax.sharding.Mesh, rules: Any, data_axes: str | Sequence[str] | None
    ) -> None:
        if data_axes is None:
            axes = tuple(mesh.axis_names) if rules is None else sharding.batch_axes(mesh)
        else:
            axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"`data_axes` {unknown} are not axes of the mesh {tuple(mesh.axis_names)}."
            )
        self._data_axes = axes
        self._data_size = math.prod(mesh.shape[a] for a in axes)
        self._replicated = NamedSharding(mesh, P())
        # The projected backward contracts the batch-sharded tokens inside the model, so it
        # also runs with the compiler choosing layouts when only the batch is sharded.
        sharded_model = rules is not None or self.graph is not None
        self._explicit = sharded_model and AxisType.Explicit in mesh.axis_types
        trainable = self.params if self.adapters is None else self.adapters
        if rules is None:
            replicate = lambda tree: jax.tree.map(lambda _: self._replicated, tree)  # noqa: E731
            param_sh = replicate(self.params)
            adapter_sh = replicate(self.adapters)
        else:
            specs = sharding.param_specs(self.params, rules, mesh=mesh)
            param_sh = sharding.to_shardings(specs, mesh)
            adapter_sh = None
            if self.adapters is not None:
                adapter_specs = sharding.adapter_specs(self.adapters, specs)
                adapter_sh = sharding.to_shardings(adapter_specs, mesh)
        trainable_sh = param_sh if self.adapters is None else adapter_sh
        opt_sh = sharding.state_shardings(self.tx, trainable, trainable_sh)
        self.shardings = TrainState(param_sh, adapter_sh, opt_sh, self._replicated)

    # -- pure functions -------------------------------------------------------------

    def _forward(self, params: Any, tokens: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, params, self._rest)
        return model(tokens)

    def _logits(self, params: Any, adapters: Any, tokens: jax.Array) -> jax.Array:
        if adapters is None:
            return self._forward(params, tokens)
        if self.graph is not None:  # unmerged: s·(x a) b, no kernel-sized gradient
            return self.graph.merge(params, adapters=adapters, rest=self._rest)(tokens)
        return self._forward(lora_adapters.merge(params, adapters), tokens)

    def _loss(self, trainable: Any, params: Any, tokens: jax.Array) -> jax.Array:
        if self.adapters is None:
            params, trainable = trainable, None
        total, count = next_token_loss(self._logits(params, trainable, tokens[:, :-1]), tokens)
        return total / count

    def _auto(self, fn: Callable[..., Any], out: Any) -> Callable[..., Any]:
        # Sharded weights on an Explicit mesh: the model itself states no layouts, so it
        # runs with the compiler choosing them (its inputs and outputs keep theirs).
        return jax.sharding.auto_axes(fn, out_sharding=out) if self._explicit else fn

    def _init_fn(self, params: Any, adapters: Any) -> TrainState:
        trainable = params if adapters is None else adapters
        return TrainState(params, adapters, self.tx.init(trainable), jnp.zeros((), jnp.int32))

    def _step_fn(
        self, state: TrainState, tokens: jax.Array, refresh: bool = False
    ) -> tuple[TrainState, dict]:
        with_adapters = state.adapters is not None
        if self.graph is not None and not with_adapters:
            return self._projected_step(state, tokens, refresh)
        trainable = state.adapters if with_adapters else state.params
        loss_fn = self._auto(self._loss, P())
        loss, grads = jax.value_and_grad(loss_fn)(trainable, state.params, tokens)
        updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        new = TrainState(
            state.params if with_adapters else trainable,
            trainable if with_adapters else None,
            opt_state,
            state.step + 1,
        )
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def _projected_step(
        self, state: TrainState, tokens: jax.Array, refresh: bool
    ) -> tuple[TrainState, dict]:
        """One step whose backward pass yields coordinates, not weight gradients."""
        params = state.params
        probe_tree = lorajax.probes(state.opt_state, params, refresh=refresh)
        is_probe = lambda x: x is None or isinstance(x, Probe) or x is FULL_GRADIENT  # noqa: E731
        probes = jax.tree.map(
            lambda x: x if isinstance(x, Probe) else None, probe_tree, is_leaf=is_probe
        )
        fulls = jax.tree.map(
            lambda x, w: w if x is FULL_GRADIENT else None, probe_tree, params, is_leaf=is_probe
        )
        zeros = self.graph.zero_coords(probes)

        def loss_fn(
            coords: Any, full: Any, params: Any, probes: Any, tokens: jax.Array
        ) -> jax.Array:
            params = jax.tree.map(
                lambda w, f: w if f is None else f, params, full, is_leaf=lambda x: x is None
            )
            model = self.graph.merge(params, probes=probes, coords=coords, rest=self._rest)
            total, count = next_token_loss(model(tokens[:, :-1]), tokens)
            return total / count

        loss, (coords, full) = jax.value_and_grad(self._auto(loss_fn, P()), argnums=(0, 1))(
            zeros, fulls, params, probes, tokens
        )
        is_coord = lambda x: x is None or isinstance(x, Coordinates)  # noqa: E731
        grads = jax.tree.map(
            lambda w, c, f: c if c is not None else (f if f is not None else jnp.zeros_like(w)),
            params,
            coords,
            full,
            is_leaf=is_coord,
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, params)
        trained = jax.tree.map(lambda x: x is not None, probe_tree, is_leaf=is_probe)
        new_params = jax.tree.map(
            lambda w, u, t: (w + u.astype(w.dtype)) if t else w, params, updates, trained
        )
        received = [x for x in jax.tree.leaves(grads, is_leaf=is_coord) if x is not None]
        new = TrainState(new_params, None, opt_state, state.step + 1)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(received)}

    def _eval_fn(self, state: TrainState, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        def losses(params: Any, adapters: Any, tokens: jax.Array) -> Any:
            return next_token_loss(self._logits(params, adapters, tokens[:, :-1]), tokens)

        return self._auto(losses, (P(), P()))(state.params, state.adapters, tokens)

    # -- public ---------------------------------------------------------------------

    def _place_state(self, tree: Any, shardings: Any) -> Any:
        if self.mesh is None or tree is None:
            return tree
        return sharding.place(tree, shardings)

    def place_batch(self, batch: Any) -> jax.Array:
        """Puts a host batch of token ids on the devices (split over the data axes).

        In a multi-process run, ``batch`` is this process's rows of the global batch.

        Raises:
            ValueError: If the batch is not 2-D or not divisible over the data axes.
        """
        if not isinstance(batch, jax.Array):
            batch = np.asarray(batch) if self.mesh is not None else jnp.asarray(batch)
        if batch.ndim != 2 or batch.shape[1] < 2:
            raise ValueError(
                f"A batch must be (batch, seq + 1) token ids with seq >= 1, got shape "
                f"{tuple(batch.shape)}."
            )
        processes = jax.process_count() if self.mesh is not None else 1
        rows = batch.shape[0] * processes
        if rows % self._data_size:
            raise ValueError(
                f"The batch size {rows} must be divisible by the "
                f"{self._data_size} devices of the data axes {self._data_axes}."
            )
        if self.mesh is None:
            return batch
        batch_sharding = sharding.batch_sharding(self.mesh, self._data_axes)
        if processes > 1:  # this process's rows of the global batch
            return jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch))
        return jax.device_put(batch, batch_sharding)

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return jax.set_mesh(self.mesh)

    def _compile(self, state: TrainState, tokens: jax.Array, refresh: bool = False) -> Any:
        # One executable per batch shape (and refresh kind), shared by step() and memory().
        key = (tokens.shape, str(tokens.dtype), refresh)
        if key not in self._compiled:
            self._compiled[key] = self._step.lower(state, tokens, refresh).compile()
        return self._compiled[key]

    def refresh_due(self, state: TrainState) -> bool:
        """Whether the next step refreshes stored bases through a sketch (or full) backward.

        Such a step runs a second compiled program (its probes have other shapes). It is
        always ``False`` for the full-gradient path and for random bases.
        """
        if self.graph is None or not self._stored_bases or state.adapters is not None:
            return False
        return lorajax.refresh_due(state.opt_state)

    def init(self) -> TrainState:
        """The initial state: the params, the adapters and a fresh optimizer state."""
        with self._context():
            shardings = self.shardings or TrainState(None, None, None, None)
            params = self._place_state(self.params, shardings.params)
            adapters = self._place_state(self.adapters, shardings.adapters)
            return self._init(params, adapters)

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One training step on ``batch`` (``(batch, seq + 1)`` token ids).

        Returns:
            The new state and ``{"loss", "grad_norm"}`` (device scalars; ``loss`` is the
            mean next-token cross-entropy before the update).
        """
        tokens = self.place_batch(batch)
        refresh = self.refresh_due(state)
        with self._context():
            return self._compile(state, tokens, refresh)(state, tokens)

    def evaluate(self, state: TrainState, batches: Iterable[Any]) -> float:
        """Mean next-token cross-entropy (nats per token) over ``batches``.

        Raises:
            ValueError: If ``batches`` is empty.
        """
        total, count = 0.0, 0.0
        with self._context():
            for batch in batches:
                t, c = self._eval(state, self.place_batch(batch))
                total, count = total + float(t), count + float(c)
        if not count:
            raise ValueError("`batches` is empty: evaluation needs at least one batch.")
        return total / count

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model with the state's weights (adapters merged into the kernels)."""
        params = state.params
        if state.adapters is not None:
            params = lora_adapters.merge(params, state.adapters)
        return nnx.merge(self.graphdef, params, self._rest)

    def memory(self, state: TrainState, batch: Any, *, refresh: bool = False) -> dict[str, int]:
        """Byte counts of the compiled training step (``memory_analysis()``).

        ``peak_bytes`` is arguments + outputs + temporaries - aliased (donated) bytes:
        what the step needs at its peak, as XLA plans it.

        Args:
            state: The train state.
            batch: A batch of the shape to compile for.
            refresh: Measure the program of a refresh step of stored bases (see
                :meth:`refresh_due`) instead of a step between refreshes.
        """
        tokens = self.place_batch(batch)
        with self._context():
            mem = self._compile(state, tokens, refresh).memory_analysis()
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


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        state: The final train state.
        history: One dict per step: ``step``, ``loss``, ``grad_norm``, ``tokens_per_s``,
            ``seconds``.
    """

    state: TrainState
    history: list[dict[str, float]]


def fit(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[Any],
    steps: int,
    *,
    on_step: Callable[[Mapping[str, float]], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Runs ``steps`` training steps on batches drawn from ``batches``.

    Each step's loss is fetched before the next step starts, so ``seconds`` and
    ``tokens_per_s`` are the step's wall time (the first one includes compilation).

    Args:
        trainer: The :class:`Trainer`.
        state: Its current state.
        batches: An iterator of ``(batch, seq + 1)`` token-id arrays.
        steps: How many steps to run.
        on_step: Called with each step's metrics (e.g. to write ``metrics.jsonl``).
        progress: Show a progress bar with the loss and tokens/s.

    Returns:
        A :class:`FitResult`.

    Examples:
        >>> import itertools, numpy as np, optax
        >>> from flax import nnx
        >>> from lorajax import models, train
        >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
        ...                          num_hidden_layers=1, num_attention_heads=2,
        ...                          num_key_value_heads=1)
        >>> trainer = train.Trainer(models.Llama(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-2))
        >>> batches = itertools.repeat(np.arange(18).reshape(2, 9) % 32)
        >>> result = train.fit(trainer, trainer.init(), batches, 3, progress=False)
        >>> [row["step"] for row in result.history]
        [1, 2, 3]
    """
    static_int(steps, "steps")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="finetune", unit="step", dynamic_ncols=True)
    history = []
    try:
        for _ in range(steps):
            batch = np.asarray(next(batches))
            start = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            loss = float(metrics["loss"])
            seconds = time.perf_counter() - start
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            row = {
                "step": int(state.step),
                "loss": loss,
                "grad_norm": float(metrics["grad_norm"]),
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
            }
            history.append(row)
            if on_step is not None:
                on_step(row)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return FitResult(state, history)

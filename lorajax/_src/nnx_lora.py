r"""LoRA for Flax NNX models: adapted layers put in place by path pattern, and merged back.

:func:`add_lora` finds the ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum``
layers whose kernel path is selected by ``targets`` and replaces each, where it sits (a
module attribute, an ``nnx.List``, an ``nnx.Dict``, a list, dict or tuple), by a
:class:`LoRALayer` that keeps the original layer and adds the factors
``a: (*batch, n, r)`` and ``b: (*batch, r, m)`` in the kernel's matrix view (see
:class:`~lorajax.MatrixSpec`). The adapted layer computes

.. math::

    y = \mathrm{base}(x) + s \cdot x \,\Delta, \qquad
    \Delta = \mathrm{from\_matrix}(a b), \qquad
    s = \alpha / r \;\; (\text{or } \alpha / \sqrt{r} \text{ with rsLoRA}),

through the layer's own contraction. The factors are ``nnx.LoRAParam`` variables, so
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains the adapters only; a frozen ``a``
(LoRA-FA, LoRI) is a :class:`FrozenLoRAParam`, which that filter skips. The factors are
built by :func:`lorajax.adapters.init`, so every init, ``rank_pattern`` and
``alpha_pattern`` behaves as in adapter mode. :func:`merge_lora` folds
``W0 + s·a·b`` back into the kernels.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
    https://arxiv.org/abs/2106.09685.
    Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023,
    https://arxiv.org/abs/2312.03732.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from lorajax._src.adapters.init import init as adapters_init
from lorajax._src.adapters.merge import merge as adapters_merge
from lorajax._src.adapters.tree import lora_leaves
from lorajax._src.matrices import MatrixSpec
from lorajax._src.nnx_graph import (
    complete_targets,
    factor_partition,
    factor_variable,
    join_path,
    lookup,
    nest,
    replace_node,
    walk,
)
from lorajax._src.nnx_layer import SUPPORTED, FrozenLoRAParam, LoRALayer, layer_spec
from lorajax._src.targets import PRESETS, Targets, path_str, select_targets

__all__ = ["FrozenLoRAParam", "LoRALayer", "add_lora", "layer_spec", "merge_lora"]


def _as_key(key: Any, rngs: Any) -> jax.Array:
    if rngs is not None:
        if key is not None:
            raise ValueError("Pass either `key` or `rngs` to add_lora, not both.")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"`rngs` must be an nnx.Rngs, got {type(rngs).__name__}.")
        return rngs.params()
    if key is None:
        key = 0
    if isinstance(key, nnx.Rngs):
        return key.params()
    if isinstance(key, int) and not isinstance(key, bool):
        return jax.random.key(key)
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,)
    ):
        return key
    raise TypeError(
        f"`key` must be an int seed, a PRNG key or an nnx.Rngs, got {type(key).__name__}."
    )


def add_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Targets = "all-linear",
    init: str = "default",
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    key: int | jax.Array | nnx.Rngs | None = None,
    rngs: nnx.Rngs | None = None,
    grads: Any = None,
    sparsity: float | None = None,
    dtype: Any = jnp.float32,
) -> nnx.Module:
    r"""Puts LoRA adapters into the targeted linear layers of an NNX model, in place.

    Every ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` whose kernel path
    (the ``/``-joined module path plus ``/kernel``, e.g. ``"layers/0/attn/q_proj/kernel"``)
    is selected by ``targets`` is replaced, where it sits, by a :class:`LoRALayer`:

    .. math::

        y = \mathrm{base}(x) + s\, x\, \mathrm{from\_matrix}(a b),\qquad
        a \in \mathbb{R}^{(*\mathrm{batch}) \times n \times r},\;
        b \in \mathbb{R}^{(*\mathrm{batch}) \times r \times m},\qquad
        s = \alpha / r \text{ (or } \alpha/\sqrt{r}\text{)}.

    The factors come from :func:`lorajax.adapters.init` applied to the selected kernels,
    each read as matrices as its layer reads it (see :func:`layer_spec`), so ``init``,
    ``rank_pattern``, ``alpha_pattern`` and the scale behave exactly as in adapter mode;
    PiSSA and OLoRA also move the base kernels to ``W0 − s·a·b`` (the output is unchanged
    at init). ``a`` and ``b`` are ``nnx.LoRAParam`` variables, except a frozen ``a``
    (``"lora_fa"``, ``"lori"``), which is a :class:`FrozenLoRAParam`. When the kernel
    carries ``out_sharding`` names, the factors get the matching names (input side on
    ``a``, output side on ``b``, the rank axis unsharded), and sharded kernels get
    factors placed on the same mesh.

    Layers shared by several parents get one adapter, put at every place they appear.
    Layers already adapted are left alone (merge them first to stack adapters).

    Args:
        model: The model; edited in place.
        rank: The adapter rank ``r``.
        alpha: The scale numerator; ``None`` means ``alpha = rank`` (``s = 1``).
        targets: Which kernels to adapt, as in :func:`lorajax.adapters.init` but matched
            against the model's ``nnx.Param`` paths: ``None`` (every supported layer),
            ``"all-linear"``, ``"attention"``, ``"mlp"``, a regex searched in the path, a
            callable ``(path, array) -> bool | MatrixSpec | None`` or a nested dict shaped
            like ``nnx.state(model, nnx.Param).to_pure_dict()`` (or a prefix of it) with
            bool/``None`` leaves. The matrix view of each kernel always comes from its
            layer. A regex, callable or dict that selects a parameter of any other layer
            is an error; ``None`` and the presets skip such parameters.
        init: One of :data:`lorajax.adapters.INITS` (``"default"``, ``"gaussian"``,
            ``"pissa"``, ``"olora"``, ``"lora_ga"``, ``"lora_fa"``, ``"lori"``) or
            ``"pissa_niter_<k>"``.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern: Per-path ranks, as in :func:`lorajax.adapters.init`.
        alpha_pattern: Per-path alphas, as in :func:`lorajax.adapters.init`.
        key: An int seed, a PRNG key or an ``nnx.Rngs`` for the random inits (default 0).
        rngs: An ``nnx.Rngs`` (its ``params`` stream is used); instead of ``key``.
        grads: For ``"lora_ga"`` only: the gradient of the loss with respect to the
            model's parameters, averaged over a few batches, e.g.
            ``nnx.grad(loss)(model, batch)`` (an ``nnx.State``) or its
            ``to_pure_dict()``; only the selected kernels' entries are read.
        sparsity: For ``"lori"`` only: the fraction of ``b``'s entries a LoRI mask will
            drop, as in :func:`lorajax.adapters.init`.
        dtype: The dtype of the factors.

    Returns:
        ``model``, with adapters in place.

    Raises:
        ValueError: if ``targets`` selects no supported layer, or (explicitly) a
            parameter that no supported layer owns; for ``init="lora_ga"`` without
            ``grads``; for a rank larger than a kernel allows or other bad arguments
            (from :func:`lorajax.adapters.init`).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.up_proj = nnx.Linear(4, 8, rngs=rngs)
        ...         self.down_proj = nnx.Linear(8, 2, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.down_proj(jax.nn.relu(self.up_proj(x)))
        >>> model = lorajax.nnx.add_lora(MLP(nnx.Rngs(0)), rank=2, alpha=4)
        >>> model.up_proj.lora_a.shape, model.up_proj.lora_b.shape, model.up_proj.scale
        ((4, 2), (2, 8), 2.0)
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
        >>> x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
        >>> loss = lambda m: jnp.mean((m(x) - y) ** 2)
        >>> before = loss(model)
        >>> grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        >>> _ = optimizer.update(model, grads)
        >>> bool(loss(model) < before)
        True
        >>> model = lorajax.nnx.merge_lora(model)
        >>> type(model.up_proj).__name__
        'Linear'

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
        https://arxiv.org/abs/2106.09685.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
    if isinstance(model, SUPPORTED):
        raise ValueError(
            f"`model` is itself an nnx.{type(model).__name__}; add_lora replaces layers "
            "inside a model. Wrap it, e.g. nnx.Sequential(layer)."
        )
    if init == "lora_ga" and grads is None:
        raise ValueError(
            "`init`='lora_ga' needs `grads`: the gradient of the loss with respect to the "
            "model's parameters, averaged over a few batches, e.g. "
            "grads=nnx.grad(loss_fn)(model, batch). Pass it, or pick another init."
        )
    if isinstance(targets, MatrixSpec):
        raise ValueError(
            f"`targets`={targets!r}: add_lora reads every kernel as its layer does, so a "
            "MatrixSpec has no use here. Pass None to adapt every supported layer, or a "
            "preset, regex, callable or nested dict to choose some."
        )
    key = _as_key(key, rngs)

    # Every nnx.Param of the model by path, and the supported layers among its modules.
    params: dict[tuple[Any, ...], jax.Array] = {}
    layers: dict[tuple[Any, ...], nnx.Module] = {}
    occurrences: dict[int, list[tuple[Any, ...]]] = {}
    for path, node in walk(model, stop=lambda n: isinstance(n, LoRALayer)):
        if isinstance(node, nnx.Param) and not isinstance(node, nnx.LoRAParam):
            params.setdefault(path, node.get_value())
        elif isinstance(node, SUPPORTED) and path:
            occurrences.setdefault(id(node), []).append(path)
            if len(occurrences[id(node)]) == 1:
                layers[(*path, "kernel")] = node
    if not params:
        raise ValueError("`model` has no nnx.Param to adapt.")

    nested = nest(params)
    specs, paths = select_targets(nested, complete_targets(targets, nested))
    explicit = targets is not None and not (isinstance(targets, str) and targets in PRESETS)
    by_str = {join_path(p): p for p in layers}
    owners = {join_path(p[:-1]) for p in layers}  # a layer's other params (bias) are ignored
    chosen: dict[tuple[Any, ...], MatrixSpec] = {}
    for spec, p in zip(specs, paths):
        if spec is None:
            continue
        if p in by_str:
            path = by_str[p]
            chosen[path] = layer_spec(layers[path], join_path(path[:-1]))
        elif explicit and p.rsplit("/", 1)[0] not in owners:
            raise ValueError(
                f"`targets`={targets!r} selects {p!r}, which is not a parameter of an "
                f"{', '.join('nnx.' + t.__name__ for t in SUPPORTED)} layer; add_lora cannot "
                "adapt it. Narrow `targets` to kernels of those layers."
            )
    if not chosen:
        raise ValueError(
            f"`targets`={targets!r} selects no kernel of an nnx.Linear, nnx.LinearGeneral "
            f"or nnx.Einsum layer. Their kernel paths are {sorted(by_str) or '(none)'}."
        )

    kernels = nest({p: layers[p].kernel.get_value() for p in chosen})
    kernel_grads = None
    if grads is not None:
        pure = grads.to_pure_dict() if isinstance(grads, nnx.State) else grads
        kernel_grads = nest({p: lookup(pure, p) for p in chosen})
    adapters, new_kernels = adapters_init(
        key,
        kernels,
        rank=rank,
        alpha=alpha,
        targets=nest(chosen),
        init=init,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        grads=kernel_grads,
        sparsity=sparsity,
        dtype=dtype,
    )
    new_by_path = {
        path_str(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(new_kernels)[0]
    }
    for where, lora in lora_leaves(adapters):
        path = by_str[where]
        layer = layers[path]
        kernel = layer.kernel
        new = new_by_path[where]
        old = kernel.get_value()
        if new is not old:
            new = new.astype(old.dtype)
            if isinstance(getattr(old, "sharding", None), NamedSharding):
                new = jax.device_put(new, old.sharding)
            kernel.set_value(new)
        names = factor_partition(kernel.get_metadata().get("out_sharding"), lora.layout)
        a_kind = FrozenLoRAParam if lora.frozen_a else nnx.LoRAParam
        adapted = LoRALayer(
            layer,
            factor_variable(a_kind, lora.a, kernel, None if names is None else names[0]),
            factor_variable(nnx.LoRAParam, lora.b, kernel, None if names is None else names[1]),
            scale=lora.scale,
            alpha=lora.alpha,
            rank=lora.rank,
            layout=lora.layout,
            sparsity=lora.sparsity,
        )
        for module_path in occurrences[id(layer)]:
            replace_node(model, module_path, adapted)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    r"""Folds every adapter of ``model`` into its kernel and puts the base layers back.

    Each :class:`LoRALayer` is replaced, where it sits, by its base layer with

    .. math:: W \leftarrow W_0 + s \cdot \mathrm{from\_matrix}(a b),

    computed in float32 and cast to the kernel's dtype (the kernel variable, its
    metadata and sharding are kept). No LoRA variables remain.

    Args:
        model: A model with adapters (from :func:`add_lora`); edited in place.

    Returns:
        ``model``, with plain layers and merged kernels.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
        >>> model = lorajax.nnx.add_lora(model, rank=1, targets=None)
        >>> model.layers[0].lora_b[...] = jnp.ones((1, 2))
        >>> y = model(jnp.ones((1, 3)))
        >>> merged = lorajax.nnx.merge_lora(model)
        >>> bool(jnp.allclose(merged(jnp.ones((1, 3))), y, atol=1e-5))
        True
        >>> len(nnx.state(merged, nnx.LoRAParam))
        0
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
    found: dict[int, tuple[LoRALayer, list[tuple[Any, ...]]]] = {}
    for path, node in walk(model, stop=lambda n: isinstance(n, LoRALayer)):
        if isinstance(node, LoRALayer):
            found.setdefault(id(node), (node, []))[1].append(path)
    for adapted, module_paths in found.values():
        kernel = adapted.base.kernel
        w0 = kernel.get_value()
        merged = adapters_merge({"kernel": w0}, {"kernel": adapted.as_lora()})["kernel"]
        if isinstance(getattr(w0, "sharding", None), NamedSharding):
            merged = jax.device_put(merged, w0.sharding)
        kernel.set_value(merged)
        for module_path in module_paths:
            replace_node(model, module_path, adapted.base)
    return model

"""Partition rules: regular expressions on parameter paths to ``PartitionSpec``.

A rule's spec describes the *trailing* axes of a leaf; leading axes beyond it (the layer
axis of a scanned stack) are not sharded. Every parameter must match a rule: a leaf that
should be replicated says so with ``P()``, so nothing is replicated by omission.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorajax._src.adapters.tree import LoRA, is_lora
from lorajax._src.state import matrix_spec

__all__ = ["LLAMA_RULES", "Rules", "adapter_specs", "param_specs", "path_name", "to_shardings"]

Rules = Sequence[tuple[str, P]]

#: Rules for :class:`lorajax.models.Llama` (kernels are ``(d_in, d_out)``):
#:
#: - q/k/v, gate and up projections: ``d_in`` over ``fsdp``, ``d_out`` (heads, MLP
#:   columns) over ``tensor``;
#: - o and down projections: ``d_in`` over ``tensor``, ``d_out`` over ``fsdp``;
#: - the embedding ``(vocab, d)``: vocab over ``tensor``, width over ``fsdp``; the
#:   untied ``lm_head`` ``(d, vocab)`` the transpose;
#: - RMSNorm scales: replicated.
LLAMA_RULES: tuple[tuple[str, P], ...] = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"norm/scale$", P()),
)


def path_name(path: Sequence[Any]) -> str:
    """A key path as ``"a/b/0/c"``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axis_names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _fit(spec: P, name: str, shape: tuple[int, ...], mesh: Any) -> P:
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(
            f"The rule spec {spec} for {name!r} has {len(entries)} axes, but the leaf has "
            f"shape {shape}. Give a spec with at most {len(shape)} entries."
        )
    entries = (None,) * (len(shape) - len(entries)) + entries
    if mesh is None:
        return P(*entries)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    kept = []
    for dim, entry in zip(shape, entries):
        names = tuple(n for n in _axis_names(entry) if n in sizes)
        count = math.prod(sizes[n] for n in names)
        if dim % count:
            raise ValueError(
                f"{name!r} has shape {shape}: its axis of size {dim} cannot be split over "
                f"mesh axes {names} ({count} devices). Choose mesh sizes that divide it, or "
                "add a rule for this leaf."
            )
        kept.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*kept)


def param_specs(params: Any, rules: Rules = LLAMA_RULES, *, mesh: Any = None) -> Any:
    """The ``PartitionSpec`` of every parameter, by the first rule whose regex matches.

    Paths are ``"/"``-joined keys (``model/layers/0/self_attn/q_proj/kernel``) and are
    matched with ``re.search``. A spec covers a leaf's trailing axes; leading axes (a
    scanned layer axis) are left unsharded.

    Args:
        params: A params tree (arrays or ``jax.ShapeDtypeStruct``).
        rules: ``(regex, PartitionSpec)`` pairs, first match wins.
        mesh: When given, axes the mesh lacks are dropped (so one rule set serves every
            mesh), and each sharded size is checked to divide its axis.

    Returns:
        A tree like ``params`` with a ``PartitionSpec`` at each leaf.

    Raises:
        ValueError: If a leaf matches no rule, a spec has more axes than its leaf, or a
            size does not divide over its mesh axes.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax.sharding import param_specs
        >>> params = {"mlp": {"up_proj": {"kernel": jnp.zeros((2, 8, 16))}},
        ...           "norm": {"scale": jnp.zeros(8)}}
        >>> param_specs(params)
        {'mlp': {'up_proj': {'kernel': P(None, 'fsdp', 'tensor')}}, 'norm': {'scale': P(None,)}}
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def one(path: Any, leaf: Any) -> P:
        name = path_name(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return _fit(spec, name, tuple(leaf.shape), mesh)
        raise ValueError(
            f"No partition rule matches {name!r} (shape {tuple(leaf.shape)}). Add a rule "
            "for it; use PartitionSpec() to replicate it on purpose."
        )

    return jax.tree_util.tree_map_with_path(one, params)


def adapter_specs(adapters: Any, specs: Any) -> Any:
    """The specs of a LoRA adapter tree, derived from its kernels' specs.

    For a kernel laid out ``(*batch, d_in, d_out)`` as ``(…, i, o)``: ``a (*batch, d_in,
    r)`` gets ``(…, i, None)``, ``b (*batch, r, d_out)`` gets ``(…, None, o)`` and a DoRA
    magnitude ``(*batch, d_out)`` gets ``(…, o)``. The rank axis is never sharded.

    Args:
        adapters: An adapter tree (``LoRA`` at adapted leaves, ``None`` elsewhere).
        specs: The params' specs (:func:`param_specs`).

    Returns:
        A tree like ``adapters`` whose ``LoRA`` leaves hold ``PartitionSpec`` in ``a``,
        ``b`` and ``magnitude``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax import adapters
        >>> from lorajax.sharding import adapter_specs, param_specs
        >>> params = {"q_proj": {"kernel": jnp.ones((16, 8))}}
        >>> lora, _ = adapters.init(jax.random.key(0), params, rank=2)
        >>> out = adapter_specs(lora, param_specs(params))["q_proj"]["kernel"]
        >>> out.a, out.b
        (P('fsdp', None), P(None, 'tensor'))
    """

    def one(lora: Any, spec: Any) -> Any:
        if not isinstance(lora, LoRA):
            return None
        if lora.layout is None:  # a plain (*batch, d_in, d_out) kernel
            *batch, d_in, d_out = tuple(spec) + (None,) * (lora.a.ndim - len(spec))
        else:
            entries = tuple(spec) + (None,) * (len(lora.layout.shape) - len(spec))
            *batch, d_in, d_out = matrix_spec(lora.layout, entries)
        return lora.replace(
            a=P(*batch, d_in, None),
            b=P(*batch, None, d_out),
            magnitude=None if lora.magnitude is None else P(*batch, d_out),
        )

    return jax.tree.map(one, adapters, specs, is_leaf=lambda x: x is None or is_lora(x))


def to_shardings(specs: Any, mesh: Any) -> Any:
    """``NamedSharding(mesh, spec)`` at every ``PartitionSpec`` leaf of ``specs``.

    Args:
        specs: A tree with ``PartitionSpec`` leaves (e.g. from :func:`param_specs`).
        mesh: The mesh the specs name axes of.

    Returns:
        The same tree with ``NamedSharding`` leaves.

    Examples:
        >>> from jax.sharding import PartitionSpec as P
        >>> from lorajax.sharding import make_mesh, to_shardings
        >>> to_shardings({"w": P("fsdp")}, make_mesh({"fsdp": -1}))["w"].spec
        P('fsdp',)
    """
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

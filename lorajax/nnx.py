"""LoRA for Flax NNX models: add adapters by path pattern, train them, merge them back.

:func:`add_lora` replaces the targeted ``nnx.Linear``, ``nnx.LinearGeneral`` and
``nnx.Einsum`` layers, in place, by adapted layers that keep the original layer and add
the factors ``a: (*batch, n, r)`` and ``b: (*batch, r, m)`` of ``W0 + s·a·b`` as
``nnx.LoRAParam`` variables, so that ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``
trains only the adapters. Targets, inits (PiSSA, OLoRA, LoRA-GA, LoRA-FA, LoRI, ...),
``rank_pattern`` and ``alpha_pattern`` are those of :func:`lorajax.adapters.init`.
Unlike NNX's own ``nnx.LoRA``, the adapter output is scaled by ``s = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA). :func:`merge_lora` folds every adapter back into its
kernel and restores the plain layers.
"""

from lorajax._src.nnx_layer import FrozenLoRAParam, LoRALayer
from lorajax._src.nnx_lora import add_lora, merge_lora
from lorajax._src.nnx_probe import (
    CoordinateVariable,
    ProbedEinsum,
    ProbedGraph,
    ProbedLinear,
    ProbedLinearGeneral,
    ProbeVariable,
)

__all__ = [
    "add_lora",
    "merge_lora",
    "LoRALayer",
    "FrozenLoRAParam",
    "ProbedGraph",
    "ProbedLinear",
    "ProbedLinearGeneral",
    "ProbedEinsum",
    "ProbeVariable",
    "CoordinateVariable",
]

"""Sharding for multi-device and multi-host fine-tuning.

- Meshes with ``data``, ``fsdp`` and ``tensor`` axes: :func:`make_mesh`,
  :func:`parse_mesh` (``"data=2,fsdp=4"``), :func:`batch_axes`, :func:`batch_sharding`.
- Partition rules, regular expressions on parameter paths to ``PartitionSpec``:
  :data:`LLAMA_RULES`, :func:`param_specs`, :func:`adapter_specs`, :func:`to_shardings`.
- The sharding of every optimizer state, derived from its params'
  (:func:`state_shardings`), and :func:`place` to put values on their shardings.

Derived layouts, for a kernel ``W (d_in, d_out)`` laid out ``(i, o)``:

=======================================  ======================
state leaf                               layout
=======================================  ======================
left basis ``U (d_in, r)``               ``(i, None)``
right basis ``V (d_out, r)``             ``(o, None)``
left coordinates ``Uᵀ G (r, d_out)``     ``(None, o)``
right coordinates ``G V (d_in, r)``      ``(i, None)``
inner moments                            as their coordinates
adapter ``a (d_in, r)`` / ``b (r, d_out)``  ``(i, None)`` / ``(None, o)``
keys, counts                             replicated
=======================================  ======================

:class:`lorajax.train.Trainer` takes a mesh and rules and places the params, the
adapters and every state leaf this way.

Examples:
    >>> import jax.numpy as jnp
    >>> from lorajax import sharding
    >>> mesh = sharding.make_mesh({"fsdp": -1})
    >>> params = {"q_proj": {"kernel": jnp.zeros((8, 4))}}
    >>> sharding.to_shardings(sharding.param_specs(params, mesh=mesh), mesh)["q_proj"]["kernel"].spec
    P('fsdp', None)
"""  # noqa: E501

from lorajax._src.hlo import (
    COLLECTIVE_KINDS,
    Collective,
    collective_bytes,
    collective_elements,
    collectives,
)
from lorajax._src.mesh import (
    AXIS_TYPES,
    MESH_AXES,
    batch_axes,
    batch_sharding,
    make_mesh,
    parse_mesh,
)
from lorajax._src.rules import LLAMA_RULES, Rules, adapter_specs, param_specs, to_shardings
from lorajax._src.state_sharding import place, state_shardings

__all__ = [
    "MESH_AXES",
    "AXIS_TYPES",
    "parse_mesh",
    "make_mesh",
    "batch_axes",
    "batch_sharding",
    "Rules",
    "LLAMA_RULES",
    "param_specs",
    "adapter_specs",
    "to_shardings",
    "state_shardings",
    "place",
    "COLLECTIVE_KINDS",
    "Collective",
    "collectives",
    "collective_bytes",
    "collective_elements",
]

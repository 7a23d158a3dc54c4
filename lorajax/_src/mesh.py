"""Device meshes for fine-tuning: ``data``, ``fsdp`` and ``tensor`` axes.

- ``data``: pure data parallelism; params and states are replicated over it.
- ``fsdp``: the batch is split over it too, and every matrix is sharded along one of
  its axes (ZeRO-3 / fully-sharded data parallelism): weights are gathered for the
  forward pass and gradients reduce-scattered back.
- ``tensor``: Megatron-style tensor parallelism: the projections are split by heads and
  by MLP columns; the batch is not split over it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXIS_TYPES",
    "MESH_AXES",
    "batch_axes",
    "batch_sharding",
    "make_mesh",
    "parse_mesh",
]

#: The mesh axes the rules know, in the order they appear in a mesh.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

#: Axis types by the name the command line uses.
AXIS_TYPES: dict[str, AxisType] = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}

_ENTRY = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*$")


def parse_mesh(text: str) -> dict[str, int]:
    """Reads a mesh shape such as ``"data=2,fsdp=4"``.

    One axis may be ``-1``: it takes every device the others leave (see
    :func:`make_mesh`).

    Args:
        text: Comma-separated ``axis=size`` entries, axes from :data:`MESH_AXES`.

    Returns:
        ``{axis: size}`` in the order of :data:`MESH_AXES`.

    Raises:
        ValueError: On a malformed entry, an unknown or repeated axis, or a size that is
            neither positive nor ``-1``.

    Examples:
        >>> from lorajax.sharding import parse_mesh
        >>> parse_mesh("fsdp=4, data=2")
        {'data': 2, 'fsdp': 4}
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"A mesh must look like 'data=2,fsdp=4', got {text!r}.")
    shape: dict[str, int] = {}
    for entry in text.split(","):
        match = _ENTRY.match(entry)
        if not match:
            raise ValueError(
                f"Mesh entry {entry.strip()!r} in {text!r} must be axis=size, e.g. 'fsdp=4'."
            )
        name, size = match.group(1), int(match.group(2))
        if name not in MESH_AXES:
            raise ValueError(f"Unknown mesh axis {name!r} in {text!r}: use {', '.join(MESH_AXES)}.")
        if name in shape:
            raise ValueError(f"Mesh axis {name!r} appears twice in {text!r}.")
        if size == 0 or size < -1:
            raise ValueError(f"Mesh axis {name}={size} in {text!r}: a size is >= 1 or -1.")
        shape[name] = size
    return {name: shape[name] for name in MESH_AXES if name in shape}


def make_mesh(
    shape: Mapping[str, int] | str | None = None,
    *,
    axis_types: str | AxisType = "explicit",
    devices: Sequence[Any] | None = None,
) -> jax.sharding.Mesh:
    """A mesh over all devices (of every process) with ``data``/``fsdp``/``tensor`` axes.

    Args:
        shape: ``{axis: size}`` or a string for :func:`parse_mesh`. One size may be
            ``-1`` (every device the others leave). Default: ``{"fsdp": -1}``.
        axis_types: ``"explicit"`` (sharding in types; lorajax states the layout of each
            intermediate) or ``"auto"`` (the compiler propagates shardings), or a
            ``jax.sharding.AxisType``.
        devices: The devices to use (default: ``jax.devices()``).

    Returns:
        A ``jax.sharding.Mesh`` whose axis names follow :data:`MESH_AXES` order.

    Raises:
        ValueError: If the sizes do not multiply to the number of devices, or on a bad
            ``shape`` or ``axis_types``.

    Examples:
        >>> from lorajax.sharding import make_mesh
        >>> mesh = make_mesh({"data": -1}, axis_types="auto")
        >>> mesh.axis_names, mesh.size == len(__import__("jax").devices())
        (('data',), True)
    """
    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = {"fsdp": -1}
    if isinstance(shape, str):
        shape = parse_mesh(shape)
    else:
        shape = parse_mesh(",".join(f"{k}={v}" for k, v in dict(shape).items()) or "")
    if isinstance(axis_types, str):
        if axis_types not in AXIS_TYPES:
            raise ValueError(
                f"`axis_types` must be one of {', '.join(AXIS_TYPES)}, got {axis_types!r}."
            )
        axis_type = AXIS_TYPES[axis_types]
    elif isinstance(axis_types, AxisType):
        axis_type = axis_types
    else:
        raise ValueError(f"`axis_types` must be 'explicit' or 'auto', got {axis_types!r}.")
    free = [name for name, size in shape.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"Only one mesh axis may be -1, got {free}.")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"The mesh {shape} cannot fill {len(devices)} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {len(devices)}."
            )
        shape[free[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(
            f"The mesh {shape} has {fixed} devices but {len(devices)} are available; make "
            "the sizes multiply to the device count, or give one axis -1."
        )
    names = tuple(shape)
    return jax.make_mesh(
        tuple(shape.values()), names, axis_types=(axis_type,) * len(names), devices=devices
    )


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: ``data`` and ``fsdp`` where present.

    A mesh without either (e.g. a tensor-only mesh, or one with other names) splits the
    batch over none of them.

    Args:
        mesh: The mesh.

    Returns:
        The names of its ``data`` and ``fsdp`` axes, in mesh order.

    Examples:
        >>> from lorajax.sharding import batch_axes, make_mesh
        >>> batch_axes(make_mesh({"fsdp": -1}))
        ('fsdp',)
    """
    return tuple(name for name in mesh.axis_names if name in ("data", "fsdp"))


def batch_sharding(mesh: jax.sharding.Mesh, axes: Sequence[str] | None = None) -> NamedSharding:
    """The sharding of a ``(batch, seq)`` array: rows split over ``axes``.

    Args:
        mesh: The mesh.
        axes: The axes to split rows over (default: :func:`batch_axes`).

    Returns:
        ``NamedSharding(mesh, P(axes))``.

    Examples:
        >>> from lorajax.sharding import batch_sharding, make_mesh
        >>> batch_sharding(make_mesh({"data": -1})).spec
        P('data',)
    """
    axes = batch_axes(mesh) if axes is None else tuple(axes)
    return NamedSharding(mesh, P(axes if axes else None))

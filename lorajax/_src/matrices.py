"""How an N-D parameter is read as a (batch of) matrices.

A kernel in Flax layout maps inputs to outputs by ``y = x @ W`` with ``W`` of shape
``(d_in, d_out)``. Real parameters are often N-D: attention kernels
``(d, heads, head_dim)``, stacked (scanned) layers ``(L, d_in, d_out)``. A
:class:`MatrixSpec` says which axes are the input side, which the output side and which
index independent matrices; :meth:`MatrixSpec.resolve` checks it against a shape and
returns a :class:`MatrixLayout` that moves arrays to and from the batched matrix view
``(*batch, n, m)`` with ``n = prod(in dims)`` and ``m = prod(out dims)``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import jax

__all__ = ["MatrixLayout", "MatrixSpec"]


def _as_axes(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Normalises an int or a sequence of ints to a tuple, with a clear error."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {value!r}.")
    try:
        return (operator.index(value),)  # type: ignore[arg-type]
    except TypeError:
        pass
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {value!r}.")
    axes = []
    for ax in value:
        if isinstance(ax, bool):
            raise TypeError(f"`{name}` must hold ints, got {value!r}.")
        try:
            axes.append(operator.index(ax))
        except TypeError:
            raise TypeError(f"`{name}` must hold ints, got {value!r}.") from None
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """Which axes of an N-D leaf form the matrix that lorajax projects.

    Every axis of the leaf must be named exactly once: in ``in_axes`` (the input side,
    ``d_in``, which a left basis ``U: (d_in, r)`` spans), in ``out_axes`` (the output
    side, ``d_out``) or in ``batch_axes`` (independent matrices, each with its own basis,
    as for stacked or scanned layers). Several input or output axes are flattened in the
    order given.

    Args:
        in_axes: Axis or axes of the input side. Negative values count from the end.
        out_axes: Axis or axes of the output side.
        batch_axes: Axes that index independent matrices.

    Examples:
        >>> import lorajax
        >>> lorajax.MatrixSpec().resolve((512, 2048)).matrix_shape
        (512, 2048)
        >>> stacked = lorajax.MatrixSpec(batch_axes=(0,))  # (layers, d_in, d_out)
        >>> stacked.resolve((4, 512, 2048)).matrix_shape
        (4, 512, 2048)
        >>> heads = lorajax.MatrixSpec(in_axes=0, out_axes=(1, 2))  # (d, heads, head_dim)
        >>> heads.resolve((576, 9, 64)).matrix_shape
        (576, 576)
    """

    in_axes: int | tuple[int, ...] = -2
    out_axes: int | tuple[int, ...] = -1
    batch_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        in_axes = _as_axes(self.in_axes, "in_axes")
        out_axes = _as_axes(self.out_axes, "out_axes")
        batch_axes = _as_axes(self.batch_axes, "batch_axes")
        if not in_axes:
            raise ValueError("`in_axes` must name at least one axis, got ().")
        if not out_axes:
            raise ValueError("`out_axes` must name at least one axis, got ().")
        object.__setattr__(self, "in_axes", in_axes if len(in_axes) > 1 else in_axes[0])
        object.__setattr__(self, "out_axes", out_axes if len(out_axes) > 1 else out_axes[0])
        object.__setattr__(self, "batch_axes", batch_axes)

    def resolve(self, shape: Sequence[int], where: str = "") -> MatrixLayout:
        """Checks this spec against a leaf shape and returns its layout.

        Args:
            shape: The shape of the leaf.
            where: The leaf's path, used in error messages.

        Returns:
            The resolved :class:`MatrixLayout`.

        Raises:
            ValueError: if an axis is out of range, named twice, or not named at all.
        """
        shape = tuple(int(d) for d in shape)
        ndim = len(shape)
        at = f" of leaf {where!r}" if where else ""
        if ndim < 2:
            raise ValueError(
                f"A MatrixSpec needs a leaf with at least 2 axes, but the leaf{at} has shape "
                f"{shape}. Exclude it from `targets` (return None for it)."
            )
        groups = {
            "in_axes": _as_axes(self.in_axes, "in_axes"),
            "out_axes": _as_axes(self.out_axes, "out_axes"),
            "batch_axes": _as_axes(self.batch_axes, "batch_axes"),
        }
        normal: dict[str, tuple[int, ...]] = {}
        for name, axes in groups.items():
            for ax in axes:
                if not -ndim <= ax < ndim:
                    raise ValueError(
                        f"{self!r}: {name} holds axis {ax}, out of range for the leaf{at} "
                        f"with shape {shape} ({ndim} axes). Use axes in [{-ndim}, {ndim})."
                    )
            normal[name] = tuple(ax % ndim for ax in axes)
        seen: dict[int, str] = {}
        for name, axes in normal.items():
            for ax in axes:
                if ax in seen:
                    raise ValueError(
                        f"{self!r}: axis {ax} of the leaf{at} with shape {shape} is named "
                        f"in both {seen[ax]} and {name}. Each axis must appear exactly once."
                    )
                seen[ax] = name
        missing = sorted(set(range(ndim)) - set(seen))
        if missing:
            raise ValueError(
                f"{self!r} does not name axes {missing} of the leaf{at} with shape {shape}. "
                "Add them to batch_axes (one matrix per index, e.g. stacked layers) or to "
                "in_axes/out_axes."
            )
        return MatrixLayout(
            shape=shape,
            batch_axes=normal["batch_axes"],
            in_axes=normal["in_axes"],
            out_axes=normal["out_axes"],
        )


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """A :class:`MatrixSpec` resolved against one shape (hashable, static).

    Attributes:
        shape: The leaf's shape.
        batch_axes: Normalised batch axes.
        in_axes: Normalised input axes.
        out_axes: Normalised output axes.
    """

    shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @property
    def perm(self) -> tuple[int, ...]:
        """Transpose that puts batch, input and output axes in that order."""
        return self.batch_axes + self.in_axes + self.out_axes

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the batch of matrices."""
        return tuple(self.shape[ax] for ax in self.batch_axes)

    @property
    def n(self) -> int:
        """Input dimension ``d_in`` of each matrix."""
        return math.prod(self.shape[ax] for ax in self.in_axes)

    @property
    def m(self) -> int:
        """Output dimension ``d_out`` of each matrix."""
        return math.prod(self.shape[ax] for ax in self.out_axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Shape of the matrix view, ``(*batch, n, m)``."""
        return (*self.batch_shape, self.n, self.m)

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """Moves a leaf-shaped array to the matrix view ``(*batch, n, m)``."""
        if self.perm != tuple(range(len(self.shape))):
            x = x.transpose(self.perm)
        if x.shape != self.matrix_shape:
            x = x.reshape(self.matrix_shape)
        return x

    def from_matrix(self, y: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_matrix`."""
        permuted = tuple(self.shape[ax] for ax in self.perm)
        if y.shape != permuted:
            y = y.reshape(permuted)
        if self.perm != tuple(range(len(self.shape))):
            inverse = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))
            y = y.transpose(inverse)
        return y

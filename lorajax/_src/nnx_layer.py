"""The adapted layer of :mod:`lorajax.nnx`: a supported NNX layer plus scaled LoRA factors.

Also how the kernel of each supported layer is read as a (batch of) matrices
(:func:`layer_spec`), and the variable type of a frozen factor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorajax._src.adapters.tree import LoRA
from lorajax._src.matrices import MatrixLayout, MatrixSpec

__all__ = ["SUPPORTED", "FrozenLoRAParam", "LoRALayer", "layer_spec"]

#: The layer types :func:`add_lora` can adapt.
SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


class FrozenLoRAParam(nnx.Variable):
    """A LoRA factor that is not trained (the ``a`` of LoRA-FA and LoRI).

    Examples:
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
        >>> model = lorajax.nnx.add_lora(model, rank=2, targets=None, init="lora_fa")
        >>> type(model.layers[0].lora_a).__name__, type(model.layers[0].lora_b).__name__
        ('FrozenLoRAParam', 'LoRAParam')

    It is neither an ``nnx.Param`` nor an ``nnx.LoRAParam``: optimizers built with
    ``wrt=nnx.LoRAParam`` (or ``wrt=nnx.Param``) leave it untouched.
    """


def _einsum_roles(einsum_str: str, kernel_ndim: int, where: str) -> MatrixSpec:
    """The matrix view of an ``nnx.Einsum`` kernel, read off its equation."""
    eq = einsum_str.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(
            f"The nnx.Einsum at {where!r} has einsum_str={einsum_str!r}; add_lora needs an "
            "explicit two-operand equation 'input,kernel->output'."
        )
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs or len(set(rhs)) != len(rhs) or len(rhs) != kernel_ndim:
        raise ValueError(
            f"The nnx.Einsum at {where!r} has kernel subscripts {rhs!r} for a kernel with "
            f"{kernel_ndim} axes; add_lora needs one distinct letter per kernel axis and no "
            "ellipsis on the kernel."
        )
    batch, ins, outs = [], [], []
    for ax, c in enumerate(rhs):
        if c in lhs and c in out:
            batch.append(ax)
        elif c in lhs:
            ins.append(ax)
        elif c in out:
            outs.append(ax)
        else:
            raise ValueError(
                f"The nnx.Einsum at {where!r} ({einsum_str!r}) sums kernel axis {c!r} on its "
                "own, so the kernel is not a linear map from input to output features; it "
                "cannot take LoRA. Exclude it from `targets`."
            )
    if not ins or not outs:
        missing = "contracted with the input" if not ins else "in the output"
        raise ValueError(
            f"The nnx.Einsum at {where!r} ({einsum_str!r}) has no kernel axis {missing}, so "
            "its kernel is not a matrix from input to output features; exclude it from "
            "`targets`."
        )
    return MatrixSpec(tuple(ins), tuple(outs), tuple(batch))


def layer_spec(layer: nnx.Module, where: str = "") -> MatrixSpec:
    """How the kernel of a supported layer is read as a (batch of) matrices.

    - ``nnx.Linear``: ``(n, m)`` as is. A kernel with extra leading axes, e.g.
      ``(L, n, m)`` for layers stacked to run under ``jax.lax.scan``, gets one matrix per
      index of those axes (they are batch axes).
    - ``nnx.LinearGeneral``: kernel ``(*batch, *in_features, *out_features)``; the
      ``batch_axis`` axes index independent matrices.
    - ``nnx.Einsum``: from the equation: kernel axes contracted with the input are the
      input side, kernel axes that reach the output are the output side, and axes shared
      by input, kernel and output index independent matrices.

    Args:
        layer: An ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum``.
        where: The layer's path, for error messages.

    Returns:
        The layer's :class:`~lorajax.MatrixSpec`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from lorajax._src.nnx_layer import layer_spec
        >>> layer_spec(nnx.Einsum("bnd,ndh->bnh", (2, 8, 4), rngs=nnx.Rngs(0)))
        MatrixSpec(in_axes=1, out_axes=2, batch_axes=(0,))
        >>> stacked = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> stacked.kernel.set_value(jnp.zeros((2, 4, 3)))  # two layers, stacked
        >>> layer_spec(stacked)
        MatrixSpec(in_axes=1, out_axes=2, batch_axes=(0,))
    """
    if isinstance(layer, nnx.Einsum):
        if layer.einsum_str is None:
            raise ValueError(
                f"The nnx.Einsum at {where!r} has no einsum_str of its own (it is passed at "
                "call time), so add_lora cannot tell its input and output axes. Give the "
                "layer its equation when you build it, or exclude it from `targets`."
            )
        return _einsum_roles(layer.einsum_str, layer.kernel.get_value().ndim, where)
    if isinstance(layer, nnx.LinearGeneral):
        nb, ni = len(layer.batch_axis), len(layer.in_features)
        ndim = nb + ni + len(layer.out_features)
        return MatrixSpec(tuple(range(nb, nb + ni)), tuple(range(nb + ni, ndim)), tuple(range(nb)))
    if isinstance(layer, nnx.Linear):
        ndim = layer.kernel.get_value().ndim
        if ndim < 2:
            raise ValueError(
                f"The nnx.Linear at {where!r} has a kernel with {ndim} axes; add_lora needs "
                "(*batch, d_in, d_out)."
            )
        return MatrixSpec(ndim - 2, ndim - 1, tuple(range(ndim - 2)))
    raise TypeError(
        f"add_lora cannot adapt the {type(layer).__name__} at {where!r}; it supports "
        f"{', '.join('nnx.' + t.__name__ for t in SUPPORTED)}."
    )


def _contract(layer: nnx.Module, x: jax.Array, dw: jax.Array, einsum_str: str | None, kw: dict):
    """Runs ``layer``'s contraction of ``x`` with the kernel-shaped ``dw`` (no bias)."""
    if isinstance(layer, nnx.Einsum):
        return jnp.einsum(einsum_str, x, dw, precision=layer.precision, **kw)
    axis = tuple(ax % x.ndim for ax in layer.axis)
    batch_axis = tuple(ax % x.ndim for ax in layer.batch_axis)
    nb = len(batch_axis)
    kernel_in = tuple(range(nb, nb + len(axis)))
    dims = ((axis, kernel_in), (batch_axis, tuple(range(nb))))
    return jax.lax.dot_general(x, dw, dims, precision=layer.precision, **kw)


class LoRALayer(nnx.Module):
    r"""A supported layer plus a scaled low-rank adapter: ``base(x) + s·x·from_matrix(a b)``.

    Built by :func:`add_lora`; the original layer is kept as ``base`` with its kernel,
    bias, metadata and dtype behaviour unchanged.

    - ``nnx.Linear``: the adapter path is ``s·((x a) b)``, never forming ``a b``. For a
      stacked kernel ``(L, n, m)`` (layers run under ``jax.lax.scan``) the factors are
      ``(L, n, r)`` and ``(L, r, m)``, and the layer is called on one layer's slice.
    - ``nnx.LinearGeneral`` and ``nnx.Einsum``: the adapter path forms the kernel-shaped
      ``Δ = s·from_matrix(a b)`` on every call and contracts ``x`` with it as the layer
      contracts its kernel (same axes, same equation).

    Inputs and factors go through the layer's ``promote_dtype`` with its ``dtype`` and its
    ``precision``; the adapter output is cast to the base output's dtype before the sum.
    The adapter path uses ``jax.lax.dot_general``/``jnp.einsum``: a custom ``dot_general``
    or ``einsum_op`` of the layer (e.g. a quantised one) applies to the base path only.

    Attributes:
        base: The original layer.
        lora_a: ``(*batch, n, r)``, an ``nnx.LoRAParam`` (a :class:`FrozenLoRAParam` when
            the init freezes ``a``).
        lora_b: ``(*batch, r, m)``, an ``nnx.LoRAParam``.
        scale: ``s``.
        alpha: The ``alpha`` behind ``s``.
        rank: ``r``.
        layout: How the base kernel is read as matrices.
        sparsity: LoRI's target sparsity of ``b`` (``None`` for other inits).

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import lorajax.nnx
        >>> model = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
        >>> layer = lorajax.nnx.add_lora(model, rank=2, alpha=8, targets=None).layers[0]
        >>> isinstance(layer, lorajax.nnx.LoRALayer), layer.scale, layer.as_lora().b.shape
        (True, 4.0, (2, 5))
    """

    def __init__(
        self,
        base: nnx.Module,
        lora_a: nnx.Variable,
        lora_b: nnx.Variable,
        *,
        scale: float,
        alpha: float,
        rank: int,
        layout: MatrixLayout,
        sparsity: float | None = None,
    ):
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = float(scale)
        self.alpha = float(alpha)
        self.rank = int(rank)
        self.layout = layout
        self.sparsity = sparsity

    def as_lora(self) -> LoRA:
        """The adapter as a :class:`lorajax.adapters.LoRA` node (for merging, saving)."""
        return LoRA(
            a=self.lora_a.get_value(),
            b=self.lora_b.get_value(),
            scale=self.scale,
            alpha=self.alpha,
            rank=self.rank,
            frozen_a=isinstance(self.lora_a, FrozenLoRAParam),
            layout=self.layout,
            sparsity=self.sparsity,
        )

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """Applies the base layer and adds the scaled adapter path.

        Args:
            inputs: As for the base layer.
            *args: Passed to the base layer (``nnx.Einsum`` takes ``einsum_str``).
            **kwargs: Passed to the base layer (e.g. ``out_sharding``).

        Returns:
            The base output plus the adapter output, in the base output's dtype.
        """
        base = self.base
        linear = not isinstance(base, nnx.LinearGeneral | nnx.Einsum)
        if linear and (self.lora_a.get_value().ndim != 2 or self.lora_b.get_value().ndim != 2):
            raise ValueError(
                f"This adapted nnx.Linear holds stacked factors a {self.lora_a.shape} and b "
                f"{self.lora_b.shape} (one adapter per layer of a stacked kernel); call it on "
                "one layer's slice, e.g. inside the jax.lax.scan over the stacked state."
            )
        y = base(inputs, *args, **kwargs)
        einsum_str = None
        if isinstance(base, nnx.Einsum):
            einsum_str = args[0] if args else kwargs.get("einsum_str")
            einsum_str = (einsum_str or base.einsum_str).replace(" ", "")
            spec = _einsum_roles(einsum_str, len(self.layout.shape), "this layer")
            if spec.resolve(self.layout.shape) != self.layout:
                raise ValueError(
                    f"einsum_str={einsum_str!r} reads the kernel with {spec!r}, but the "
                    f"adapter was built for the layout {self.layout!r}; call the layer with "
                    "an equation that keeps the kernel's input and output axes."
                )
        kw = {}
        if kwargs.get("out_sharding") is not None:
            kw["out_sharding"] = kwargs["out_sharding"]
        a, b = self.lora_a.get_value(), self.lora_b.get_value()
        dtype = base.dtype
        if dtype is None:  # inferred as the layer infers it, also under strict promotion
            with jax.numpy_dtype_promotion("standard"):
                dtype = jnp.result_type(inputs, a, b)
        x, a, b = base.promote_dtype((inputs, a, b), dtype=dtype)
        prec = base.precision
        if not linear:
            dw = self.layout.from_matrix(self.scale * jnp.matmul(a, b, precision=prec))
            delta = _contract(base, x, dw, einsum_str, kw)
        else:
            # Only the arrays' own shapes are used, so a slice taken from stacked layers
            # (whose static layout still describes the stack) runs as a plain layer.
            last = (((x.ndim - 1,), (0,)), ((), ()))
            h = self.scale * jax.lax.dot_general(x, a, last, precision=prec)
            delta = jax.lax.dot_general(h, b, last, precision=prec, **kw)
        return y + delta.astype(y.dtype)

r"""DoRA: weight-decomposed low-rank adaptation.

DoRA splits each adapted kernel into a direction and a magnitude. The direction is the
LoRA-updated kernel normalised per output unit; the magnitude is a trainable vector with
one entry per output unit. In the matrix view ``(n, m) = (d_in, d_out)`` of a kernel
(``y = x @ W``), an output unit is a column, so

.. math::

    W' = m \odot \frac{W_0 + s\,a\,b}{\lVert W_0 + s\,a\,b \rVert_c},
    \qquad \lVert V \rVert_{c,j} = \Big(\sum_i V_{ij}^2\Big)^{1/2},

with ``m: (d_out,)`` scaling column ``j`` of the direction by ``m_j``. As in the paper
(§4.3), the column norm is treated as a constant in backpropagation, which saves the
memory of its graph and changes the gradient of ``a`` and ``b`` only by a small
correction.

References:
    Liu et al., *DoRA: Weight-Decomposed Low-Rank Adaptation*, 2024.
    https://arxiv.org/abs/2402.09353
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src.adapters.tree import LoRA, check_adapters_match, map_lora

__all__ = ["dora", "dora_merge_matrix"]


def _column_norms(v: jax.Array) -> jax.Array:
    """The Euclidean norm of every column of ``v: (*batch, n, m)``, shape ``(*batch, m)``."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=-2))


def dora_merge_matrix(
    w0: Float[Array, "*batch n m"],
    delta: Float[Array, "*batch n m"],
    magnitude: Float[Array, "*batch m"],
) -> Float[Array, "*batch n m"]:
    r"""The DoRA kernel in the matrix view.

    .. math::

        W' = m \odot \frac{W_0 + \Delta}{\operatorname{sg}\big(\lVert W_0 + \Delta
        \rVert_c\big)}

    where :math:`\lVert\cdot\rVert_c` is the norm of each column (output unit, taken
    over the ``n`` axis) and :math:`\operatorname{sg}` is ``jax.lax.stop_gradient``:
    gradients flow through the numerator and the magnitude only (DoRA §4.3). A column
    whose norm is exactly zero is divided by one instead (it stays zero).

    Args:
        w0: The frozen kernel(s) ``(*batch, n, m)``.
        delta: The low-rank update ``s·a·b``, shaped like ``w0``.
        magnitude: The magnitude vector(s) ``(*batch, m)``.

    Returns:
        The DoRA kernel(s) ``(*batch, n, m)`` in float32.

    Raises:
        ValueError: if the shapes do not fit together.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax._src.adapters.dora import dora_merge_matrix
        >>> w0 = jnp.array([[3.0, 0.0], [4.0, 2.0]])
        >>> dora_merge_matrix(w0, jnp.zeros((2, 2)), jnp.array([10.0, 1.0]))
        Array([[6., 0.],
               [8., 1.]], dtype=float32)

    References:
        Liu et al., *DoRA: Weight-Decomposed Low-Rank Adaptation*, 2024.
        https://arxiv.org/abs/2402.09353
    """
    w0_shape, delta_shape, mag_shape = (tuple(jnp.shape(x)) for x in (w0, delta, magnitude))
    if len(w0_shape) < 2:
        raise ValueError(
            f"`w0` must be a (batch of) matrices (*batch, n, m), got shape {w0_shape}. Read "
            "N-D kernels through their MatrixLayout (layout.to_matrix) first."
        )
    if delta_shape != w0_shape:
        raise ValueError(
            f"`delta` must have the shape of `w0` {w0_shape}, got {delta_shape}. Pass s·a·b "
            "in the same matrix view as the kernel."
        )
    want = (*w0_shape[:-2], w0_shape[-1])
    if mag_shape != want:
        raise ValueError(
            f"`magnitude` must have shape (*batch, m) = {want} for a kernel of shape "
            f"{w0_shape} (one entry per output column), got {mag_shape}."
        )
    v = w0.astype(jnp.float32) + delta.astype(jnp.float32)
    norm = jax.lax.stop_gradient(_column_norms(v))
    norm = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    ratio = magnitude.astype(jnp.float32) / norm
    return v * ratio[..., None, :]


def _initial_magnitude(lora: LoRA, kernel: jax.Array) -> LoRA:
    assert lora.layout is not None  # checked by check_adapters_match
    w0 = lora.layout.to_matrix(jnp.asarray(kernel)).astype(jnp.float32)
    return lora.replace(magnitude=_column_norms(w0 + lora.delta_matrix()))


def dora(params: Any, adapters: Any) -> Any:
    r"""Turns LoRA adapters into DoRA adapters by giving each a magnitude vector.

    Every :class:`~lorajax.adapters.LoRA` gets ``magnitude`` set to the column norms of
    its current kernel (float32, shape ``(*batch, d_out)``):

    .. math::

        m_j = \big\lVert (W_0 + s\,a\,b)_{:,j} \big\rVert_2 .

    So the DoRA kernel :math:`m \odot (W_0 + s a b) / \lVert W_0 + s a b \rVert_c`
    equals the LoRA kernel :math:`W_0 + s a b` at the moment of conversion, and with
    the usual ``b = 0`` it is :math:`\lVert W_0 \rVert_c`, the paper's init. An existing
    magnitude is recomputed. :func:`lorajax.adapters.merge` then builds the DoRA kernel
    for every LoRA whose magnitude is set; train ``a``, ``b`` and ``magnitude`` together.

    Args:
        params: The base parameters the adapters were built for.
        adapters: A tree of ``LoRA`` / ``None`` with the structure of ``params``.

    Returns:
        The adapters with ``magnitude`` set on every LoRA.

    Raises:
        ValueError: if ``adapters`` does not fit ``params``.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> from lorajax.adapters import LoRA
        >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])}
        >>> lora = LoRA(a=jnp.ones((2, 1)), b=jnp.zeros((1, 2)), rank=1,
        ...             layout=lorajax.MatrixSpec().resolve((2, 2)))
        >>> lorajax.adapters.dora(params, {"kernel": lora})["kernel"].magnitude
        Array([5., 2.], dtype=float32)

    References:
        Liu et al., *DoRA: Weight-Decomposed Low-Rank Adaptation*, 2024.
        https://arxiv.org/abs/2402.09353
    """
    check_adapters_match(params, adapters)
    return map_lora(_initial_magnitude, adapters, params)

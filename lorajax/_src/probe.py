r"""Probes and coordinates: the two leaf types of the projected backward.

For a targeted matmul ``y = x W`` (``W: (n, m)``, ``x: (t, n)``, ``dY = ∂L/∂y``) the
full weight gradient is ``G = xᵀ dY``. A model that takes *probes* computes instead

.. math::

    y = x W + (x P_\ell) Z_\ell + (x Z_r) P_r^\top, \qquad Z_\ell = 0,\; Z_r = 0,

with ``P_ℓ: (n, a)`` and ``P_r: (m, b)``, and differentiates only the zero
*coordinates* ``Z_ℓ: (a, m)`` and ``Z_r: (n, b)``. Their gradients are

.. math::

    \frac{\partial L}{\partial Z_\ell} = P_\ell^\top G = (x P_\ell)^\top dY, \qquad
    \frac{\partial L}{\partial Z_r} = G P_r = x^\top (dY P_r),

which cost ``2t(na + am)`` and ``2t(mb + nb)`` flops, and ``G`` is never formed.

- Between refreshes ``P_ℓ = U`` and ``P_r = V`` (the bases of the next update), so the
  gradients are exactly the coordinates :func:`lorajax.low_rank` projects.
- At a refresh of a gradient-derived basis, ``P_ℓ = Ψᵀ`` and ``P_r = Ω`` are the test
  matrices of a single-pass sketch, and the gradients are the co-range sketch ``Ψ G``
  and the range sketch ``G Ω`` (Tropp et al. 2017).

A side that is not used has width 0 (``a = 0`` or ``b = 0``): the shapes of a model's
probe tree then never depend on which sides a method uses. Every array may carry
leading batch axes (stacked layers), as the leaf's :class:`~lorajax.MatrixSpec` says.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

__all__ = ["Coordinates", "Probe"]


class Probe(NamedTuple):
    """The matrices a targeted matmul multiplies by, in the kernel's matrix view.

    Attributes:
        left: ``P_ℓ`` with shape ``(*batch, n, a)``: the input-side probe.
        right: ``P_r`` with shape ``(*batch, m, b)``: the output-side probe.
    """

    left: jax.Array
    right: jax.Array


class Coordinates(NamedTuple):
    """Gradients of the zero coordinates of a probed matmul: ``P_ℓᵀ G`` and ``G P_r``.

    Pass them to :func:`lorajax.low_rank`'s ``update`` in place of a targeted leaf's
    full gradient.

    Attributes:
        left: ``P_ℓᵀ G`` with shape ``(*batch, a, m)``.
        right: ``G P_r`` with shape ``(*batch, n, b)``.
    """

    left: jax.Array
    right: jax.Array

r"""Projecting a gradient onto its bases and mapping a step back: the two maps of low_rank.

For a matrix ``G: (*batch, n, m)`` with a left basis ``U: (*batch, n, r)`` and a right
basis ``V: (*batch, m, r)``:

- :func:`project` gives the coordinates ``Uᵀ G`` (left), ``G V`` (right) or both
  (:class:`~lorajax.TwoSidedCoords`, ``a = G V`` and ``b = Uᵀ G``);
- :func:`from_probes` reads the same coordinates off a projected backward pass
  (:class:`~lorajax.Coordinates` whose probes were the bases), without ``G``;
- :func:`project_back` maps a step ``N`` in coordinates to a full-shape update:

  .. math::

     \text{left: } U N, \qquad \text{right: } N V^\top, \qquad
     \text{both: } \lambda\, U N_b + A\, N_a V^\top,

  with ``A = I − U Uᵀ`` (``align="lora_pro"``) or ``A = I`` (``align="sum"``) and ``λ``
  the LoRA+ ratio.

With the identity as the step, ``"lora_pro"`` returns ``P_U G + G P_V − P_U G P_V``, the
orthogonal projection of ``G`` onto the tangent space ``{U Y + Z Vᵀ}`` of rank-r adapters
(``P_U = U Uᵀ``, ``P_V = V Vᵀ``), and ``"sum"`` returns ``P_U G + G P_V``, the equivalent
gradient of vanilla LoRA.

References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    2024, https://arxiv.org/abs/2403.03507.
    Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", 2024,
    https://arxiv.org/abs/2407.18242.
    Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", 2024,
    https://arxiv.org/abs/2402.12354.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src import shard
from lorajax._src.probe import Coordinates
from lorajax._src.state import TwoSidedCoords

__all__ = ["ALIGNS", "SIDES", "from_probes", "project", "project_back"]

SIDES = ("left", "right", "both")
ALIGNS = ("lora_pro", "sum")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"`side` must be one of {SIDES}, got {side!r}.")


def project(
    side: str,
    u: Float[Array, "*batch n r"] | None,
    v: Float[Array, "*batch m r"] | None,
    g: Float[Array, "*batch n m"],
    *,
    precision: jax.lax.PrecisionLike = None,
) -> Any:
    """The coordinates of ``g`` in the bases: ``Uᵀ G``, ``G V`` or both.

    Args:
        side: ``"left"``, ``"right"`` or ``"both"``.
        u: The left basis (``None`` for ``side="right"``).
        v: The right basis (``None`` for ``side="left"``).
        g: The gradient matrices.
        precision: Matmul precision.

    Returns:
        ``(*batch, r, m)`` for left, ``(*batch, n, r)`` for right, and a
        :class:`~lorajax.TwoSidedCoords` ``(a=G V, b=Uᵀ G)`` for both.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax._src.project import project
        >>> u = jnp.eye(3)[:, :1]  # e1
        >>> g = jnp.arange(6.0).reshape(3, 2)
        >>> project("left", u, None, g)  # the first row of g
        Array([[0., 1.]], dtype=float32)
    """
    _check_side(side)
    left = right = None
    if side in ("left", "both"):
        left = shard.einsum("...nr,...nm->...rm", u, g, precision=precision)
    if side in ("right", "both"):
        right = shard.einsum("...nm,...mr->...nr", g, v, precision=precision)
    if side == "both":
        return TwoSidedCoords(a=right, b=left)
    return left if side == "left" else right


def from_probes(side: str, coords: Coordinates) -> Any:
    """The coordinates of a projected backward pass whose probes were the bases.

    With probes ``P_ℓ = U`` and ``P_r = V``, the gradients of the zero coordinates are
    ``Coordinates(left=Uᵀ G, right=G V)``; this arranges them as :func:`project` does.

    Args:
        side: ``"left"``, ``"right"`` or ``"both"``.
        coords: The gradients of the zero coordinates.

    Returns:
        What :func:`project` returns for the same bases and ``G``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax import Coordinates
        >>> from lorajax._src.project import from_probes
        >>> c = Coordinates(left=jnp.ones((2, 5)), right=jnp.ones((4, 2)))
        >>> type(from_probes("both", c)).__name__, from_probes("left", c).shape
        ('TwoSidedCoords', (2, 5))
    """
    _check_side(side)
    if side == "left":
        return coords.left
    if side == "right":
        return coords.right
    return TwoSidedCoords(a=coords.right, b=coords.left)


def project_back(
    side: str,
    u: Float[Array, "*batch n r"] | None,
    v: Float[Array, "*batch m r"] | None,
    step: Any,
    *,
    align: str = "lora_pro",
    lora_plus_ratio: Any = 1.0,
    precision: jax.lax.PrecisionLike = None,
) -> Float[Array, "*batch n m"]:
    r"""Maps a step in coordinates back to a full-shape update.

    .. math::

       \text{left: } U N, \quad \text{right: } N V^\top, \quad
       \text{both: } \lambda\, U N_b + A\, N_a V^\top,\;
       A = I - U U^\top\ (\text{lora\_pro}) \text{ or } I\ (\text{sum}).

    The two-sided update is one product ``[A N_a | λU] [Vᵀ ; N_b]``, so ``ΔW`` is written
    once.

    Args:
        side: ``"left"``, ``"right"`` or ``"both"``.
        u: The left basis, with orthonormal columns for ``align="lora_pro"``.
        v: The right basis.
        step: ``N`` shaped like the coordinates (a :class:`~lorajax.TwoSidedCoords`
            for both).
        align: ``"lora_pro"`` or ``"sum"`` (two-sided only).
        lora_plus_ratio: ``λ``, the b-block's step multiplier (two-sided only).
        precision: Matmul precision.

    Returns:
        ``ΔW`` with shape ``(*batch, n, m)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax import TwoSidedCoords
        >>> from lorajax._src.project import project, project_back
        >>> e = jnp.eye(3)
        >>> g = jnp.arange(9.0).reshape(3, 3)
        >>> u, v = e[:, :1], e[:, :1]
        >>> tangent = project_back("both", u, v, project("both", u, v, g))
        >>> tangent  # first row and first column of g: P_U G + G P_V - P_U G P_V
        Array([[0., 1., 2.],
               [3., 0., 0.],
               [6., 0., 0.]], dtype=float32)
    """
    _check_side(side)
    if align not in ALIGNS:
        raise ValueError(f"`align` must be one of {ALIGNS}, got {align!r}.")
    if side == "left":
        return shard.einsum("...nr,...rm->...nm", u, step, precision=precision)
    if side == "right":
        return shard.einsum("...nr,...mr->...nm", step, v, precision=precision)
    a = step.a
    if align == "lora_pro":
        inside = shard.einsum("...nr,...ns->...rs", u, a, precision=precision)
        a = a - shard.einsum("...nr,...rs->...ns", u, inside, precision=precision)
    left = jnp.concatenate([a, u * jnp.asarray(lora_plus_ratio, u.dtype)], axis=-1)
    right = jnp.concatenate([jnp.swapaxes(v, -1, -2), step.b], axis=-2)
    return shard.einsum("...nk,...km->...nm", left, right, precision=precision)

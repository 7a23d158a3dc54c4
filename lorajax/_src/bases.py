"""The basis families of :func:`lorajax.low_rank` and the subspace-overlap metric.

- ``"svd"``: the top singular vectors of the current gradient, from an exact SVD
  (GaLore). It gathers the whole matrix when it is sharded.
- ``"randomized_svd"``: the same subspace estimated by :func:`randomized_svd`, warm
  started from the previous basis; only skinny blocks cross devices.
- ``"random"``: Gaussian ``N(0, 1/r)`` entries, so that ``E[P Pᵀ] = I`` (Flora). The
  matrix is regenerated from a key and never stored.
- ``"random_orthogonal"``: a Gaussian draw orthonormalised by QR, also regenerated from a
  key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src import shard

__all__ = ["BASES", "STORED_BASES", "exact_svd", "random_basis", "subspace_overlap"]

BASES = ("svd", "randomized_svd", "random", "random_orthogonal")
STORED_BASES = ("svd", "randomized_svd")


def exact_svd(
    g: Float[Array, "*batch n m"], rank: int
) -> tuple[Float[Array, "*batch n rank"], Float[Array, "*batch m rank"]]:
    """Left and right top-``rank`` singular vectors from ``jnp.linalg.svd`` (GaLore)."""
    u, _, vt = jnp.linalg.svd(shard.gather_matrix(g), full_matrices=False)
    return u[..., :rank], jnp.swapaxes(vt[..., :rank, :], -1, -2)


def random_basis(
    key: jax.Array,
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    spec: tuple | None,
    *,
    orthonormal: bool,
) -> jax.Array:
    """A ``(*batch, d, r)`` random basis: Gaussian ``N(0, 1/r)`` or orthonormal columns."""
    x = shard.normal(key, shape, dtype, spec)
    if orthonormal:
        return shard.like(jnp.linalg.qr(shard.gather_matrix(x))[0], x)
    return x * jnp.asarray(shape[-1] ** -0.5, dtype)


def subspace_overlap(
    reference: Float[Array, "*batch d r"], basis: Float[Array, "*batch d s"]
) -> Float[Array, "*batch"]:
    r"""How much of the subspace spanned by ``reference`` ``basis`` spans.

    .. math:: \operatorname{overlap}(U_\star, U) = \|Q_\star^\top Q\|_F^2 / r

    where ``Q⋆`` and ``Q`` are orthonormal bases of the two column spaces and ``r`` is the
    number of columns of ``reference``. It is 1 when ``basis`` contains the reference
    subspace and about ``s/d`` for a random ``basis``.

    Args:
        reference: The reference basis ``(*batch, d, r)``, e.g. exact singular vectors.
        basis: The basis to score ``(*batch, d, s)``.

    Returns:
        The overlap in ``[0, 1]``, one value per matrix of the batch.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> e = jnp.eye(4)
        >>> float(lorajax.subspace_overlap(e[:, :2], e[:, :3]))
        1.0
        >>> float(lorajax.subspace_overlap(e[:, :2], e[:, 1:3]))
        0.5
    """
    q_ref = jnp.linalg.qr(reference.astype(jnp.float32))[0]
    q = jnp.linalg.qr(basis.astype(jnp.float32))[0]
    cross = jnp.einsum("...dr,...ds->...rs", q_ref, q)
    return jnp.sum(cross**2, axis=(-2, -1)) / reference.shape[-1]

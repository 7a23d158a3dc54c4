"""The basis families of :func:`lorajax.low_rank` and the subspace-overlap metric.

- ``"svd"``: the top singular vectors of the current gradient, from an exact SVD
  (GaLore). It gathers the whole matrix when it is sharded.
- ``"randomized_svd"``: the same subspace estimated by :func:`randomized_svd`, warm
  started from the previous basis; only skinny blocks cross devices.
- ``"random"``: Gaussian ``N(0, 1/r)`` entries, so that ``E[P Pᵀ] = I`` (Flora). The
  matrix is regenerated from a key and never stored.
- ``"random_orthogonal"``: a Gaussian draw orthonormalised (its polar factor, which is
  uniformly distributed over orthonormal bases), also regenerated from a key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from lorajax._src import shard

__all__ = [
    "BASES",
    "STORED_BASES",
    "exact_svd",
    "grouped_normals",
    "orthonormalize",
    "per_matrix",
    "polar_orthonormalize",
    "subspace_overlap",
]

BASES = ("svd", "randomized_svd", "random", "random_orthogonal")
STORED_BASES = ("svd", "randomized_svd")


def per_matrix(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
    """Applies a LAPACK-backed factorisation to each matrix of ``x`` ``(*batch, r, c)``.

    On CPU, jaxlib spreads a batched LAPACK call over the thread pool that also runs
    the devices' programs; with several (e.g. simulated) CPU devices busy at once that
    pool starves and the program hangs. Looping over the batch keeps every call
    unbatched there. Other platforms get the batched call.
    """
    batch = x.shape[:-2]
    if not batch:
        return fn(x)

    def one_at_a_time(x: jax.Array) -> Any:
        out = jax.lax.map(fn, x.reshape(-1, *x.shape[-2:]))
        return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)

    return jax.lax.platform_dependent(x, cpu=one_at_a_time, default=fn)


def exact_svd(
    g: Float[Array, "*batch n m"], rank: int
) -> tuple[Float[Array, "*batch n rank"], Float[Array, "*batch m rank"]]:
    """Left and right top-``rank`` singular vectors from ``jnp.linalg.svd`` (GaLore)."""
    u, _, vt = per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), shard.gather_matrix(g))
    return u[..., :rank], jnp.swapaxes(vt[..., :rank, :], -1, -2)


def orthonormalize(x: jax.Array) -> jax.Array:
    """Householder QR of a skinny ``(*batch, d, k)`` block, laid out like ``x``."""
    q = per_matrix(lambda a: jnp.linalg.qr(a)[0], shard.gather_matrix(x))
    return shard.like(q, x)


def polar_orthonormalize(x: jax.Array) -> jax.Array:
    r"""The orthonormal factor of a well-conditioned ``(*batch, d, k)`` block.

    .. math:: Q = X (X^\top X)^{-1/2}

    the orthonormal basis of ``span(X)`` closest to ``X``. It needs one ``k × k``
    eigendecomposition and one skinny matmul, and under sharding only the ``k × k`` Gram
    matrix is reduced across devices. Squaring the condition number is harmless for
    Gaussian draws (``cond ≈ (√d + √k)/(√d − √k)``); use :func:`orthonormalize` for
    ill-conditioned blocks. Like QR's factor, the result is uniformly (Haar) distributed
    when ``X`` is Gaussian.
    """
    gram = shard.einsum("...dr,...ds->...rs", x, x, precision=jax.lax.Precision.HIGHEST)
    w, v = per_matrix(jnp.linalg.eigh, gram)
    inv_sqrt = jnp.einsum("...rk,...k,...sk->...rs", v, jax.lax.rsqrt(w), v)
    return shard.einsum("...dr,...rs->...ds", x, inv_sqrt.astype(x.dtype))


Request = tuple[tuple[int, ...], Any, Any, str]  # (shape, dtype, explicit spec, kind)


def grouped_normals(key: jax.Array, requests: Sequence[Request]) -> list[jax.Array]:
    """Random blocks for many matrices from one draw.

    All requests share a single flat standard-normal draw from ``key`` (so a tree of
    hundreds of matrices compiles one RNG graph, not hundreds). Requests of equal shape,
    dtype, layout and kind are then stacked and post-processed together:

    - ``"gaussian"``: entries ``N(0, 1)``;
    - ``"basis"``: a Gaussian basis with entries ``N(0, 1/r)`` (``r`` the last axis);
    - ``"orthonormal"``: orthonormal columns (the polar factor of the Gaussian draw).

    Args:
        key: Raw ``uint32[2]`` key data.
        requests: ``(shape, dtype, explicit_spec, kind)`` per block.

    Returns:
        The blocks, in the order of ``requests``. They are a deterministic function of
        ``key`` and of the whole list of requests.
    """
    # Offsets depend on shapes, dtypes and kinds only, so the values do not change with
    # the layouts asked for (a sharded run draws exactly what an unsharded one does).
    groups: dict[tuple, list[int]] = {}
    for position, (shape, dtype, _, kind) in enumerate(requests):
        groups.setdefault((tuple(shape), jnp.dtype(dtype), kind), []).append(position)
    sizes = [len(members) * math.prod(group[0]) for group, members in groups.items()]
    out: list[Any] = [None] * len(requests)
    if not sizes:
        return out
    # A 1-D draw compiles far faster than a stacked N-D one on XLA:CPU.
    flat = jax.random.normal(jax.random.wrap_key_data(key), (sum(sizes),), jnp.float32)
    offset = 0
    for ((shape, dtype, kind), members), size in zip(groups.items(), sizes):
        block = flat[offset : offset + size].reshape(len(members), *shape).astype(dtype)
        offset += size
        by_spec: dict[Any, list[int]] = {}
        for j, position in enumerate(members):
            by_spec.setdefault(requests[position][2], []).append(j)
        for spec, rows in by_spec.items():
            part = block if len(rows) == len(members) else block[np.asarray(rows)]
            if spec is not None:
                part = jax.sharding.reshard(part, P(None, *spec))
            if kind == "orthonormal":
                part = polar_orthonormalize(part)
            elif kind == "basis":
                part = part * jnp.asarray(shape[-1] ** -0.5, dtype)
            for i, j in enumerate(rows):
                out[members[j]] = part[i]
    return out


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

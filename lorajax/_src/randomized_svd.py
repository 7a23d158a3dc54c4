"""Randomized SVD (Halko, Martinsson and Tropp, 2011), batched and sharding-aware."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src import shard
from lorajax._src.bases import orthonormalize as _orthonormalize
from lorajax._src.bases import per_matrix

__all__ = ["randomized_svd", "sketched_svd"]


def randomized_svd(
    g: Float[Array, "*batch n m"],
    rank: int,
    *,
    key: jax.Array,
    oversample: int = 16,
    power_iters: int = 2,
    warm_start: Float[Array, "*batch n r"] | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> tuple[
    Float[Array, "*batch n rank"], Float[Array, "*batch rank"], Float[Array, "*batch m rank"]
]:
    r"""Top-``rank`` singular triplets of ``g`` by a randomized range finder.

    With ``k = rank + oversample`` (at most ``min(n, m)``):

    1. Sketch the range of ``g``: ``Y = g Ω`` with Gaussian ``Ω: (m, k)``, or, with a
       warm start, ``Y = g gᵀ [U₀ | Ω']`` where ``U₀`` is the previous basis and
       ``Ω': (n, k - r)`` Gaussian columns fill the oversampling.
    2. ``power_iters`` times: ``Y ← g · orth(gᵀ · orth(Y))``.
    3. ``Q = orth(Y)``, ``B = Qᵀ g`` (``k × m``), ``B = Ũ S Ṽᵀ`` and ``U = Q Ũ[:, :rank]``,
       ``V = Ṽ[:, :rank]``.

    The cost is ``O(nmk(2q + 1))`` against ``O(nm·min(n, m))`` for an exact SVD. When
    ``g`` is sharded, every collective moves a skinny ``(n, k)`` or ``(k, m)`` block,
    never ``g`` itself.

    Args:
        g: A matrix or a batch of matrices ``(*batch, n, m)``.
        rank: How many singular triplets to return.
        key: A PRNG key for the Gaussian sketch.
        oversample: Extra sketch columns ``p``; more improves accuracy.
        power_iters: Power iterations ``q``; each sharpens a slowly decaying spectrum.
        warm_start: A previous left basis ``(*batch, n, r)`` with ``r <= rank`` to start
            the subspace iteration from (e.g. the basis before a refresh).
        precision: Matmul precision passed to ``jnp.einsum``.

    Returns:
        ``(U, S, V)`` with ``U: (*batch, n, rank)``, ``S: (*batch, rank)`` (descending) and
        ``V: (*batch, m, rank)``; ``g ≈ U diag(S) Vᵀ``.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        >>> a = jnp.linalg.qr(jax.random.normal(k1, (64, 64)))[0]
        >>> b = jnp.linalg.qr(jax.random.normal(k2, (48, 48)))[0]
        >>> g = a[:, :48] @ jnp.diag(0.5 ** jnp.arange(48.0)) @ b.T  # fast-decaying spectrum
        >>> u, s, v = lorajax.randomized_svd(g, 4, key=k3)
        >>> u_exact = jnp.linalg.svd(g)[0][:, :4]
        >>> print(f"{float(lorajax.subspace_overlap(u_exact, u)):.4f}")
        1.0000

    References:
        Halko, Martinsson and Tropp, `Finding structure with randomness: probabilistic
        algorithms for constructing approximate matrix decompositions
        <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.
    """
    n, m = g.shape[-2:]
    k = max(min(rank + oversample, n, m), rank)
    spec = shard.explicit_spec(g)
    axis = None if spec is None else (spec[-2] if warm_start is not None else spec[-1])
    rows = n if warm_start is not None else m
    layout = None if spec is None else (*spec[:-2], axis, None)
    sketch = shard.normal(key, (*g.shape[:-2], rows, k), g.dtype, layout)
    if warm_start is not None:
        r0 = warm_start.shape[-1]
        sketch = jnp.concatenate([warm_start.astype(g.dtype), sketch[..., r0:]], axis=-1)
    return sketched_svd(
        g, rank, sketch, warm=warm_start is not None, power_iters=power_iters, precision=precision
    )


def sketched_svd(
    g: jax.Array,
    rank: int,
    sketch: jax.Array,
    *,
    warm: bool,
    power_iters: int,
    precision: jax.lax.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`randomized_svd` from a given starting block.

    Args:
        g: ``(*batch, n, m)``.
        rank: Triplets to return.
        sketch: ``(*batch, m, k)`` test matrix ``Ω`` (``warm=False``) or ``(*batch, n, k)``
            starting block ``[U₀ | Ω']`` (``warm=True``).
        warm: Which of the two ``sketch`` is.
        power_iters: Power iterations.
        precision: Matmul precision.

    Returns:
        ``(U, S, V)`` as :func:`randomized_svd`.
    """
    if warm:
        z = shard.einsum("...nm,...nk->...mk", g, sketch, precision=precision)
        y = shard.einsum("...nm,...mk->...nk", g, z, precision=precision)
    else:
        y = shard.einsum("...nm,...mk->...nk", g, sketch, precision=precision)
    for _ in range(power_iters):
        q = _orthonormalize(y)
        z = _orthonormalize(shard.einsum("...nm,...nk->...mk", g, q, precision=precision))
        y = shard.einsum("...nm,...mk->...nk", g, z, precision=precision)
    q = _orthonormalize(y)
    small = shard.einsum("...nk,...nm->...km", q, g, precision=precision)
    ub, s, vt = per_matrix(
        lambda b: jnp.linalg.svd(b, full_matrices=False), shard.gather_matrix(small)
    )
    u = shard.einsum("...nk,...kr->...nr", q, ub[..., :rank], precision=precision)
    v = jnp.swapaxes(vt[..., :rank, :], -1, -2)
    return u, s[..., :rank], v

"""Randomized SVD (Halko, Martinsson and Tropp, 2011), batched and sharding-aware."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src import shard
from lorajax._src.bases import cholesky_qr, gram_orthonormalize, per_matrix

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


def _as_stored(g: jax.Array) -> jax.Array:
    """``g`` materialised as laid out, so that XLA:CPU cannot fold a transpose into dots.

    Every product below keeps ``g``'s free axis where it is (``g z`` and ``qᵀ g``), the
    forms XLA:CPU's dot runs fastest for a row-major ``g``. A caller that passes a
    transposed view (``swapaxes`` of a stored gradient) would otherwise get the slow
    forms in every product; the barrier makes XLA write the transpose once instead.
    """
    return jax.lax.platform_dependent(g, cpu=jax.lax.optimization_barrier, default=lambda x: x)


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

    Between products the blocks are re-orthonormalised by one shifted Cholesky-QR pass
    (:func:`~lorajax._src.bases.gram_orthonormalize`), which keeps their span, the only
    thing a subspace iteration needs. The final range basis ``Q`` and the factorisation
    ``Bᵀ = P T`` of ``B = Qᵀ g`` are exact thin QRs (:func:`~lorajax._src.bases.cholesky_qr`,
    Householder when a block is rank-deficient), so the small SVD is that of the
    ``k × k`` matrix ``T``: ``B = Tᵀ Pᵀ``.

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
    g = _as_stored(g)

    def range_of(zt: jax.Array) -> jax.Array:  # g Zᵀ: (n, k), from zt: (k, m)
        return shard.einsum("...nm,...km->...nk", g, zt, precision=precision)

    def corange_of(q: jax.Array) -> jax.Array:  # qᵀ g: (k, m)
        return shard.einsum("...nk,...nm->...km", q, g, precision=precision)

    def orth_rows(b: jax.Array) -> jax.Array:
        return jnp.swapaxes(gram_orthonormalize(jnp.swapaxes(b, -1, -2)), -1, -2)

    if warm:
        y = range_of(corange_of(sketch))
    else:
        y = shard.einsum("...nm,...mk->...nk", g, sketch, precision=precision)
    for _ in range(power_iters):
        y = range_of(orth_rows(corange_of(gram_orthonormalize(y))))
    q, _ = cholesky_qr(y)
    p, t = cholesky_qr(jnp.swapaxes(corange_of(q), -1, -2))  # Bᵀ = P T
    ut, s, vt = per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), t)
    # B = Tᵀ Pᵀ = (V_T S U_Tᵀ) Pᵀ: B's left vectors are V_T, its right ones P U_T.
    u = shard.einsum("...nk,...rk->...nr", q, vt[..., :rank, :].astype(q.dtype))
    v = shard.einsum("...mk,...kr->...mr", p, ut[..., :rank].astype(p.dtype))
    return u, s[..., :rank].astype(g.dtype), v

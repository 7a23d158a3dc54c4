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

    Every product below keeps ``g``'s free axis in place (``g Wᵀ`` and ``Cᵀ g`` with
    row-major ``W`` and ``Cᵀ``), the forms XLA:CPU's dot is fastest at for a row-major
    ``g``. A transposed view (``swapaxes`` of a stored gradient) would otherwise be
    folded into every product as a slow transposed operand; the barrier makes XLA
    write the transpose once instead. Pass the stored matrix with ``transpose=True``
    to avoid that copy as well.
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
    transpose: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`randomized_svd` from a given starting block.

    The iteration alternates two products with ``g``: ``C = g Wᵀ`` ``(n, k)`` and
    ``W = Qᵀ g`` ``(k, m)``. Between them the blocks are re-orthonormalised by one
    shifted Cholesky-QR pass (:func:`~lorajax._src.bases.gram_orthonormalize`: a
    subspace iteration needs only their span; Householder QR where a block is too
    ill-conditioned for that), and ``C`` is written transposed, so that ``g`` is always
    multiplied by a row-major block. The final range basis and the ``k × m`` block
    ``B`` are exact thin QRs (:func:`~lorajax._src.bases.cholesky_qr`), so the small
    SVD is that of a ``k × k`` triangular factor. Products with ``g`` use
    ``precision``; the ``k × k`` work and the orthonormalisations use the highest.

    Args:
        g: ``(*batch, n, m)``: the matrix, or its transpose with ``transpose``.
        rank: Triplets to return.
        sketch: For the matrix ``A`` (``g``, or ``gᵀ`` with ``transpose``) of shape
            ``(n', m')``: a ``(*batch, m', k)`` test matrix ``Ω`` (``warm=False``) or a
            ``(*batch, n', k)`` starting block ``[U₀ | Ω']`` (``warm=True``).
        warm: Which of the two ``sketch`` is.
        power_iters: Power iterations.
        precision: Matmul precision of the products with ``g``.
        transpose: Decompose ``gᵀ`` without forming it; ``U`` and ``V`` are ``gᵀ``'s.

    Returns:
        ``(U, S, V)`` as :func:`randomized_svd`, of ``g`` or of ``gᵀ``.
    """
    g = _as_stored(g)

    def columns(w: jax.Array) -> jax.Array:  # g Wᵀ: (n, k), from rows w: (k, m)
        return shard.einsum("...nm,...km->...nk", g, w, precision=precision)

    def rows(qt: jax.Array) -> jax.Array:  # Qᵀ g: (k, m), from rows qt: (k, n)
        return shard.einsum("...kn,...nm->...km", qt, g, precision=precision)

    def rows_of_columns(c: jax.Array) -> jax.Array:  # Cᵀ g: (k, m), from columns c: (n, k)
        return shard.einsum("...nk,...nm->...km", c, g, precision=precision)

    def orth(c: jax.Array) -> jax.Array:  # columns (n, k) in, orthonormal rows (k, n) out
        return gram_orthonormalize(c, transpose=True)

    def orth_rows(w: jax.Array) -> jax.Array:
        return gram_orthonormalize(w, rows=True)

    def lift(t: jax.Array, left: jax.Array, right: jax.Array) -> tuple[jax.Array, ...]:
        """The SVD of ``Lᵀ B`` with ``B = Tᵀ R``, from the SVD of the ``k × k`` ``T``.

        ``left`` (``L``) and ``right`` (``R``) are ``(k, d)`` blocks with orthonormal
        rows. With ``T = U_T S V_Tᵀ``: ``Lᵀ B = (Lᵀ V_T) S (Rᵀ U_T)ᵀ``.
        """
        ut, s, vt = per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), t)
        vt, ut = vt[..., :rank, :].astype(left.dtype), ut[..., :rank].astype(right.dtype)
        u = shard.einsum("...kd,...rk->...dr", left, vt)
        v = shard.einsum("...kd,...kr->...dr", right, ut)
        return u, s[..., :rank].astype(g.dtype), v

    if not transpose:  # g's range in columns C = g Wᵀ, its co-range in rows W = Qᵀ g
        if warm:
            c = columns(rows_of_columns(sketch))
        else:
            c = shard.einsum("...nm,...mk->...nk", g, sketch, precision=precision)
        for _ in range(power_iters):
            c = columns(orth_rows(rows(orth(c))))
        qt, _ = cholesky_qr(c, transpose=True)  # the range basis, as rows (k, n)
        p, t = cholesky_qr(rows(qt), rows=True)  # B = Qᵀ g = Tᵀ P
        return lift(t, qt, p)
    # gᵀ's range is g's co-range: rows W (k, m); its co-range, g's range: columns C.
    if warm:
        w = rows_of_columns(shard.einsum("...nm,...mk->...nk", g, sketch, precision=precision))
    else:
        w = rows_of_columns(sketch)
    for _ in range(power_iters):
        w = rows(orth(columns(orth_rows(w))))
    p, _ = cholesky_qr(w, rows=True)  # the range basis of gᵀ, as rows (k, m)
    qt, t = cholesky_qr(columns(p), transpose=True)  # gᵀ's B = P gᵀ = (g Pᵀ)ᵀ = Tᵀ Q
    return lift(t, p, qt)

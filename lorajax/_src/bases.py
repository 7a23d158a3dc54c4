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
    "cholesky_qr",
    "exact_svd",
    "gram_orthonormalize",
    "grouped_normals",
    "lower_triangular_inverse",
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


def _householder(x: jax.Array, rows: bool, transpose: bool) -> tuple[jax.Array, jax.Array]:
    """Householder ``(Q, R)`` of ``x`` (of ``xᵀ`` with ``rows``), in at least float32.

    ``Q`` comes in the orientation of ``x`` (the other one with ``transpose``). LAPACK
    returns ``Q`` column-major; multiplying it by ``I`` (exact) hands it on in XLA's
    default layout, so that a ``lax.cond`` whose other branch computes the same array
    by a matmul does not transpose the result of both branches on XLA:CPU.
    """
    dt = jnp.promote_types(x.dtype, jnp.float32)
    a = jnp.swapaxes(x, -1, -2) if rows else x
    q, r = per_matrix(jnp.linalg.qr, shard.gather_matrix(a.astype(dt)))
    eye = jnp.eye(q.shape[-1], dtype=dt)
    spec = "...dk,kl->...ld" if rows != transpose else "...dk,kl->...dl"
    q = jnp.einsum(spec, q, eye, precision=jax.lax.Precision.HIGHEST)
    return shard.like(q.astype(x.dtype), jnp.swapaxes(x, -1, -2) if transpose else x), r


def lower_triangular_inverse(lower: Float[Array, "*batch k k"]) -> Float[Array, "*batch k k"]:
    r"""The inverse of lower-triangular matrices, by recursive 2 × 2 blocks, in matmuls.

    .. math:: \begin{pmatrix} A & 0 \\ C & B \end{pmatrix}^{-1}
              = \begin{pmatrix} A^{-1} & 0 \\ -B^{-1} C A^{-1} & B^{-1} \end{pmatrix}

    applied bottom-up to all diagonal blocks of one size at once: ``⌈log₂ k⌉`` levels of
    batched products (the matrix is padded with an identity block to a power of two).
    No BLAS triangular solve is called: on XLA:CPU, jaxlib's ``trsm`` runs on OpenBLAS
    threads, which stall for milliseconds when the machine is oversubscribed. Its
    rounding errors are those of a blocked triangular solve. Only the lower triangle of
    ``lower`` is read.

    Args:
        lower: ``(*batch, k, k)`` with a non-zero diagonal.

    Returns:
        ``lower⁻¹``, lower triangular, with the shape and dtype of ``lower``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lorajax._src.bases import lower_triangular_inverse
        >>> lower = jnp.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [4.0, -2.0, 0.5]])
        >>> print(lower_triangular_inverse(lower) @ lower)
        [[1. 0. 0.]
         [0. 1. 0.]
         [0. 0. 1.]]
    """
    *batch, k, _ = lower.shape
    size = 1 << max(k - 1, 0).bit_length()
    lower = jnp.tril(lower)
    if size != k:
        pad = [(0, 0)] * len(batch) + [(0, size - k)] * 2
        tail = jnp.diag((jnp.arange(size) >= k).astype(lower.dtype))
        lower = jnp.pad(lower, pad) + jnp.broadcast_to(tail, (*batch, size, size))
    # The inverses of the diagonal blocks of the current size b: (*batch, size / b, b, b).
    inv = (1 / jnp.diagonal(lower, axis1=-2, axis2=-1))[..., None, None]
    b = 1
    while b < size:
        count = size // (2 * b)
        blocks = lower.reshape(*batch, count, 2 * b, count, 2 * b)
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)
        pairs = inv.reshape(*batch, count, 2, b, b)
        a_inv, b_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        corner = -jnp.einsum(
            "...ij,...jk,...kl->...il",
            b_inv,
            blocks[..., b:, :b],
            a_inv,
            precision=jax.lax.Precision.HIGHEST,
        )
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        bottom = jnp.concatenate([corner, b_inv], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        b *= 2
    return inv[..., 0, :k, :k]


def _cholesky_factor(x: jax.Array, shifted: bool, rows: bool) -> tuple[jax.Array, ...]:
    """One Cholesky-QR factorisation, in at least float32: ``(L, L⁻¹, XᵀX, shrink)``.

    For columns (``x: (d, k)``), ``Q = X L⁻ᵀ`` (:func:`_apply_inverse`) gives
    ``X = Q Lᵀ``; with ``rows`` (``x: (k, d)``) the same holds for ``Xᵀ``. The columns
    are first scaled to unit norm (``D``, which changes neither the span nor the
    triangular form), so that their lengths do not count as ill-conditioning:
    ``L = D⁻¹ C`` with ``C Cᵀ = D XᵀX D + sI``. With ``shifted``,
    ``s = (√d + k)·ε·k``, about the rounding error of the scaled Gram matrix; otherwise
    ``s`` is only a floor that keeps an all-zero block finite. ``shrink = s·‖C⁻¹‖²_F =
    Σᵢ s / (σᵢ² + s)`` over the singular values of ``X D`` (per matrix) says how far the
    shift pulls ``Q`` from orthonormal: a direction with singular value ``σᵢ`` comes out
    with length ``σᵢ / √(σᵢ² + s)``.
    """
    dt = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dt)
    highest = jax.lax.Precision.HIGHEST
    if rows:
        k, d = x.shape[-2:]
        gram = shard.einsum("...kd,...ld->...kl", x, x, precision=highest)
    else:
        d, k = x.shape[-2:]
        gram = shard.einsum("...dk,...dl->...kl", x, x, precision=highest)
    finfo = jnp.finfo(dt)
    norms2 = jnp.diagonal(gram, axis1=-2, axis2=-1)
    scale = jnp.where(norms2 > finfo.tiny, jax.lax.rsqrt(jnp.maximum(norms2, finfo.tiny)), 1)
    scaled = gram * scale[..., :, None] * scale[..., None, :]
    floor = float(finfo.tiny) / float(finfo.eps)
    shift = (d**0.5 + k) * float(finfo.eps) * k + floor if shifted else floor
    eye = jnp.broadcast_to(jnp.eye(k, dtype=dt), gram.shape)
    chol = per_matrix(jnp.linalg.cholesky, scaled + jnp.asarray(shift, dt) * eye)
    chol_inv = lower_triangular_inverse(chol)
    shrink = jnp.sum(chol_inv**2, axis=(-2, -1)) * jnp.asarray(shift, dt)
    lower = chol / scale[..., :, None]  # D⁻¹ C
    lower_inv = chol_inv * scale[..., None, :]  # C⁻¹ D
    return lower, lower_inv, gram, shrink


def _apply_inverse(x: jax.Array, lower_inv: jax.Array, rows: bool, transpose: bool) -> jax.Array:
    """``X L⁻ᵀ`` (``L⁻¹ X`` with ``rows``), or its transpose, in the dtype of ``x``.

    The transpose is written by the product itself, so it costs no copy.
    """
    spec = {
        (False, False): "...dk,...lk->...dl",
        (False, True): "...dk,...lk->...ld",
        (True, False): "...kd,...lk->...ld",
        (True, True): "...kd,...lk->...dl",
    }[(rows, transpose)]
    q = shard.einsum(
        spec, x.astype(lower_inv.dtype), lower_inv, precision=jax.lax.Precision.HIGHEST
    )
    return shard.like(q.astype(x.dtype), jnp.swapaxes(x, -1, -2) if transpose else x)


def gram_orthonormalize(
    x: Float[Array, "*batch d k"], *, rows: bool = False, transpose: bool = False
) -> Float[Array, "*batch d k"]:
    r"""A well-conditioned basis of ``span(X)``, from one shifted Cholesky-QR pass.

    .. math:: Q = X R^{-1}, \qquad R^\top R = X^\top X + s I,
              \quad s = (\sqrt{d} + k)\,\varepsilon\,\operatorname{tr}(X^\top X)

    ``Q`` spans the columns of ``X`` (any invertible ``R`` keeps the span), which is all
    a subspace (power) iteration needs between its products. The Gram matrix squares the
    condition number, so this is as accurate as Householder QR only while every
    direction of ``X`` stands well above the shift: when the shift would shorten some
    direction of ``Q`` below 0.1 (``Σᵢ s / (σᵢ² + s) > 0.99``), or the factorisation
    fails, the block goes through Householder QR instead (``lax.cond``). Otherwise only
    ``k × k`` matrices are factorised, and under sharding only the Gram matrix crosses
    devices. ``Q`` is orthonormal only up to the shift's ``s / σ_min²``; use
    :func:`cholesky_qr` when it must be orthonormal.

    Args:
        x: A skinny block ``(*batch, d, k)``, ``k <= d``; with ``rows``, a wide one
            ``(*batch, k, d)`` whose rows are orthonormalised.
        rows: Work on the rows of ``x``: the same as transposing ``x``, this function
            and the result, with no transposes for XLA to fold into the products
            around it.
        transpose: Return ``Qᵀ``, written in that layout by the last product (XLA:CPU
            multiplies by a row-major ``(k, d)`` block faster than by a transposed one).

    Returns:
        ``Q`` (``Qᵀ`` with ``transpose``), in the dtype of ``x`` and laid out like ``x``
        (like ``xᵀ`` with ``transpose``).

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> from lorajax._src.bases import gram_orthonormalize
        >>> x = jax.random.normal(jax.random.key(0), (200, 8)) * jnp.arange(1.0, 9.0)[None, :]
        >>> q = gram_orthonormalize(x)
        >>> print(f"{float(lorajax.subspace_overlap(x, q)):.5f}")
        1.00000
    """
    _, lower_inv, _, shrink = _cholesky_factor(x, shifted=True, rows=rows)
    ok = jnp.all(shrink <= 0.99) & jnp.all(jnp.isfinite(lower_inv))
    # The skinny product runs inside the branch, so that Q is not copied out of it.
    return jax.lax.cond(
        ok,
        lambda: _apply_inverse(x, lower_inv, rows, transpose),
        lambda: _householder(x, rows, transpose)[0],
    )


def cholesky_qr(
    x: Float[Array, "*batch d k"], *, passes: int = 2, rows: bool = False, transpose: bool = False
) -> tuple[Float[Array, "*batch d k"], Float[Array, "*batch k k"]]:
    r"""Thin QR of a skinny block by shifted Cholesky-QR, with a Householder fallback.

    ``X = Q R`` with orthonormal ``Q`` and upper-triangular ``R``, from Gram matrices: a
    first pass shifted as in :func:`gram_orthonormalize`, then ``passes - 1`` unshifted
    passes (shifted CholeskyQR of Fukaya et al. 2020). A pass whose input is within 0.5
    of orthonormal (``‖XᵀX − I‖_F ≤ 0.5``) returns ``Q`` orthonormal to rounding, so
    two passes suffice whenever the first one is not dominated by its shift. Only
    ``k × k`` matrices are factorised, and only ``k × k`` Gram matrices cross devices.
    When the last pass's input is further than that from orthonormal, or a factorisation
    fails (``X`` is too ill-conditioned for Gram matrices in its precision, or
    rank-deficient, such as a gradient of rank below ``k``), the call falls back to
    Householder QR (``lax.cond``), which also completes a rank-deficient basis as an
    exact QR does.

    Args:
        x: A skinny block ``(*batch, d, k)``, ``k <= d``; with ``rows``, a wide one
            ``(*batch, k, d)``.
        passes: Cholesky passes, at least 2.
        rows: Factor ``xᵀ`` instead and return ``(Qᵀ, R)``: ``x = Rᵀ Qᵀ`` with
            orthonormal rows in ``Qᵀ`` (see :func:`gram_orthonormalize`).
        transpose: Return the orthonormal factor transposed, as
            :func:`gram_orthonormalize` does.

    Returns:
        ``(Q, R)``: ``Q`` in the dtype of ``x`` and laid out like ``x`` (transposed with
        ``transpose``); ``R`` ``(*batch, k, k)`` upper triangular, in at least float32.
        After a fallback the diagonal of ``R`` may have either sign.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax._src.bases import cholesky_qr
        >>> x = jax.random.normal(jax.random.key(0), (100, 6))
        >>> q, r = cholesky_qr(x)
        >>> bool(jnp.allclose(q.T @ q, jnp.eye(6), atol=1e-6))
        True
        >>> bool(jnp.allclose(q @ r, x, atol=1e-5))
        True

    References:
        Fukaya, Kannan, Nakatsukasa, Zhang and Yamamoto, `Shifted Cholesky QR for
        computing the QR factorization of ill-conditioned matrices
        <https://arxiv.org/abs/1809.11085>`_, SIAM J. Sci. Comput. 2020.
    """
    if passes < 2:
        raise ValueError(f"`passes` must be at least 2 to reach orthonormality, got {passes!r}.")
    q, r, lower_inv, gram = x, None, None, None
    for i in range(passes):
        if i:
            q = _apply_inverse(q, lower_inv, rows, transpose=False)
        lower, lower_inv, gram, _ = _cholesky_factor(q, shifted=i == 0, rows=rows)
        step = jnp.swapaxes(lower, -1, -2)  # this pass's R
        if r is None:
            r = step
        else:
            r = jnp.einsum("...ij,...jk->...ik", step, r, precision=jax.lax.Precision.HIGHEST)
    # gram is the last pass's input Gram matrix: how far that input was from orthonormal.
    eye = jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype), gram.shape)
    drift = jnp.sum((gram - eye) ** 2, axis=(-2, -1))
    ok = jnp.all(drift <= 0.25) & jnp.all(jnp.isfinite(lower_inv)) & jnp.all(jnp.isfinite(r))
    return jax.lax.cond(
        ok,
        lambda: (_apply_inverse(q, lower_inv, rows, transpose), r),
        lambda: _householder(x, rows, transpose),
    )


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

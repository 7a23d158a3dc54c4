r"""Single-pass low-rank approximation from a range and a co-range sketch.

A gradient ``G: (*batch, n, m)`` that is never formed can still be sketched by the
backward pass: probes ``Ω: (m, k)`` and ``Ψᵀ: (n, l)`` give the range sketch
``Y = G Ω`` ``(n, k)`` and the co-range sketch ``W = Ψ G`` ``(l, m)``. From these two
alone (Tropp, Yurtsever, Udell and Cevher, 2017)

.. math::

    Q = \operatorname{orth}(Y), \qquad X = (\Psi Q)^{+} W, \qquad G \approx Q X,

and the top singular triplets of ``Q X`` come from the SVD of the small ``X: (k, m)``.
:func:`sketch_sizes` picks ``k`` and ``l``, :func:`single_pass_svd` computes the
triplets, and :func:`sketch_coordinates` gives the coordinates of ``G`` in the new bases
as far as the sketches determine them.

Every step is batched over leading axes and works on explicitly sharded matrix axes:
only skinny blocks (``(n, k)``, ``(m, k)`` and ``(l, k)``) cross devices, and nothing
``n × m``-sized is ever formed.

References:
    Tropp, Yurtsever, Udell and Cevher, `Practical sketching algorithms for low-rank
    matrix approximation <https://arxiv.org/abs/1609.00048>`_, SIAM J. Matrix Anal.
    Appl. 38(4), 2017.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src import shard
from lorajax._src.bases import orthonormalize, per_matrix

__all__ = ["DEFAULT_OVERSAMPLE", "single_pass_svd", "sketch_coordinates", "sketch_sizes"]

#: Default ``p`` in ``k = rank + p``. On synthetic spectra ``σ_i = 1/i`` and ``0.9^i``
#: (``256 × 192``, ranks 8 and 16) ``p = 32`` already keeps the captured energy of the
#: rank-r basis above 0.98 of the optimum, but on SmolLM2-135M's gradients of a 2 × 64
#: token batch the MLP kernels fall to 0.90 at rank 16; ``p = 64`` keeps every kernel of
#: every layer above 0.97 there.
DEFAULT_OVERSAMPLE = 64


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    what = "a positive int" if minimum > 0 else "a non-negative int"
    if isinstance(value, (bool, float)):
        raise TypeError(f"`{name}` must be {what}, got {value!r}.")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be {what} (a static Python int), got {value!r}.") from None
    if out < minimum:
        raise ValueError(f"`{name}` must be {what}, got {out}.")
    return out


def sketch_sizes(
    rank: int, n: int, m: int, oversample: int = DEFAULT_OVERSAMPLE
) -> tuple[int, int]:
    r"""The sketch widths ``(k, l)`` for a rank-``rank`` approximation of an ``n × m`` matrix.

    .. math::

        k = \min(r + p,\; n,\; m), \qquad l = \max(\min(2k + 1,\; n),\; r + 1).

    - ``k`` columns of the range sketch: ``r`` plus the oversampling ``p``, capped at
      ``min(n, m)`` (a wider range sketch adds nothing there).
    - ``l = 2k + 1`` rows of the co-range sketch, the choice of Tropp et al. (it makes the
      least-squares step cost at most a factor 2 in expected error). It is capped at
      ``n``, because ``n`` rows of ``Ψ G`` already determine ``G``; then ``l ≥ k`` still
      holds since ``k ≤ n``.
    - ``l > r`` always, so a co-range sketch ``(l, m)`` is never as wide as rank-``r``
      coordinates ``(r, m)`` and callers can tell the two apart by shape. The only case
      where this floor acts is ``rank = n``: then ``l = n + 1``.

    ``k > r`` holds unless ``oversample = 0`` or ``rank = min(n, m)``, so the width of the
    range sketch alone does not tell a sketch from coordinates; use ``l``.

    Args:
        rank: The target rank ``r``, at most ``min(n, m)``.
        n: Rows of the matrix (``d_in``).
        m: Columns of the matrix (``d_out``).
        oversample: The oversampling ``p ≥ 0``.

    Returns:
        ``(k, l)``: the widths of ``Ω: (m, k)`` and of ``Ψᵀ: (n, l)``.

    Raises:
        TypeError: an argument is not an int.
        ValueError: an argument is out of range, or ``rank > min(n, m)``.

    Examples:
        >>> from lorajax._src.sketch_svd import sketch_sizes
        >>> sketch_sizes(8, 256, 192, oversample=16)
        (24, 49)
        >>> sketch_sizes(8, 40, 30, oversample=32)  # capped: k = min(n, m), l = n
        (30, 40)
        >>> sketch_sizes(4, 4, 10, oversample=2)  # rank = n: l = n + 1 > r
        (4, 5)
    """
    rank = _check_int(rank, "rank", minimum=1)
    n = _check_int(n, "n", minimum=1)
    m = _check_int(m, "m", minimum=1)
    oversample = _check_int(oversample, "oversample", minimum=0)
    if rank > min(n, m):
        raise ValueError(
            f"`rank`={rank} exceeds min(n, m)={min(n, m)} for a {n} x {m} matrix; pass a "
            f"rank of at most {min(n, m)}."
        )
    k = min(rank + oversample, n, m)
    l_ = max(min(2 * k + 1, n), rank + 1)
    return k, l_


def _compute_dtype(*arrays: jax.Array) -> Any:
    """float64 if any input is float64, else float32 (LAPACK has no bf16/f16 kernels)."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def _check_inputs(
    range_sketch: Any, corange_sketch: Any, psi_t: Any, rank: Any
) -> tuple[int, int, int, int, int]:
    """Validates shapes, dtypes and ``rank``; returns ``(rank, n, m, k, l)``."""
    names = ("range_sketch", "corange_sketch", "psi_t")
    arrays = (range_sketch, corange_sketch, psi_t)
    layouts = ("(*batch, n, k)", "(*batch, l, m)", "(*batch, n, l)")
    for name, a, layout in zip(names, arrays, layouts):
        shape = getattr(a, "shape", None)
        dtype = getattr(a, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"`{name}` must be an array {layout}, got {type(a).__name__}.")
        if len(shape) < 2:
            raise ValueError(
                f"`{name}` must have shape {layout} (at least 2 axes), got shape {shape}."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{name}` must hold real floating-point numbers, got dtype {dtype}; cast it "
                "with .astype(jnp.float32)."
            )
    batch = range_sketch.shape[:-2]
    for name, a in zip(names[1:], arrays[1:]):
        if a.shape[:-2] != batch:
            raise ValueError(
                f"`{name}` has batch axes {a.shape[:-2]} but `range_sketch` has {batch} "
                f"(shapes {a.shape} and {range_sketch.shape}); all three sketches must "
                "share the leading axes exactly (no broadcasting)."
            )
    n, k = range_sketch.shape[-2:]
    l_, m = corange_sketch.shape[-2:]
    if psi_t.shape[-2] != n:
        raise ValueError(
            f"`psi_t` has {psi_t.shape[-2]} rows but `range_sketch` has n={n} (shapes "
            f"{psi_t.shape} and {range_sketch.shape}); pass Ψᵀ with shape (*batch, n, l), "
            "the transpose of the co-range test matrix."
        )
    if psi_t.shape[-1] != l_:
        raise ValueError(
            f"`psi_t` has {psi_t.shape[-1]} columns but `corange_sketch` has l={l_} rows "
            f"(shapes {psi_t.shape} and {corange_sketch.shape}); the co-range sketch must "
            "be Ψ G with the same Ψ whose transpose is `psi_t`."
        )
    if k > n:
        raise ValueError(
            f"`range_sketch` has k={k} columns but only n={n} rows; use k <= n "
            "(sketch_sizes caps k at min(n, m))."
        )
    if l_ < k:
        raise ValueError(
            f"`corange_sketch` has l={l_} rows, fewer than the k={k} columns of "
            "`range_sketch`, so Ψ Q cannot have full column rank; use l >= k, e.g. "
            "l = 2k + 1 from sketch_sizes."
        )
    rank = _check_int(rank, "rank", minimum=1)
    if rank > min(k, m):
        raise ValueError(
            f"`rank`={rank} exceeds what the sketches can give: min(k, m)={min(k, m)} "
            f"(k={k} range-sketch columns, m={m}); pass rank <= {min(k, m)} or sketch "
            "with more columns."
        )
    return rank, n, m, k, l_


def single_pass_svd(
    range_sketch: Float[Array, "*batch n k"],
    corange_sketch: Float[Array, "*batch l m"],
    psi_t: Float[Array, "*batch n l"],
    rank: int,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> tuple[
    Float[Array, "*batch n rank"], Float[Array, "*batch rank"], Float[Array, "*batch m rank"]
]:
    r"""Top-``rank`` singular triplets of ``G`` from its range and co-range sketches.

    Given ``Y = G Ω`` and ``W = Ψ G`` (``G`` itself is not needed):

    .. math::

        Q = \operatorname{orth}(Y), \qquad
        \Psi Q = Q_\Psi R_\Psi, \qquad
        X = R_\Psi^{-1} Q_\Psi^\top W = (\Psi Q)^{+} W, \qquad
        X = \tilde U S \tilde V^\top,

    and ``U = Q Ũ[:, :r]``, ``S = S[:r]``, ``V = Ṽ[:, :r]``: the top-``r`` SVD of the
    rank-``k`` approximation ``G ≈ Q X``. ``X`` is the least-squares solution of
    ``(Ψ Q) X = Ψ G``, which equals ``Qᵀ G`` whenever ``Q`` spans the range of ``G``; so
    the approximation is exact when ``rank(G) ≤ k``. The SVD of the wide ``X: (k, m)``
    is taken through the thin QR ``Wᵀ Q_Ψ = P T``: then ``X = (R_Ψ⁻¹ Tᵀ) Pᵀ``, and the
    SVD ``R_Ψ⁻¹ Tᵀ = A S Bᵀ`` of a ``k × k`` matrix gives ``Ũ = A`` and ``Ṽ = P B``.

    For Gaussian ``Ω`` and ``Ψ`` and ``l ≥ k + 2`` the expected squared Frobenius error
    of ``Q X`` is at most

    .. math::

        \Bigl(1 + \tfrac{k}{l - k - 1}\Bigr)
        \min_{\varrho < k - 1} \Bigl(1 + \tfrac{\varrho}{k - \varrho - 1}\Bigr)
        \sum_{i > \varrho} \sigma_i^2(G)

    (Theorem 4.3 of the paper; the first factor is 2 for ``l = 2k + 1``).

    Computation happens in float32 (float64 if any input is float64): lower-precision
    sketches are upcast first and the outputs are float32. ``Ω`` and ``Ψ`` must be drawn
    independently of each other; any scaling of either cancels out.

    Under an explicit mesh, ``Y`` and ``Ψᵀ`` may be sharded along ``n`` and ``W`` along
    ``m`` (batch axes must not be sharded: :func:`~lorajax._src.bases.per_matrix` maps
    over them). The product ``Ψ Q`` over ``n`` becomes an all-reduce of an ``(l, k)``
    block; the Householder QRs of ``Y`` and ``Wᵀ Q_Ψ`` gather those skinny ``(n, k)`` and
    ``(m, k)`` blocks; the small steps (QR of ``Ψ Q``, the triangular solve and the SVD of
    the ``k × k`` ``R_Ψ⁻¹ Tᵀ``) run per matrix. ``U`` is laid out like ``Y`` and ``V``
    like ``W``'s ``m`` axis. Nothing ``n × m``-sized is ever formed or moved.

    Args:
        range_sketch: ``Y = G Ω`` with shape ``(*batch, n, k)``, ``k ≤ n``.
        corange_sketch: ``W = Ψ G`` with shape ``(*batch, l, m)``, ``l ≥ k``.
        psi_t: ``Ψᵀ`` with shape ``(*batch, n, l)``, the co-range test matrix as the
            backward pass applies it (``x @ Ψᵀ``).
        rank: How many singular triplets to return, at most ``min(k, m)``.
        precision: Matmul precision passed to the einsums (e.g.
            ``jax.lax.Precision.HIGHEST`` on accelerators whose default is reduced).

    Returns:
        ``(U, S, V)`` with ``U: (*batch, n, rank)`` (orthonormal columns),
        ``S: (*batch, rank)`` (descending) and ``V: (*batch, m, rank)`` (orthonormal
        columns); ``G ≈ U diag(S) Vᵀ``.

    Raises:
        TypeError: an input is not a floating-point array, or ``rank`` is not an int.
        ValueError: the shapes do not fit together (the message names the argument and
            the expected layout), or ``rank`` is out of range.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax._src.sketch_svd import single_pass_svd, sketch_sizes
        >>> k, l = sketch_sizes(2, 40, 30, oversample=4)
        >>> k, l
        (6, 13)
        >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
        >>> g = jax.random.normal(k1, (40, 3)) @ jax.random.normal(k2, (3, 30))  # rank 3
        >>> omega = jax.random.normal(k3, (30, k))
        >>> psi_t = jax.random.normal(k4, (40, l))
        >>> u, s, v = single_pass_svd(g @ omega, psi_t.T @ g, psi_t, 2)
        >>> u.shape, s.shape, v.shape
        ((40, 2), (2,), (30, 2))
        >>> s_exact = jnp.linalg.svd(g, compute_uv=False)[:2]
        >>> bool(jnp.allclose(s, s_exact, rtol=1e-4))  # exact: rank(G) = 3 <= k
        True

    References:
        Tropp, Yurtsever, Udell and Cevher, `Practical sketching algorithms for low-rank
        matrix approximation <https://arxiv.org/abs/1609.00048>`_, SIAM J. Matrix Anal.
        Appl. 38(4), 2017.
    """
    rank, _, _, k, _ = _check_inputs(range_sketch, corange_sketch, psi_t, rank)
    dtype = _compute_dtype(range_sketch, corange_sketch, psi_t)
    y = range_sketch.astype(dtype)
    w = corange_sketch.astype(dtype)
    psi_t = psi_t.astype(dtype)

    q = orthonormalize(y)  # Q = orth(Y): (n, k), laid out like Y
    psi_q = shard.einsum("...nl,...nk->...lk", psi_t, q, precision=precision)  # Ψ Q
    q_psi, r_psi = per_matrix(jnp.linalg.qr, shard.gather_matrix(psi_q))
    # Wᵀ Q_Ψ = (Q_Ψᵀ W)ᵀ: (m, k), laid out like W's columns; its thin QR P T gives
    # X = R_Ψ⁻¹ Tᵀ Pᵀ, so the SVD is that of a k × k matrix.
    wt_q = shard.einsum("...lm,...lk->...mk", w, q_psi, precision=precision)
    p, t = per_matrix(jnp.linalg.qr, shard.gather_matrix(wt_q))
    p = shard.like(p, wt_q)

    def solve_then_svd(block: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # block = [R_Ψ | Tᵀ]: one array, so that per_matrix runs both steps per matrix
        # (off CPU it is the whole batch, hence the ellipses).
        core = jax.scipy.linalg.solve_triangular(block[..., :k], block[..., k:], lower=False)
        return jnp.linalg.svd(core, full_matrices=False)

    block = jnp.concatenate([r_psi, jnp.swapaxes(t, -1, -2)], axis=-1)
    a, s, bt = per_matrix(solve_then_svd, block)  # R_Ψ⁻¹ Tᵀ = A S Bᵀ
    # X = A S (P B)ᵀ: Ũ = A and Ṽ = P B.
    u = shard.einsum("...nk,...kr->...nr", q, a[..., :rank], precision=precision)
    v = shard.einsum("...mk,...rk->...mr", p, bt[..., :rank, :], precision=precision)
    return u, s[..., :rank], v


def sketch_coordinates(
    u: Float[Array, "*batch n r"], s: Float[Array, "*batch r"], v: Float[Array, "*batch m r"]
) -> tuple[Float[Array, "*batch r m"], Float[Array, "*batch n r"]]:
    r"""The coordinates of ``G`` in the bases of :func:`single_pass_svd`, without ``G``.

    The exact coordinates ``Uᵀ G`` and ``G V`` need ``G``. Its sketch approximation
    ``G ≈ Q X = Q Ũ S Ṽᵀ`` gives them in closed form, because ``U = Q Ũ_r`` and
    ``V = Ṽ_r`` have orthonormal columns:

    .. math::

        U^\top G \approx U^\top Q X = S_r V^\top, \qquad
        G V \approx Q X V = U S_r.

    Both are exact when ``rank(G) ≤ k``. Otherwise their error is that of ``Q X`` seen
    through the bases (the bound in :func:`single_pass_svd`).

    Args:
        u: ``U`` ``(*batch, n, r)`` from :func:`single_pass_svd`.
        s: ``S`` ``(*batch, r)`` from :func:`single_pass_svd`.
        v: ``V`` ``(*batch, m, r)`` from :func:`single_pass_svd`.

    Returns:
        ``(left, right)``: ``left ≈ Uᵀ G`` with shape ``(*batch, r, m)`` (laid out like
        ``v``'s ``m`` axis) and ``right ≈ G V`` with shape ``(*batch, n, r)`` (laid out
        like ``u``).

    Raises:
        ValueError: the shapes of ``u``, ``s`` and ``v`` do not fit together.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax._src.sketch_svd import single_pass_svd, sketch_coordinates
        >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
        >>> g = jax.random.normal(k1, (20, 2)) @ jax.random.normal(k2, (2, 16))  # rank 2
        >>> omega, psi_t = jax.random.normal(k3, (16, 5)), jax.random.normal(k4, (20, 11))
        >>> u, s, v = single_pass_svd(g @ omega, psi_t.T @ g, psi_t, 2)
        >>> left, right = sketch_coordinates(u, s, v)
        >>> bool(jnp.allclose(left, u.T @ g, atol=1e-4))  # Uᵀ G, exact here: rank(G) <= k
        True
        >>> bool(jnp.allclose(right, g @ v, atol=1e-4))  # G V
        True
    """
    shapes = {"u": getattr(u, "shape", None), "s": getattr(s, "shape", None)}
    shapes["v"] = getattr(v, "shape", None)
    if any(shape is None for shape in shapes.values()):
        raise TypeError(f"`u`, `s` and `v` must be arrays, got shapes {shapes}.")
    if (
        len(u.shape) < 2
        or len(v.shape) != len(u.shape)
        or s.shape != u.shape[:-2] + u.shape[-1:]
        or v.shape[:-2] + v.shape[-1:] != s.shape
    ):
        raise ValueError(
            "`u`, `s` and `v` must have shapes (*batch, n, r), (*batch, r) and "
            f"(*batch, m, r) as single_pass_svd returns them, got {shapes}."
        )
    left = s[..., :, None] * jnp.swapaxes(v, -1, -2)
    right = u * s[..., None, :]
    return left, right

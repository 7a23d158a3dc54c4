r"""Combining several adapters trained on the same base into one.

These are the combination methods of PEFT's ``add_weighted_adapter``, written in our
layout (``ΔW_i = s_i a_i b_i`` with ``a_i: (n, r_i)``, ``b_i: (r_i, m)``). The result is
a LoRA tree with scale 1 (``alpha`` equal to its rank):

- ``"linear"``: weighted sums of the factors;
- ``"cat"``: the factors side by side along the rank, so the updates add exactly;
- ``"svd"``: the best low-rank approximation of the weighted sum of the updates;
- ``"ties"``: TIES-merging of the updates (trim, elect a sign, average the agreeing
  entries), then a truncated SVD;
- ``"dare_linear"`` / ``"dare_ties"``: DARE's random drop-and-rescale of each update,
  then a weighted sum or TIES, then a truncated SVD.

References:
    Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, 2023.
    https://arxiv.org/abs/2306.01708

    Yu et al., *Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch* (DARE), 2023. https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src.adapters.tree import LoRA, is_adapter_leaf
from lorajax._src.bases import per_matrix
from lorajax._src.targets import path_str

__all__ = ["METHODS", "combine"]

#: The combination methods accepted by :func:`combine`.
METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_SIGN_METHODS = ("total", "frequency")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(out):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return out


def _check_args(
    adapters_list: Any,
    weights: Any,
    method: Any,
    rank: Any,
    density: Any,
    majority_sign: Any,
    key: Any,
) -> tuple[list[Any], list[float], int | None, float | None]:
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}."
        )
    if majority_sign not in _SIGN_METHODS:
        raise ValueError(
            f"`majority_sign` must be one of 'total', 'frequency'; got {majority_sign!r}."
        )
    if isinstance(adapters_list, (str, bytes)) or not isinstance(adapters_list, Sequence):
        raise TypeError(
            "`adapters_list` must be a list of adapter trees, got "
            f"{type(adapters_list).__name__}. Pass [adapters_1, adapters_2, ...]."
        )
    adapters_list = list(adapters_list)
    if not adapters_list:
        raise ValueError("`adapters_list` is empty; pass at least one adapter tree.")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"`weights` must be a list of numbers (one per adapter tree), got {weights!r}."
        )
    if len(weights) != len(adapters_list):
        raise ValueError(
            f"`weights` must hold one number per adapter tree: got {len(weights)} weights "
            f"for {len(adapters_list)} adapter trees."
        )
    weights = [_check_number(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if rank is not None:
        if isinstance(rank, bool):
            raise TypeError(f"`rank` must be a positive int or None, got {rank!r}.")
        try:
            rank = operator.index(rank)
        except TypeError:
            raise TypeError(f"`rank` must be a positive int or None, got {rank!r}.") from None
        if rank <= 0:
            raise ValueError(f"`rank` must be a positive int or None, got {rank}.")
        if method in ("linear", "cat"):
            raise ValueError(
                f"`rank` does not apply to method={method!r} (its rank follows from the "
                "inputs); leave it None, or use 'svd', 'ties' or a 'dare_*' method."
            )
    if density is not None:
        density = _check_number(density, "density")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"`density` must be in (0, 1], got {density!r}.")
    if method in _NEEDS_DENSITY and density is None:
        raise ValueError(
            f"method={method!r} needs `density`, the fraction of entries to keep in (0, 1], "
            "e.g. density=0.5."
        )
    if method.startswith("dare"):
        if key is None:
            raise ValueError(
                f"method={method!r} drops entries at random and needs `key`, e.g. "
                "key=jax.random.key(0)."
            )
        typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
        if not ((typed and key.shape == ()) or raw):
            raise TypeError(
                f"`key` must be a single PRNG key such as jax.random.key(0), got {key!r}."
            )
    return adapters_list, weights, rank, density


def _check_same_targets(flats: list[list[tuple[str, Any]]]) -> None:
    for i, flat in enumerate(flats):
        for where, x in flat:
            if not is_adapter_leaf(x):
                raise ValueError(
                    f"`adapters_list[{i}]` holds {type(x).__name__} at {where!r}; an adapter "
                    "tree holds a LoRA or None at every leaf."
                )
    first = flats[0]
    for i, flat in enumerate(flats[1:], start=1):
        for (p0, x0), (p1, x1) in zip(first, flat):
            if p0 != p1:
                raise ValueError(
                    f"`adapters_list[{i}]` does not have the structure of `adapters_list[0]`: "
                    f"leaf {p1!r} where the first has {p0!r}. Combine adapters built on the "
                    "same params."
                )
            if (x0 is None) != (x1 is None):
                which = 0 if x0 is None else i
                raise ValueError(
                    f"The adapters target different leaves: {p0!r} has no adapter in "
                    f"`adapters_list[{which}]`. Combine adapters with the same targets."
                )
            if x0 is not None and x0.layout != x1.layout:
                raise ValueError(
                    f"The adapters at {p0!r} read the kernel differently: "
                    f"{x0.layout} in `adapters_list[0]` vs {x1.layout} in "
                    f"`adapters_list[{i}]`. Combine adapters with the same kernel layouts."
                )
        if len(flat) != len(first):
            shorter, longer = (flat, first) if len(flat) < len(first) else (first, flat)
            extra = longer[len(shorter)][0]
            raise ValueError(
                f"`adapters_list[{i}]` does not have the structure of `adapters_list[0]`: "
                f"one of them lacks leaf {extra!r}. Combine adapters built on the same params."
            )


def _trim(x: Float[Array, "*batch n m"], density: float) -> Float[Array, "*batch n m"]:
    """Keeps the ``int(density·n·m)`` largest-magnitude entries of each matrix."""
    n, m = x.shape[-2:]
    k = int(density * n * m)
    if k >= n * m:
        return x
    if k == 0:
        return jnp.zeros_like(x)
    flat = x.reshape(-1, n * m)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    rows = jnp.arange(flat.shape[0])[:, None]
    keep = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
    return jnp.where(keep, flat, jnp.zeros_like(flat)).reshape(x.shape)


def _drop(x: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keeps each entry with probability ``density``, scaled by ``1/density``."""
    keep = jax.random.bernoulli(key, density, x.shape)
    return jnp.where(keep, x / density, jnp.zeros_like(x))


def _ties(deltas: list[jax.Array], weights: list[float], majority_sign: str) -> jax.Array:
    """Sign election and disjoint mean of already trimmed (or dropped) updates."""
    stacked = jnp.stack(deltas)
    signs = jnp.sign(stacked)
    votes = stacked.sum(0) if majority_sign == "total" else signs.sum(0)
    elected = jnp.where(votes >= 0, 1.0, -1.0).astype(stacked.dtype)
    agree = signs == elected[None]
    w = jnp.asarray(weights, stacked.dtype).reshape(-1, *([1] * (stacked.ndim - 1)))
    total = jnp.sum(jnp.where(agree, w * stacked, jnp.zeros_like(stacked)), axis=0)
    count = jnp.sum(agree, axis=0).astype(stacked.dtype)
    return total / jnp.maximum(count, 1.0)


def _factor(
    delta: Float[Array, "*batch n m"], rank: int
) -> tuple[Float[Array, "*batch n r"], Float[Array, "*batch r m"]]:
    """``delta ≈ a b`` by truncated SVD: ``a = U_r``, ``b = diag(S_r) V_rᵀ``."""
    u, s, vt = per_matrix(lambda x: jnp.linalg.svd(x, full_matrices=False), delta)
    r = min(rank, s.shape[-1])
    return u[..., :r], s[..., :r, None] * vt[..., :r, :]


def _check_leaf(where: str, loras: list[LoRA], method: str) -> None:
    for i, lora in enumerate(loras):
        if lora.magnitude is not None:
            raise ValueError(
                f"`adapters_list[{i}]` at {where!r} is a DoRA adapter (its magnitude is "
                "set); combine supports plain LoRA only. Merge DoRA adapters into the "
                "weights instead."
            )
    ranks = [lora.a.shape[-1] for lora in loras]
    if method == "linear" and len(set(ranks)) > 1:
        raise ValueError(
            f"method='linear' sums the factors and needs equal ranks, but the adapters "
            f"at {where!r} have ranks {ranks}. Use method='cat' or 'svd'."
        )


def _combine_one(
    index: int,
    loras: list[LoRA],
    weights: list[float],
    method: str,
    rank: int | None,
    density: float | None,
    majority_sign: str,
    key: Any,
) -> LoRA:
    a_dtype, b_dtype = loras[0].a.dtype, loras[0].b.dtype
    if method == "linear":
        # PEFT's convention: each factor carries sqrt(|w s|); the sign goes on `a`.
        a = sum(
            math.copysign(math.sqrt(abs(w * lora.scale)), w) * lora.a.astype(jnp.float32)
            for w, lora in zip(weights, loras)
        )
        b = sum(
            math.sqrt(abs(w * lora.scale)) * lora.b.astype(jnp.float32)
            for w, lora in zip(weights, loras)
        )
    elif method == "cat":
        a = jnp.concatenate(
            [w * lora.scale * lora.a.astype(jnp.float32) for w, lora in zip(weights, loras)],
            axis=-1,
        )
        b = jnp.concatenate([lora.b.astype(jnp.float32) for lora in loras], axis=-2)
    else:
        deltas = [lora.delta_matrix() for lora in loras]
        if method.startswith("dare"):
            assert density is not None
            leaf_key = jax.random.fold_in(key, index)
            deltas = [
                _drop(d, density, jax.random.fold_in(leaf_key, i)) for i, d in enumerate(deltas)
            ]
        elif method == "ties":
            assert density is not None
            deltas = [_trim(d, density) for d in deltas]
        if method in ("svd", "dare_linear"):
            total = sum(w * d for w, d in zip(weights, deltas))
        else:
            total = _ties(deltas, weights, majority_sign)
        target = max(lora.a.shape[-1] for lora in loras) if rank is None else rank
        a, b = _factor(total, target)
    r = a.shape[-1]
    return LoRA(
        a=a.astype(a_dtype),
        b=b.astype(b_dtype),
        scale=1.0,
        alpha=float(r),
        rank=r,
        layout=loras[0].layout,
    )


def combine(
    adapters_list: Sequence[Any],
    weights: Sequence[float],
    method: str = "linear",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    key: jax.Array | None = None,
) -> Any:
    r"""Combines several adapter trees for the same params into one.

    All trees must adapt the same leaves with the same kernel layouts. At each adapted
    leaf, with weights :math:`w_i` and updates :math:`\Delta W_i = s_i a_i b_i`:

    - ``"linear"``: factor-wise sums (PEFT's convention; all ranks must be equal)

      .. math:: a = \sum_i \sqrt{w_i s_i}\, a_i, \qquad b = \sum_i \sqrt{w_i s_i}\, b_i .

      A negative weight puts its sign on ``a``. The product is **not** the weighted sum
      :math:`\sum_i w_i \Delta W_i`: it carries the cross terms
      :math:`\sqrt{w_i s_i w_j s_j}\, a_i b_j`, which vanish when the adapters use
      disjoint rank slots (:math:`a_i b_j = 0` for :math:`i \ne j`). Use ``"cat"`` for
      the exact weighted sum.
    - ``"cat"``: :math:`a = [w_1 s_1 a_1 \mid \dots]`, :math:`b = [b_1; \dots]` along
      the rank, so :math:`a b = \sum_i w_i \Delta W_i` exactly, at rank
      :math:`\sum_i r_i`.
    - ``"svd"``: the truncated SVD :math:`U_r S_r V_r^\top` of
      :math:`\sum_i w_i \Delta W_i`, with :math:`a = U_r` and
      :math:`b = \operatorname{diag}(S_r) V_r^\top`: the best rank-``r`` approximation
      (Eckart–Young).
    - ``"ties"``: each :math:`\Delta W_i` keeps its ``int(density·n·m)`` entries of
      largest magnitude (per matrix; ties go to the lower flat index); each entry gets
      the sign :math:`\sigma = \operatorname{sign}\sum_i \tilde\Delta_i` (``"total"``) or
      the sign of the count of positive minus negative entries (``"frequency"``), with
      a zero vote electing ``+``; then

      .. math:: \Delta = \frac{\sum_{i \in A} w_i \tilde\Delta_i}{\max(|A|, 1)},
          \qquad A = \{i : \operatorname{sign}\tilde\Delta_i = \sigma\},

      factored by truncated SVD to ``rank``.
    - ``"dare_linear"`` / ``"dare_ties"``: each entry of each :math:`\Delta W_i` is
      kept with probability ``density`` and divided by ``density`` (DARE), then summed
      with the weights or merged as in ``"ties"`` (without trimming), then factored by
      truncated SVD to ``rank``. The mask of tree ``i`` at the ``j``-th adapted leaf (in
      tree order) is drawn from ``fold_in(fold_in(key, j), i)``.

    The SVD step is exact when ``rank >= min(n, m)``; the rank of a leaf is capped at
    ``min(n, m)``, beyond which it adds nothing. Stacked kernels ``(*batch, n, m)`` are
    combined matrix by matrix. The result has ``scale = 1`` (``alpha`` = its rank),
    factors in the dtype of the first tree's factors, and trainable ``a``.

    Args:
        adapters_list: Adapter trees (``LoRA`` / ``None`` leaves) built on the same params.
        weights: One number per tree.
        method: One of ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"dare_linear"``,
            ``"dare_ties"``.
        rank: The rank of the result for ``"svd"``, ``"ties"`` and ``"dare_*"``; default
            the largest input rank at each leaf. Not used by ``"linear"`` and ``"cat"``.
        density: The fraction of entries kept by ``"ties"`` and ``"dare_*"``, in (0, 1].
        majority_sign: ``"total"`` or ``"frequency"``, the TIES sign election.
        key: A PRNG key, required by the ``"dare_*"`` methods.

    Returns:
        The combined adapter tree.

    Raises:
        ValueError: on an unknown method, an empty list, a number of weights that does
            not match, adapters with different targets or layouts, unequal ranks for
            ``"linear"``, ``density`` outside (0, 1] or missing, or a missing ``key``.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> from lorajax.adapters import LoRA
        >>> layout = lorajax.MatrixSpec().resolve((2, 2))
        >>> one = {"k": LoRA(a=jnp.array([[1.0], [0.0]]), b=jnp.array([[2.0, 0.0]]),
        ...                  layout=layout)}
        >>> two = {"k": LoRA(a=jnp.array([[0.0], [1.0]]), b=jnp.array([[0.0, 3.0]]),
        ...                  layout=layout)}
        >>> both = lorajax.adapters.combine([one, two], [1.0, 0.5], "cat")["k"]
        >>> both.rank, both.a @ both.b
        (2, Array([[2. , 0. ],
               [0. , 1.5]], dtype=float32))

    References:
        PEFT's ``add_weighted_adapter`` (Hugging Face). TIES: Yadav et al., 2023,
        https://arxiv.org/abs/2306.01708. DARE: Yu et al., 2023,
        https://arxiv.org/abs/2311.03099.
    """
    adapters_list, weights, rank, density = _check_args(
        adapters_list, weights, method, rank, density, majority_sign, key
    )
    flat_trees = [
        jax.tree_util.tree_flatten_with_path(t, is_leaf=is_adapter_leaf) for t in adapters_list
    ]
    flats = [[(path_str(p), x) for p, x in flat] for flat, _ in flat_trees]
    _check_same_targets(flats)
    groups = [
        (j, where, [flat[j][1] for flat in flats])
        for j, (where, node) in enumerate(flats[0])
        if isinstance(node, LoRA)
    ]
    for _, where, loras in groups:
        _check_leaf(where, loras, method)
    out = [node for _, node in flats[0]]
    for index, (j, _, loras) in enumerate(groups):
        out[j] = _combine_one(index, loras, weights, method, rank, density, majority_sign, key)
    return flat_trees[0][1].unflatten(out)

"""Flora (Hao et al. 2024) as an alias of :func:`lorajax.low_rank`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from lorajax._src.projection import alias_options, full_space_chain, low_rank

__all__ = ["flora"]


def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    refresh_every: int = 1000,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    inner: optax.GradientTransformation | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Flora: optimizer state compressed by random projections that are re-drawn.

    Flora observes that LoRA's update is a random projection of the gradient
    (``Δ(ab) ≈ -η(a aᵀ G + G bᵀ b)``) and keeps only that projection: each gradient is
    compressed by a Gaussian ``P`` with entries ``N(0, 1/r)``, so ``E[P Pᵀ] = I``. ``P``
    is never stored, only regenerated from a key, and it is re-drawn every
    ``refresh_every`` (``κ``) steps; the compressed momentum is then carried over as

    .. math:: M \leftarrow P_\text{new}^\top P_\text{old} M

    (the analogue on the right side). The update is ``-η P · inner(Pᵀ G)`` plus
    decoupled weight decay in full space.

    The paper pairs the compressed momentum with Adafactor's factored second moment of
    the *full* gradient. Here the inner optimizer (Adam by default) runs entirely on the
    compressed coordinates, so its whole state is ``O(r)`` per matrix; its second moment
    is carried across re-draws by ``ν ← (Q∘Q) ν`` with ``Q = P_newᵀ P_old`` (see
    ``on_refresh`` in :func:`lorajax.low_rank`). Pass
    ``inner=optax.ema(b1, debias=False)`` for the paper's plain compressed momentum.

    Args:
        learning_rate: A scalar or schedule.
        rank: The projection rank ``r`` (the paper's ``τ``).
        refresh_every: Steps between re-draws (``κ``; 1000 as in the official code).
        b1: Adam's first-moment decay (used when ``inner`` is None).
        b2: Adam's second-moment decay.
        eps: Adam's epsilon.
        inner: The optimizer on the coordinates; default ``scale_by_adam(b1, b2, eps)``.
        weight_decay: Decoupled weight decay in full space.
        mask: Weight-decay mask.
        seed: Seed of the random projections.
        **kwargs: Passed to :func:`lorajax.low_rank` (``side``, ``targets``, ...).

    Returns:
        ``chain(low_rank(basis="random", on_refresh="rotate"), add_decayed_weights,
        scale_by_learning_rate)``.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> tx = lorajax.flora(1e-3, rank=8)
        >>> state = tx.init({"w": jnp.ones((256, 64))})
        >>> state[0].projectors["w"].u is None  # the basis is regenerated, not stored
        True

    References:
        Hao, Cao and Mou, `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
        <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
    """
    if inner is None:
        inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    options = alias_options("flora", {"basis": "random", "on_refresh": "rotate"}, kwargs)
    projected = low_rank(inner, rank=rank, refresh_every=refresh_every, seed=seed, **options)
    return full_space_chain(projected, learning_rate, weight_decay, mask)

"""Adapter-free LoRA: two-sided projection with LoRA-Pro alignment and LoRA+ ratio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from lorajax._src.projection import alias_options, full_space_chain, low_rank

__all__ = ["lora"]


def lora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    lora_plus_ratio: float = 1.0,
    align: str = "lora_pro",
    refresh_every: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    inner: optax.GradientTransformation | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    targets: Any = None,
    seed: int = 0,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA without adapters: the update a rank-``r`` adapter pair can make, applied to W.

    A LoRA adapter ``W0 + a b`` trained by gradient descent moves ``W`` within the
    tangent space ``{U Y + Z Vᵀ}`` of its factors. This transform keeps orthonormal
    bases ``U: (d_in, r)`` (LoRA's ``a``) and ``V: (d_out, r)`` (LoRA's ``bᵀ``),
    drawn at random from a key and re-drawn every ``refresh_every`` steps (the moments
    are rotated into the new bases), runs Adam on the two coordinate blocks
    ``C_a = G V`` and ``C_b = Uᵀ G`` (exactly LoRA's Adam memory, no adapter weights),
    and updates ``W`` by

    .. math:: \Delta W = -\eta\,\big(\lambda\,U N_b + (I - U U^\top) N_a V^\top\big),

    LoRA-Pro's optimal equivalent gradient: with plain SGD it is the orthogonal
    projection of ``G`` onto the tangent space. ``λ`` is the LoRA+ ratio.

    Choosing the learning rate: an orthonormal rank-``r`` projection keeps only part of
    the gradient, and each step moves ``W`` less than full fine-tuning would. As with
    LoRA adapters, start around **10× the learning rate of full AdamW fine-tuning** (LoRA
    Without Regret reports about 10× for adapters, up to 15× for short runs) and sweep
    from there; the ``02_lr_ratio`` notebook measures the ratio for this mode.
    ``lora_plus_ratio`` defaults to 1: LoRA+'s ``λ ≈ 16`` corrects the unequal scales of
    an adapter's ``a`` and ``b``, while both bases here are orthonormal and symmetric.

    Args:
        learning_rate: A scalar or schedule (see above).
        rank: The rank ``r``.
        lora_plus_ratio: LoRA+ ratio ``λ`` for the ``b`` block.
        align: ``"lora_pro"`` (tangent-space projection) or ``"sum"`` (vanilla LoRA's
            equivalent gradient ``U Uᵀ G + G V Vᵀ``).
        refresh_every: Steps between re-draws of the bases.
        b1: Adam's first-moment decay (when ``inner`` is None).
        b2: Adam's second-moment decay.
        eps: Adam's epsilon.
        inner: The optimizer on the coordinates; default ``scale_by_adam(b1, b2, eps)``.
        weight_decay: Decoupled weight decay in full space.
        mask: Weight-decay mask.
        targets: Which leaves get LoRA (every leaf with >= 2 axes by default). For a
            transformer, pass ``"all-linear"`` as LoRA Without Regret recommends; the
            leaves left out are trained by ``inner`` at full shape.
        seed: Seed of the random bases.
        **kwargs: Passed to :func:`lorajax.low_rank` (e.g. ``basis="randomized_svd"``
            for gradient-aligned bases).

    Returns:
        ``chain(low_rank(side="both", ...), add_decayed_weights, scale_by_learning_rate)``.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> params = {"mlp": {"up_proj": {"kernel": jnp.ones((64, 256))}}}
        >>> state = lorajax.lora(1e-3, rank=8).init(params)
        >>> mu = state[0].inner_state.mu["mlp"]["up_proj"]["kernel"]
        >>> mu.a.shape, mu.b.shape  # LoRA-sized Adam moments
        ((64, 8), (8, 256))

    References:
        - Hu et al., `LoRA <https://arxiv.org/abs/2106.09685>`_, 2021.
        - Wang et al., `LoRA-Pro <https://arxiv.org/abs/2407.18242>`_, 2024.
        - Hayou et al., `LoRA+ <https://arxiv.org/abs/2402.12354>`_, 2024.
        - Schulman et al., `LoRA Without Regret
          <https://thinkingmachines.ai/blog/lora/>`_, Thinking Machines, 2025.
    """
    if inner is None:
        inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    options = alias_options("lora", {"basis": "random_orthogonal", "on_refresh": "rotate"}, kwargs)
    projected = low_rank(
        inner,
        rank=rank,
        side="both",
        align=align,
        lora_plus_ratio=lora_plus_ratio,
        refresh_every=refresh_every,
        targets=targets,
        seed=seed,
        **options,
    )
    return full_space_chain(projected, learning_rate, weight_decay, mask)

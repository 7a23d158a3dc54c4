"""GaLore (Zhao et al. 2024) as an alias of :func:`lorajax.low_rank`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from optax.contrib import GaLoreDimensionNumbers

from lorajax._src.matrices import MatrixSpec
from lorajax._src.projection import alias_options, full_space_chain, low_rank
from lorajax._src.targets import TreeFn

__all__ = ["galore", "galore_targets"]


def galore_targets(weight_dimension_numbers: Any = None) -> Any:
    """Translates optax's ``weight_dimension_numbers`` into lorajax ``targets``.

    - ``None``: every 2-D leaf, as ``(d_in, d_out)`` (optax's default).
    - one ``GaLoreDimensionNumbers``: every leaf with at least two axes.
    - a pytree of ``GaLoreDimensionNumbers | None``: as given.
    - a callable ``params -> pytree``: called at ``init``.
    """
    if weight_dimension_numbers is None:
        return lambda path, leaf: MatrixSpec(0, 1) if len(leaf.shape) == 2 else None
    if isinstance(weight_dimension_numbers, GaLoreDimensionNumbers):
        return weight_dimension_numbers
    if callable(weight_dimension_numbers):
        return TreeFn(weight_dimension_numbers)
    return weight_dimension_numbers


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: optax.GradientTransformation | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    weight_dimension_numbers: Any = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore: Adam (or ``base_optimizer``) on SVD projections of the gradients.

    The same signature, defaults and numbers as ``optax.contrib.galore``: each 2-D
    gradient ``G: (n, m)`` is projected on the side that keeps the state small (left,
    ``R = Uᵀ G``, when ``n >= m``; else right, ``R = G V``) with the top-``rank``
    singular vectors of ``G``, recomputed every ``update_proj_gap`` steps by an exact
    SVD. The base optimizer's state is left as it is when the basis changes. Then

    .. math:: W \leftarrow W - \eta\,(\alpha\,U\,\mathrm{adam}(U^\top G) + \lambda W)

    with ``α = scale``, decoupled weight decay ``λ`` applied in full space.

    Extra keyword arguments go to :func:`lorajax.low_rank` and unlock what optax lacks,
    e.g. ``basis="randomized_svd"`` (no full SVD, no gather of sharded weights),
    ``on_refresh="rotate"`` (move the moments into the new basis), ``side``,
    ``targets`` or ``state_dtype``.

    Args:
        learning_rate: A scalar or schedule.
        rank: Projection rank (clamped to ``min(n, m)`` per matrix).
        update_proj_gap: Steps between basis refreshes.
        scale: ``α``, multiplies the projected updates.
        base_optimizer: The optimizer run on the projections; default
            ``optax.scale_by_adam()``. It must not need ``params``.
        weight_decay: Decoupled weight decay, applied in full space.
        mask: Weight-decay mask, as in ``optax.add_decayed_weights``.
        weight_dimension_numbers: optax's ``GaLoreDimensionNumbers`` (single, pytree or
            callable) for N-D leaves; ``None`` projects only 2-D leaves.
        **kwargs: Passed to :func:`lorajax.low_rank` (``basis="svd"`` and
            ``on_refresh="keep"`` unless given).

    Returns:
        ``chain(low_rank(...), add_decayed_weights(...), scale_by_learning_rate(...))``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> params = {"w": jnp.ones((32, 16)), "b": jnp.ones(16)}
        >>> # A full-rank gradient: with a rank-1 one, Adam would normalise the rounding
        >>> # noise of the zero singular directions, which differs between SVD builds.
        >>> key = jax.random.key(0)
        >>> grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), params)
        >>> ours = lorajax.galore(1e-2, rank=4)
        >>> theirs = optax.contrib.galore(1e-2, rank=4)
        >>> u1, _ = ours.update(grads, ours.init(params), params)
        >>> u2, _ = theirs.update(grads, theirs.init(params), params)
        >>> bool(jnp.allclose(u1["w"], u2["w"], atol=1e-7))
        True

    References:
        Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
        Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
    """
    options = alias_options(
        "galore", {"basis": "svd", "on_refresh": "keep", "side": "auto"}, kwargs
    )
    if "targets" in options and weight_dimension_numbers is not None:
        raise ValueError(
            "Pass either `weight_dimension_numbers` (optax style) or `targets` (lorajax "
            "style), not both."
        )
    targets = options.pop("targets", None)
    if targets is None:
        targets = galore_targets(weight_dimension_numbers)
    projected = low_rank(
        base_optimizer,
        rank=rank,
        refresh_every=update_proj_gap,
        scale=scale,
        targets=targets,
        **options,
    )
    return full_space_chain(projected, learning_rate, weight_decay, mask)

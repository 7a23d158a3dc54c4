"""Zeroing the updates of frozen ``a`` factors and of masked-out ``b`` entries."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax._src import shard
from lorajax._src.adapters.tree import LoRA, is_lora
from lorajax._src.targets import path_str

__all__ = ["FreezeState", "freeze"]


class FreezeState(NamedTuple):
    """State of :func:`freeze`.

    Attributes:
        count: Number of updates taken (int32).
        mask: The boolean mask tree (laid out like the ``b`` factors), or ``None``.
    """

    count: jax.Array
    mask: Any


def _is_none(x: Any) -> bool:
    return x is None


def _zero_frozen(tree: Any) -> Any:
    """Zeroes ``a`` in every LoRA of ``tree`` that has ``frozen_a`` set."""

    def visit(u: Any) -> Any:
        if isinstance(u, LoRA) and u.frozen_a:
            return u.replace(a=jnp.zeros_like(u.a))
        return u

    return jax.tree.map(visit, tree, is_leaf=is_lora)


def _check_mask(mask: Any, params: Any) -> Any:
    """Validates ``mask`` against ``params`` and returns it as laid-out bool arrays."""

    def visit(path: Any, m: Any, p: Any) -> Any:
        if m is None or isinstance(p, optax.MaskedNode):
            return None  # no mask here, or a leaf another transform owns
        where = path_str(path) or "<root>"
        if not isinstance(p, LoRA):
            raise ValueError(
                f"`mask` has an array at {where!r}, but the adapters hold "
                f"{type(p).__name__} there, not a LoRA. The mask must have the adapters' "
                "structure, with an array shaped like `b` at each LoRA and None elsewhere "
                "(see lorajax.adapters.lori_mask)."
            )
        shape, dtype = tuple(np.shape(m)), getattr(m, "dtype", np.asarray(m).dtype)
        if shape != tuple(p.b.shape):
            raise ValueError(
                f"`mask` at {where!r} has shape {shape}, but that adapter's `b` has shape "
                f"{tuple(p.b.shape)}; the mask must be shaped like `b`."
            )
        if jnp.dtype(dtype) != jnp.dtype(bool):
            raise ValueError(
                f"`mask` at {where!r} has dtype {dtype}; it must be boolean (True = train), "
                "e.g. mask = jax.tree.map(lambda x: x != 0, mask)."
            )
        return shard.like(jnp.asarray(m), p.b)

    try:
        return jax.tree_util.tree_map_with_path(visit, mask, params, is_leaf=_is_none)
    except (ValueError, TypeError) as e:
        if str(e).startswith("`mask`"):
            raise
        raise ValueError(
            f"`mask` does not have the structure of the adapters: {e}. Build it from the "
            "same adapter tree, e.g. lorajax.adapters.lori_mask(adapters, sparsity)."
        ) from None


def freeze(mask: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""Zeroes the updates of frozen ``a`` factors and of masked-out ``b`` entries.

    For every :class:`~lorajax.adapters.LoRA` update:

    - if ``LoRA.frozen_a`` is set (LoRA-FA, LoRI; read from the updates' metadata, which
      ``jax.grad`` keeps), the ``a`` update becomes zero;
    - with a ``mask``, the ``b`` update becomes ``where(mask, u_b, 0)``: masked-out
      entries get exactly zero.

    DoRA magnitudes and plain arrays pass through unchanged.

    Place it **last** in the chain, after weight decay and the learning rate:

    .. code-block:: python

        optax.chain(optax.adamw(1e-3, weight_decay=0.1), lorajax.adapters.freeze(mask))

    Then frozen and masked entries are exactly immune to everything before it (moments,
    weight decay, clipping), and stay bit-identical for the whole run. Anywhere earlier,
    a later transform can move them again (weight decay pulls a frozen ``a`` towards 0).

    Args:
        mask: ``None`` (only frozen ``a``) or a tree with the adapters' structure holding
            a boolean array shaped like ``b`` at each masked LoRA (``True`` = train) and
            ``None`` elsewhere, as :func:`lorajax.adapters.lori_mask` returns. It is
            checked against the adapters at ``init`` and kept in the state.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Raises:
        ValueError: at ``init``, when ``mask`` does not fit the adapters (structure,
            shape or dtype).

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> lora = lorajax.adapters.LoRA(
        ...     a=jnp.ones((3, 2)), b=jnp.ones((2, 2)), rank=2, frozen_a=True)
        >>> adapters = {"dense": lora}
        >>> mask = {"dense": jnp.array([[True, False], [False, True]])}
        >>> tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), lorajax.adapters.freeze(mask))
        >>> state = tx.init(adapters)
        >>> grads = jax.tree.map(jnp.ones_like, adapters)
        >>> updates, _ = tx.update(grads, state, adapters)
        >>> float(jnp.abs(updates["dense"].a).max())
        0.0
        >>> updates["dense"].b != 0
        Array([[ True, False],
               [False,  True]], dtype=bool)

    References:
        - Zhang et al., `LoRA-FA <https://arxiv.org/abs/2308.03303>`_, 2023.
        - Zhang et al., `LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank
          Adaptation <https://arxiv.org/abs/2504.07448>`_, 2025.
    """
    if mask is not None:
        for path, leaf in jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_lora)[0]:
            if isinstance(leaf, LoRA) or not hasattr(leaf, "shape"):
                raise TypeError(
                    f"`mask` must hold boolean arrays (or None), got {type(leaf).__name__} at "
                    f"{path_str(path) or '<root>'!r}. Build it with "
                    "lorajax.adapters.lori_mask(adapters, sparsity)."
                )

    def init_fn(params: optax.Params) -> FreezeState:
        stored = None if mask is None else _check_mask(mask, params)
        return FreezeState(count=jnp.zeros([], jnp.int32), mask=stored)

    def update_fn(
        updates: optax.Updates,
        state: FreezeState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, FreezeState]:
        del params, extra_args

        def visit(m: Any, u: Any) -> Any:
            if m is None:
                return _zero_frozen(u)
            if not isinstance(u, LoRA):  # a leaf another transform owns
                return u
            b = jnp.where(shard.like(m, u.b), u.b, jnp.zeros_like(u.b))
            a = jnp.zeros_like(u.a) if u.frozen_a else u.a
            return u.replace(a=a, b=b)

        new = jax.tree.map(visit, state.mask, updates, is_leaf=_is_none)
        return new, state._replace(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

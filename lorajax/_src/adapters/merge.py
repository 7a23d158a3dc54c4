r"""Folding adapters into their kernels, and calling a model with adapters.

.. math:: W = W_0 + s\,a\,b \quad\text{(LoRA)}, \qquad
    W = m \odot \frac{W_0 + s\,a\,b}{\lVert W_0 + s\,a\,b \rVert_c} \quad\text{(DoRA)},

where ``‖·‖_c`` is the norm of each output column.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src.adapters.dora import dora_merge_matrix
from lorajax._src.adapters.tree import LoRA, check_adapters_match, is_adapter_leaf

__all__ = ["apply", "merge", "unmerge"]


def _map_kernels(fn: Callable[[LoRA, jax.Array], jax.Array], params: Any, adapters: Any) -> Any:
    """``params`` with ``fn(lora, kernel)`` at every adapted kernel."""

    def visit(lora: LoRA | None, w: jax.Array) -> jax.Array:
        return w if lora is None else fn(lora, w)

    return jax.tree.map(visit, adapters, params, is_leaf=is_adapter_leaf)


def _merged(lora: LoRA, w: jax.Array) -> jax.Array:
    w32 = w.astype(jnp.float32)
    if lora.magnitude is None:
        return (w32 + lora.delta()).astype(w.dtype)
    layout = lora.layout
    assert layout is not None  # checked by check_adapters_match
    merged = dora_merge_matrix(
        layout.to_matrix(w32), lora.delta_matrix(), lora.magnitude.astype(jnp.float32)
    )
    return layout.from_matrix(merged).astype(w.dtype)


def merge(params: Any, adapters: Any) -> Any:
    r"""The params with every adapter folded into its kernel: ``W0 + s·a·b``.

    Adapters with a DoRA ``magnitude`` give ``m ⊙ (W0 + s·a·b) / ‖W0 + s·a·b‖`` (norm per
    output column, treated as a constant by autodiff). The sum is computed in float32
    and cast to the kernel's dtype. Differentiable with respect to both arguments, so
    ``jax.grad(lambda ad: loss(merge(params, ad)))`` trains the adapters.

    Args:
        params: The (base) parameter tree.
        adapters: An adapter tree for ``params`` (from :func:`lorajax.adapters.init`).

    Returns:
        A tree like ``params``; leaves without an adapter are the same objects.

    Raises:
        ValueError: if ``adapters`` do not match ``params`` in structure or shapes.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
        >>> ad, _ = lorajax.adapters.init(jax.random.key(0), params, rank=1, alpha=2)
        >>> lora = ad["dense"]["kernel"]
        >>> ad["dense"]["kernel"] = lora.replace(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)))
        >>> lorajax.adapters.merge(params, ad)["dense"]["kernel"]
        Array([[2., 2.],
               [2., 2.],
               [2., 2.]], dtype=float32)
    """
    check_adapters_match(params, adapters)
    return _map_kernels(_merged, params, adapters)


def _unmerged(lora: LoRA, w: jax.Array) -> jax.Array:
    return (w.astype(jnp.float32) - lora.delta()).astype(w.dtype)


def unmerge(params: Any, adapters: Any) -> Any:
    """Inverts :func:`merge`: ``W − s·a·b`` at every adapted kernel.

    ``unmerge(merge(params, ad), ad)`` equals ``params`` up to float32 rounding.

    Args:
        params: A merged parameter tree.
        adapters: The adapters that were merged into it.

    Returns:
        A tree like ``params`` with the adapters' contribution removed.

    Raises:
        ValueError: if ``adapters`` do not match ``params``, or if an adapter carries a
            DoRA magnitude: a DoRA merge rescales each column by a norm of the base it
            no longer knows, so keep the base params instead of unmerging.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> params = {"w": jnp.arange(6.0).reshape(3, 2)}
        >>> ad, _ = lorajax.adapters.init(jax.random.key(1), params, rank=1, targets="w",
        ...                              init="gaussian")
        >>> ad["w"] = ad["w"].replace(b=jnp.ones((1, 2)))
        >>> back = lorajax.adapters.unmerge(lorajax.adapters.merge(params, ad), ad)
        >>> bool(jnp.allclose(back["w"], params["w"], atol=1e-6))
        True
    """
    check_adapters_match(params, adapters)
    for lora in jax.tree.leaves(adapters, is_leaf=is_adapter_leaf):
        if isinstance(lora, LoRA) and lora.magnitude is not None:
            raise ValueError(
                "unmerge cannot invert a DoRA merge (an adapter has a `magnitude`): the "
                "merged weight no longer determines the column norms of W0 + s·a·b. Keep "
                "the base params and call merge again instead."
            )
    return _map_kernels(_unmerged, params, adapters)


def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``fn(params, *args)`` into ``fn(params, adapters, *args)`` that merges first.

    The merge runs inside whatever transformation calls the wrapper (``jax.jit``,
    ``jax.grad``), so XLA fuses ``W0 + s·a·b`` into the step and gradients flow to the
    adapters. Each adapted kernel is materialised once per call; for very large
    batches this is cheaper than the two skinny matmuls of an unmerged adapter, for
    tiny batches slightly dearer.

    Args:
        fn: A function taking the params first.

    Returns:
        The wrapped function.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> def model(params, x):
        ...     return x @ params["dense"]["kernel"]
        >>> params = {"dense": {"kernel": jnp.eye(2)}}
        >>> ad, _ = lorajax.adapters.init(jax.random.key(0), params, rank=1)
        >>> loss = lambda ad, x: jnp.sum(lorajax.adapters.apply(model)(params, ad, x) ** 2)
        >>> grads = jax.jit(jax.grad(loss))(ad, jnp.ones((4, 2)))
        >>> grads["dense"]["kernel"].b.shape
        (1, 2)
    """

    @functools.wraps(fn)
    def wrapped(params: Any, adapters: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(merge(params, adapters), *args, **kwargs)

    return wrapped

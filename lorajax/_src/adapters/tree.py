"""The LoRA adapter pytree and the helpers that walk a tree of adapters.

An adapter tree has the structure of the params it adapts. A targeted leaf holds a
:class:`LoRA`; every other leaf holds ``None``. The factors live in the *matrix view*
of the kernel (see :class:`~lorajax.MatrixSpec`): ``a: (*batch, d_in, r)`` and
``b: (r, d_out)`` batched the same way, so a stacked kernel ``(L, d_in, d_out)`` gets
``a: (L, d_in, r)`` and ``b: (L, r, d_out)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lorajax._src.matrices import MatrixLayout
from lorajax._src.targets import path_str

__all__ = [
    "LoRA",
    "check_adapters_match",
    "flatten_up_to",
    "is_adapter_leaf",
    "is_lora",
    "lora_leaves",
    "map_lora",
]


@dataclasses.dataclass(frozen=True)
class LoRA:
    r"""A low-rank adapter ``W = W0 + s·a·b`` for one (batch of) kernel(s).

    A pytree node: ``a``, ``b`` and the optional DoRA ``magnitude`` are its children (so
    ``jax.grad`` with respect to a tree of adapters gives a tree of ``LoRA`` gradients);
    the rest is static metadata.

    Attributes:
        a: The input-side factor ``(*batch, d_in, r)`` (PEFT's ``lora_A`` transposed).
        b: The output-side factor ``(*batch, r, d_out)`` (PEFT's ``lora_B`` transposed).
        magnitude: DoRA's magnitude vector ``(*batch, d_out)``, or ``None`` for LoRA.
        scale: The factor ``s`` applied to ``a @ b``: ``alpha / r`` or, with rsLoRA,
            ``alpha / sqrt(r)``.
        alpha: The ``alpha`` the scale was derived from.
        rank: The rank ``r``.
        frozen_a: Whether ``a`` is frozen (LoRA-FA, LoRI). Transforms that honour it
            (:func:`lorajax.adapters.freeze`, :func:`lorajax.lora_pro`) never move it.
        layout: How the adapted kernel is read as matrices (its shape and axes); merging
            maps ``s·a·b`` back to the kernel's shape through it.
        sparsity: LoRI's target sparsity of ``b`` (the default of
            :func:`lorajax.adapters.lori_mask`); ``None`` for other inits.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> w = {"dense": {"kernel": jnp.ones((4, 3))}}
        >>> ad, _ = lorajax.adapters.init(jax.random.key(0), w, rank=2, alpha=4, targets=None)
        >>> lora = ad["dense"]["kernel"]
        >>> lora.a.shape, lora.b.shape, lora.scale
        ((4, 2), (2, 3), 2.0)
    """

    a: Float[Array, "*batch d_in r"]
    b: Float[Array, "*batch r d_out"]
    magnitude: Float[Array, "*batch d_out"] | None = None
    scale: float = 1.0
    alpha: float = 1.0
    rank: int = 1
    frozen_a: bool = False
    layout: MatrixLayout | None = None
    sparsity: float | None = None

    def delta_matrix(self) -> jax.Array:
        """``s·a·b`` in the matrix view ``(*batch, n, m)`` (float32), without DoRA."""
        return self.scale * jnp.matmul(
            self.a.astype(jnp.float32),
            self.b.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )

    def delta(self) -> jax.Array:
        """``s·a·b`` in the kernel's own shape (float32), ignoring any DoRA magnitude."""
        d = self.delta_matrix()
        return d if self.layout is None else self.layout.from_matrix(d)

    def replace(self, **changes: Any) -> LoRA:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    LoRA,
    data_fields=["a", "b", "magnitude"],
    meta_fields=["scale", "alpha", "rank", "frozen_a", "layout", "sparsity"],
)


def is_lora(x: Any) -> bool:
    """Whether ``x`` is a :class:`LoRA` node (e.g. as ``is_leaf`` for ``jax.tree`` calls).

    Args:
        x: Any object.

    Returns:
        ``True`` for a :class:`LoRA`.

    Examples:
        >>> import jax, jax.numpy as jnp, lorajax
        >>> ad, _ = lorajax.adapters.init(0, {"w": jnp.ones((4, 4))}, rank=2, targets="w")
        >>> [type(x).__name__ for x in jax.tree.leaves(ad, is_leaf=lorajax.adapters.is_lora)]
        ['LoRA']
    """
    return isinstance(x, LoRA)


def is_adapter_leaf(x: Any) -> bool:
    """The leaves of an adapter tree: a :class:`LoRA` or ``None`` (``is_leaf`` for jax.tree)."""
    return x is None or isinstance(x, LoRA)


def flatten_up_to(treedef: Any, tree: Any, problem: str, fix: str) -> list[Any]:
    """``treedef.flatten_up_to(tree)``, with ``ValueError(f"{problem}: {why}. {fix}")``."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{problem}: {e}. {fix}") from None


def lora_leaves(adapters: Any) -> list[tuple[str, LoRA]]:
    """The ``(path, LoRA)`` pairs of an adapter tree, in tree order."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter_leaf)
    return [(path_str(p), x) for p, x in with_path if isinstance(x, LoRA)]


def map_lora(fn: Callable[..., Any], adapters: Any, *rest: Any, with_path: bool = False) -> Any:
    """Maps ``fn`` over the :class:`LoRA` nodes of ``adapters``.

    ``rest`` are trees with the structure of ``adapters`` above its LoRA/None leaves
    (e.g. the params: the subtree at a LoRA position is the kernel). ``None`` leaves of
    ``adapters`` map to ``None`` without calling ``fn``; other leaves are returned as is.

    Args:
        fn: Called as ``fn(lora, *matching)`` (or ``fn(path, lora, *matching)``).
        adapters: A tree with LoRA/None leaves.
        *rest: Trees matched against ``adapters``.
        with_path: Whether ``fn`` takes the ``"/"``-joined path first.

    Returns:
        The tree of ``fn``'s results.
    """

    def visit(path: Any, x: Any, *others: Any) -> Any:
        if isinstance(x, LoRA):
            return fn(path_str(path), x, *others) if with_path else fn(x, *others)
        return x

    return jax.tree_util.tree_map_with_path(visit, adapters, *rest, is_leaf=is_adapter_leaf)


def check_adapters_match(params: Any, adapters: Any, what: str = "adapters") -> None:
    """Raises a clear ``ValueError`` unless ``adapters`` fits ``params``.

    Every LoRA must sit where ``params`` has an array of the shape its ``layout`` was
    built for, with factors ``a: (*batch, n, r)`` and ``b: (*batch, r, m)``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter_leaf)
    kernels = flatten_up_to(
        treedef,
        params,
        f"`{what}` do not have the structure of `params`",
        "Build them with lorajax.adapters.init(key, params, ...) on these params.",
    )
    for (path, lora), kernel in zip(flat, kernels):
        if not isinstance(lora, LoRA):
            continue
        where = path_str(path)
        shape = tuple(getattr(kernel, "shape", ()))
        layout = lora.layout
        if layout is None or shape != layout.shape:
            raise ValueError(
                f"`{what}` at {where!r} was built for a kernel of shape "
                f"{None if layout is None else layout.shape}, but `params` has shape {shape} "
                "there. Re-create the adapters for these params."
            )
        *batch, n, m = layout.matrix_shape
        want_a, want_b = (*batch, n, lora.rank), (*batch, lora.rank, m)
        if tuple(lora.a.shape) != want_a or tuple(lora.b.shape) != want_b:
            raise ValueError(
                f"`{what}` at {where!r}: factors have shapes a={tuple(lora.a.shape)}, "
                f"b={tuple(lora.b.shape)}; a kernel of shape {shape} at rank {lora.rank} "
                f"needs a={want_a}, b={want_b}."
            )

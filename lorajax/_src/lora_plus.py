r"""LoRA+: a larger learning rate for ``b`` than for ``a``, as an optax transform."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorajax._src import checks
from lorajax._src.adapters.tree import LoRA, is_lora
from lorajax._src.targets import path_str

__all__ = ["LoraPlusState", "lora_plus"]


class LoraPlusState(NamedTuple):
    """State of :func:`lora_plus`.

    Attributes:
        count: Number of updates taken (int32).
    """

    count: jax.Array


def _scaled(x: jax.Array, factor: Any) -> jax.Array:
    """``x·factor`` computed in float32 and returned in ``x``'s dtype."""
    f = jnp.asarray(factor).astype(jnp.float32)
    return (x.astype(jnp.float32) * f).astype(x.dtype)


def _check_factor(value: Any, name: str) -> None:
    if isinstance(value, (str, bool)):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}.")
    checks.check_positive(value, name)


def lora_plus(
    ratio: float,
    *,
    embedding_ratio: float | None = None,
    embedding_pattern: str = r"embed|wte|wpe",
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA+: multiplies the updates of every adapter's ``b`` by ``ratio``.

    For ``W = W0 + s·a·b`` with ``b`` initialised at zero, Hayou et al. show that equal
    learning rates for ``a`` and ``b`` are inefficient at large width: ``b`` should learn
    ``λ`` times faster, with ``λ ≈ 16`` (``2⁴``) a good default. Placed after the
    optimizer and before the learning rate,

    .. math:: u_b \leftarrow \lambda\, u_b, \qquad u_a,\ u_m,\ u_{\text{other}}
       \text{ unchanged},

    so ``b`` steps with learning rate ``λ·η`` and everything else with ``η``. Only
    :class:`~lorajax.adapters.LoRA` ``b`` leaves are touched: ``a``, DoRA magnitudes and
    plain arrays (biases, heads) keep their updates bit for bit. PEFT's
    ``create_loraplus_optimizer`` also puts 1-D parameters in the fast group; here they
    are left alone.

    Embeddings are the exception: with ``embedding_ratio`` set, every update whose path
    (of the adapter, for LoRA factors, or of the array) matches ``embedding_pattern``
    (``re.search`` on the ``"/"``-joined path) is multiplied by ``embedding_ratio``
    instead, ``a`` and ``b`` alike. Embeddings, when trained at all, need about 0.1× the
    learning rate; PEFT instead gives them an absolute learning rate (``1e-6`` by
    default), which here is ``embedding_ratio = 1e-6 / η``.

    Args:
        ratio: The LoRA+ ratio ``λ > 0`` (a float, or a schedule under
            ``optax.inject_hyperparams``).
        embedding_ratio: If set, the factor for updates whose path matches
            ``embedding_pattern`` (all of their leaves), instead of the above.
        embedding_pattern: Regular expression for embedding paths.

    Returns:
        An ``optax.GradientTransformationExtraArgs``; ``params`` are not needed.

    Raises:
        ValueError / TypeError: for a ratio that is not positive or a pattern that does
            not compile.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, lorajax
        >>> lora = lorajax.adapters.LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 3)), rank=2)
        >>> adapters = {"dense": lora}
        >>> tx = optax.chain(
        ...     optax.scale_by_adam(), lorajax.lora_plus(16.0), optax.scale_by_learning_rate(1e-3))
        >>> state = tx.init(adapters)
        >>> grads = jax.tree.map(jnp.ones_like, adapters)
        >>> updates, _ = tx.update(grads, state, adapters)
        >>> float(updates["dense"].a[0, 0]), float(updates["dense"].b[0, 0])
        (-0.001, -0.016)

    References:
        - Hayou, Ghosh and Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
          <https://arxiv.org/abs/2402.12354>`_, 2024.
    """
    _check_factor(ratio, "ratio")
    if embedding_ratio is not None:
        _check_factor(embedding_ratio, "embedding_ratio")
    if not isinstance(embedding_pattern, str):
        raise TypeError(
            f"`embedding_pattern` must be a regular expression string, got {embedding_pattern!r}."
        )
    try:
        pattern = re.compile(embedding_pattern)
    except re.error as e:
        raise ValueError(
            f"`embedding_pattern`={embedding_pattern!r} is not a valid regular expression: {e}."
        ) from None

    def is_embedding(path: Any) -> bool:
        return embedding_ratio is not None and pattern.search(path_str(path)) is not None

    def init_fn(params: optax.Params) -> LoraPlusState:
        del params
        return LoraPlusState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: LoraPlusState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LoraPlusState]:
        del params, extra_args

        def visit(path: Any, u: Any) -> Any:
            if is_embedding(path):
                return jax.tree.map(lambda x: _scaled(x, embedding_ratio), u)
            if isinstance(u, LoRA):
                return u.replace(b=_scaled(u.b, ratio))
            return u

        new = jax.tree_util.tree_map_with_path(visit, updates, is_leaf=is_lora)
        return new, LoraPlusState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

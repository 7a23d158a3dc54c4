r"""LoRI's sparse mask: the globally largest entries of the ``b`` factors.

LoRI (LoRA with reduced interference) freezes ``a`` at its random init and trains
``b`` under a fixed sparse mask shared across the whole model. The mask keeps the
entries of largest magnitude, counted over all layers at once, so that layers whose
``b`` moved a lot during calibration keep more of their entries than others.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from lorajax._src.adapters.tree import LoRA, lora_leaves, map_lora

__all__ = ["lori_mask"]

_DEFAULT_SPARSITY = 0.9


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, (bool, str, bytes)):
        raise TypeError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"`sparsity` must be in [0, 1) (the fraction of b entries dropped), got "
            f"{sparsity!r}. 0.9 keeps the largest 10%."
        )
    return value


def lori_mask(adapters: Any, sparsity: float | None = None) -> Any:
    r"""The global top-``k`` mask of ``|b|`` over every LoRA of a tree (LoRI).

    With :math:`N` the number of entries of all ``b`` factors together,

    .. math::

        k = \operatorname{round}\big((1 - \text{sparsity})\, N\big), \qquad
        \text{mask} = \big\{\, |b_{ij}| \text{ among the } k \text{ largest of all }
        |b| \,\big\},

    so exactly ``k`` entries are kept overall, however they fall across layers (a layer
    whose ``b`` stayed small can keep none). Equal magnitudes are broken in favour of the
    entry that comes first: earlier in tree order, then lower flat (row-major) index.

    The LoRI recipe:

    1. calibrate: train dense adapters briefly (``init="lori"`` freezes ``a``);
    2. ``mask = lori_mask(calibrated)`` (sparsity 0.9 unless set otherwise);
    3. retrain from a fresh init with the same key (so the same frozen ``a``), with the
       masked-out entries of ``b`` held at zero: put ``lorajax.adapters.freeze(mask)``
       last in the optimizer chain; it zeroes the updates of the frozen ``a`` and of
       the masked ``b`` entries.

    Args:
        adapters: A tree of ``LoRA`` / ``None`` leaves, e.g. after calibration.
        sparsity: The fraction of ``b`` entries to drop, in ``[0, 1)``. ``None`` takes
            the sparsity the adapters record (``LoRA.sparsity``, set by
            ``init(..., init="lori", sparsity=...)``), else 0.9.

    Returns:
        A tree with the structure of ``adapters`` where every ``LoRA`` is replaced by a
        boolean array shaped like its ``b`` (``True`` = trainable) and ``None`` stays
        ``None``.

    Raises:
        TypeError: if ``sparsity`` is not a number.
        ValueError: if ``sparsity`` is outside ``[0, 1)``, if the tree holds no LoRA, or
            if ``sparsity`` is ``None`` and the adapters record different sparsities.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> from lorajax.adapters import LoRA
        >>> spec = lorajax.MatrixSpec()
        >>> big = LoRA(a=jnp.zeros((3, 1)), b=jnp.array([[5.0, -4.0]]),
        ...            layout=spec.resolve((3, 2)))
        >>> small = LoRA(a=jnp.zeros((3, 1)), b=jnp.array([[0.1, -3.0]]),
        ...              layout=spec.resolve((3, 2)))
        >>> mask = lorajax.adapters.lori_mask({"big": big, "small": small}, sparsity=0.25)
        >>> mask["big"], mask["small"]
        (Array([[ True,  True]], dtype=bool), Array([[False,  True]], dtype=bool))

    References:
        Zhang et al., *LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank
        Adaptation*, 2025. https://arxiv.org/abs/2504.07448
    """
    if sparsity is not None:
        _check_sparsity(sparsity)
    leaves = lora_leaves(adapters)
    if not leaves:
        raise ValueError(
            "`adapters` holds no LoRA: lori_mask needs a tree from lorajax.adapters.init "
            "(a LoRA at each targeted kernel)."
        )
    if sparsity is None:
        recorded = sorted({lora.sparsity for _, lora in leaves if lora.sparsity is not None})
        if len(recorded) > 1:
            raise ValueError(
                f"The adapters record different sparsities {recorded}; pass `sparsity` "
                "explicitly, e.g. lori_mask(adapters, sparsity=0.9)."
            )
        sparsity = recorded[0] if recorded else _DEFAULT_SPARSITY
    value = _check_sparsity(sparsity)
    sizes = [math.prod(lora.b.shape) for _, lora in leaves]
    total = sum(sizes)
    k = round((1.0 - value) * total)
    magnitudes = jnp.concatenate(
        [jnp.abs(lora.b.astype(jnp.float32)).reshape(-1) for _, lora in leaves]
    )
    if k == 0:
        keep = jnp.zeros((total,), bool)
    elif k >= total:
        keep = jnp.ones((total,), bool)
    else:
        # lax.top_k returns equal values in index order, hence the tie-breaking.
        _, idx = jax.lax.top_k(magnitudes, k)
        keep = jnp.zeros((total,), bool).at[idx].set(True)
    pieces = iter(jnp.split(keep, list(itertools.accumulate(sizes))[:-1]))

    def one(lora: LoRA) -> Bool[Array, "*batch r d_out"]:
        return next(pieces).reshape(lora.b.shape)

    return map_lora(one, adapters)

"""Adapter mode: LoRA factors as a pytree, their inits, merging and combining.

lorajax's core (:func:`lorajax.low_rank`) needs no adapters. When you want them (to ship
a small file, serve several tasks on one base, or follow a paper's recipe exactly), this
module holds them as a tree with the structure of the params: a :class:`LoRA` at every
targeted kernel and ``None`` elsewhere.

Train them with any optax chain, adding :func:`lorajax.lora_plus`,
:func:`lorajax.lora_pro` and :func:`freeze` (for frozen ``a`` and LoRI masks) as needed;
call the model through :func:`apply` or :func:`merge`.
"""

from lorajax._src.adapters.combine import combine
from lorajax._src.adapters.dora import dora
from lorajax._src.adapters.freeze import freeze
from lorajax._src.adapters.init import INITS, init
from lorajax._src.adapters.lori import lori_mask
from lorajax._src.adapters.merge import apply, merge, unmerge
from lorajax._src.adapters.tree import LoRA, is_lora

__all__ = [
    "LoRA",
    "INITS",
    "init",
    "merge",
    "unmerge",
    "apply",
    "dora",
    "combine",
    "lori_mask",
    "freeze",
    "is_lora",
]

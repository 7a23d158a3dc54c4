"""lorajax: LoRA as a low-rank projection of the gradient, for optax.

The core is :func:`low_rank`, a wrapper around any optax transform that runs it on
rank-``r`` projections of the matrix gradients and maps the result back to full shape.
:func:`galore`, :func:`flora` and :func:`lora` are ready-made optimizers built on it.
"""

from lorajax._src.bases import subspace_overlap
from lorajax._src.flora import flora
from lorajax._src.galore import galore
from lorajax._src.lora import lora
from lorajax._src.matrices import MatrixLayout, MatrixSpec
from lorajax._src.projection import low_rank
from lorajax._src.randomized_svd import randomized_svd
from lorajax._src.state import LowRankState, Projector, TwoSidedCoords, current_bases
from lorajax._src.targets import PRESETS, resolve_targets

__version__ = "0.1.0"

__all__ = [
    # core transform
    "low_rank",
    "LowRankState",
    "Projector",
    "TwoSidedCoords",
    "current_bases",
    # aliases
    "galore",
    "flora",
    "lora",
    # matrices and targets
    "MatrixSpec",
    "MatrixLayout",
    "PRESETS",
    "resolve_targets",
    # linear algebra
    "randomized_svd",
    "subspace_overlap",
]

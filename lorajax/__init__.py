"""lorajax: LoRA as a low-rank projection of the gradient, for optax.

The core is :func:`low_rank`, a wrapper around any optax transform that runs it on
rank-``r`` projections of the matrix gradients and maps the result back to full shape.
:func:`galore`, :func:`flora` and :func:`lora` are ready-made optimizers built on it.

Adapter mode is optional: :mod:`lorajax.adapters` (LoRA factors as a pytree, their inits,
merging), :func:`lora_plus` and :func:`lora_pro` (optax transforms over adapter
gradients) and :mod:`lorajax.nnx` (LoRA in Flax NNX models).

Around them: :mod:`lorajax.models` (a Llama-family NNX model, Hugging Face and GGUF
loaders, SmolLM2-135M as the embedded default), :mod:`lorajax.data` (text to packed
batches), :mod:`lorajax.train` (the step builder behind ``lorajax finetune``),
:mod:`lorajax.checkpoint` (Orbax checkpoints, exact resume) and :mod:`lorajax.peft_format`
(Hugging Face PEFT adapter files in both directions).
"""

from lorajax import adapters
from lorajax._src.bases import subspace_overlap
from lorajax._src.flora import flora
from lorajax._src.galore import galore
from lorajax._src.lora import lora
from lorajax._src.lora_plus import lora_plus
from lorajax._src.lora_pro import lora_pro
from lorajax._src.matrices import MatrixLayout, MatrixSpec
from lorajax._src.probe import Coordinates, Probe
from lorajax._src.probed import probe_tap, probed_einsum, probed_matmul
from lorajax._src.probing import FULL_GRADIENT, coordinate_zeros, probes, refresh_due
from lorajax._src.projection import low_rank
from lorajax._src.randomized_svd import randomized_svd
from lorajax._src.state import LowRankState, Projector, TwoSidedCoords, current_bases
from lorajax._src.targets import PRESETS, resolve_targets

__version__ = "0.1.0"


_LAZY = ("nnx", "models", "data", "train", "checkpoint", "peft_format", "sharding")


def __getattr__(name: str):
    # These import Flax, tokenizers and the model code; load them on first use only.
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"lorajax.{name}")
    raise AttributeError(f"module 'lorajax' has no attribute {name!r}")


__all__ = [
    # core transform
    "low_rank",
    "LowRankState",
    "Projector",
    "TwoSidedCoords",
    "current_bases",
    # projected backward
    "probes",
    "refresh_due",
    "coordinate_zeros",
    "Probe",
    "Coordinates",
    "FULL_GRADIENT",
    "probed_matmul",
    "probed_einsum",
    "probe_tap",
    # aliases
    "galore",
    "flora",
    "lora",
    # adapter mode
    "adapters",
    "nnx",
    "lora_plus",
    "lora_pro",
    # real models and the fine-tuning loop
    "models",
    "data",
    "train",
    # persistence and interop
    "checkpoint",
    "peft_format",
    # scaling out
    "sharding",
    # matrices and targets
    "MatrixSpec",
    "MatrixLayout",
    "PRESETS",
    "resolve_targets",
    # linear algebra
    "randomized_svd",
    "subspace_overlap",
]

"""Hugging Face PEFT LoRA adapter files, in both directions, for Llama-family models.

- :func:`save_peft`: an adapter tree to ``adapter_model.safetensors`` +
  ``adapter_config.json``, which ``peft.PeftModel.from_pretrained`` loads.
- :func:`load_peft`: such a directory (also one written by PEFT's ``save_pretrained``)
  to an adapter tree for a :class:`lorajax.models.Llama`'s params, scanned or not.
- :func:`save_merged`: the model with its adapters merged, as a Hugging Face checkpoint
  directory that :func:`lorajax.models.load_hf` and ``transformers`` read.
"""

from lorajax._src.peft.names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lorajax._src.peft.read import load_peft
from lorajax._src.peft.write import save_merged, save_peft

__all__ = [
    "save_peft",
    "load_peft",
    "save_merged",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
]

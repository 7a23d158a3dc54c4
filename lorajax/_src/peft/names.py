r"""Hugging Face PEFT LoRA adapter directories, read and written, for Llama-family models.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``.
For every adapted ``nn.Linear`` named ``<module>`` (e.g. ``model.layers.3.self_attn.q_proj``)
the weights file has

- ``base_model.model.<module>.lora_A.weight``: ``(r, d_in)``, our ``aᵀ``;
- ``base_model.model.<module>.lora_B.weight``: ``(d_out, r)``, our ``bᵀ``;
- with DoRA, ``base_model.model.<module>.lora_magnitude_vector``: ``(d_out,)``, the norm
  of each output feature's row of ``W0 + s·B·A``, which is our ``magnitude`` (the norm of
  each output column of the kernel ``(d_in, d_out)``).

So that PEFT's ``nn.Linear`` update ``x Aᵀ Bᵀ · s`` and ours ``x a b · s`` agree,

.. math:: s = \alpha / r \quad\text{or, with rsLoRA,}\quad s = \alpha / \sqrt{r},

with ``r`` and ``α`` from ``adapter_config.json`` (``r``/``lora_alpha``, overridden per
module by the regular expressions of ``rank_pattern``/``alpha_pattern``).

Our parameter paths map to module names by joining with dots and dropping ``kernel``:
``model/layers/3/self_attn/q_proj/kernel`` is ``model.layers.3.self_attn.q_proj``; a
stacked (scanned) kernel ``model/layers/self_attn/q_proj/kernel`` of shape
``(L, d_in, d_out)`` is the ``L`` modules ``model.layers.<i>.self_attn.q_proj``.

Fields PEFT has no place for (a frozen ``a``, LoRI's ``sparsity``, a scale that is not
``α/r``, a non-float32 dtype) travel in the safetensors header metadata under
``"lorajax"``; PEFT ignores it.

References:
    Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, 2021,
    https://arxiv.org/abs/2106.09685.
    Liu et al., *DoRA: Weight-Decomposed Low-Rank Adaptation*, 2024,
    https://arxiv.org/abs/2402.09353.
    The PEFT library: https://huggingface.co/docs/peft (``LoraConfig``, ``save_pretrained``).
"""

from __future__ import annotations

import re
from typing import Any

import jax

from lorajax._src.targets import path_str

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

#: The adapter config file of a PEFT directory.
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: The adapter weights file of a PEFT directory.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

_PREFIX = "base_model.model."
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\."
    r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)"
)
_KIND = {"lora_A.weight": "A", "lora_B.weight": "B"}
# Full weights PEFT adds when an embedding-like module is targeted (``save_embedding_layers``):
# our param path and whether the file holds it transposed.
_FULL_WEIGHTS = {
    "lm_head": ("lm_head/kernel", True),
    "model.embed_tokens": ("model/embed_tokens/embedding", False),
}
_FULL_KEY = re.compile(
    r"base_model\.model\.(?P<module>lm_head|model\.embed_tokens)(?:\.base_layer)?\.weight"
)
_EXTRAS_KEY = "lorajax"
# PEFT's LoraConfig defaults, used for fields a config leaves out.
_DEFAULT_R, _DEFAULT_ALPHA = 8, 8


# --------------------------------------------------------------------------- names


def _module_names(path: str, batch_shape: tuple[int, ...]) -> list[str] | None:
    """The PEFT module name(s) of a kernel path: one, or one per layer of a stacked kernel."""
    parts = path.split("/")
    if len(parts) < 2 or parts[-1] != "kernel":
        return None
    module = parts[:-1]
    if not batch_shape:
        return [".".join(module)]
    stacked = len(module) > 2 and module[:2] == ["model", "layers"] and not module[2].isdigit()
    if len(batch_shape) == 1 and stacked:
        return [".".join(["model", "layers", str(i), *module[2:]]) for i in range(batch_shape[0])]
    return None


def _kernel_index(params: Any) -> tuple[dict[str, tuple[str, int | None]], list[str], Any, list]:
    """Maps every PEFT module name of ``params`` to ``(param path, layer or None)``."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    index: dict[str, tuple[str, int | None]] = {}
    for path, leaf in zip(paths, leaves):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2:
            continue
        names = _module_names(path, shape[:-2])
        for i, name in enumerate(names or []):
            index[name] = (path, i if len(shape) > 2 else None)
    return index, paths, treedef, leaves


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's rule: the first key matching the end of ``module`` after a dot (or all of it)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _targets_match(target_modules: Any, module: str) -> bool:
    """Whether PEFT's ``target_modules`` (a list of names/suffixes or a regex) selects it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)

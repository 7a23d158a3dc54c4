"""Between Hugging Face tensor dicts (names and ``(d_out, d_in)`` layouts) and :class:`Llama`.

Hugging Face stores ``nn.Linear.weight`` as ``(d_out, d_in)``; the NNX kernels are
``(d_in, d_out)``, so every projection is transposed on the way in and out. Norm scales and
the embedding table keep their layout. ``lm_head.weight`` exists only for untied models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from lorajax._src.models.config import LlamaConfig
from lorajax._src.models.errors import ModelFileError
from lorajax._src.models.llama import Llama

__all__ = ["hf_tensor_names", "hf_tensors_from_model", "model_from_hf_tensors"]

_LAYER_KEYS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
# Buffers some older checkpoints carry; they are recomputed from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_tensor_names(config: LlamaConfig) -> list[str]:
    """The Hugging Face tensor names a checkpoint of ``config`` holds (``lm_head`` if untied).

    Examples:
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.convert import hf_tensor_names
        >>> names = hf_tensor_names(LlamaConfig(97, 32, 48, 2, 4, 2, tie_word_embeddings=True))
        >>> len(names), names[0], names[-1]
        (20, 'model.embed_tokens.weight', 'model.norm.weight')
    """
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{key}" for key in _LAYER_KEYS]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _hf_name(path: tuple[Any, ...], layer: int | None) -> tuple[str, bool] | None:
    """The HF name of an NNX param path and whether it is transposed; None if unknown."""
    keys = [str(k) for k in path]
    if keys == ["model", "embed_tokens", "embedding"]:
        return "model.embed_tokens.weight", False
    if keys == ["model", "norm", "scale"]:
        return "model.norm.weight", False
    if keys == ["lm_head", "kernel"]:
        return "lm_head.weight", True
    if len(keys) < 3 or keys[:2] != ["model", "layers"]:
        return None
    rest = keys[2:]
    if layer is None:  # unscanned: the layer index is part of the path
        if not rest[0].isdigit():
            return None
        layer, rest = int(rest[0]), rest[1:]
    if not rest or rest[-1] not in ("kernel", "scale"):
        return None
    key = ".".join([*rest[:-1], "weight"])
    if key not in _LAYER_KEYS:
        return None
    return f"model.layers.{layer}.{key}", rest[-1] == "kernel"


def _flat_params(state: Any) -> dict[tuple[Any, ...], Any]:
    return traverse_util.flatten_dict(nnx.to_pure_dict(state))


def model_from_hf_tensors(
    config: LlamaConfig,
    tensors: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    source: str = "tensors",
) -> Llama:
    """Builds a :class:`Llama` holding the given Hugging Face tensors.

    Every tensor is checked (names, shapes, floating dtype) before any parameter is
    materialised; the model's random initialisation never runs.

    Args:
        config: The model config.
        tensors: Hugging Face names to arrays in Hugging Face layouts:
            ``model.embed_tokens.weight (V, d)``,
            ``model.layers.{i}.self_attn.q_proj.weight (H·hd, d)``, ...,
            ``model.norm.weight (d,)`` and ``lm_head.weight (V, d)`` (required when untied;
            ignored when tied).
        dtype: Compute dtype of the model.
        param_dtype: Storage dtype of the parameters.
        scan_layers: Build the stacked-layer layout (see :class:`Llama`).
        remat: Gradient checkpointing (see :class:`Llama`).
        source: Where the tensors came from (a file path), for error messages.

    Returns:
        The model.

    Raises:
        ModelFileError: a tensor is missing, unexpected, wrongly shaped or not floating
            point; the message names the tensor and ``source``.

    Examples:
        >>> import numpy as np
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.convert import (
        ...     hf_tensor_names, hf_tensors_from_model, model_from_hf_tensors)
        >>> cfg = LlamaConfig(97, 32, 48, 2, 4, 2, tie_word_embeddings=True)
        >>> rng = np.random.default_rng(0)
        >>> shapes = {"model.embed_tokens.weight": (97, 32), "model.norm.weight": (32,)}
        >>> for i in range(2):
        ...     p = f"model.layers.{i}."
        ...     shapes.update({p + "input_layernorm.weight": (32,),
        ...                    p + "post_attention_layernorm.weight": (32,),
        ...                    p + "self_attn.q_proj.weight": (32, 32),
        ...                    p + "self_attn.k_proj.weight": (16, 32),
        ...                    p + "self_attn.v_proj.weight": (16, 32),
        ...                    p + "self_attn.o_proj.weight": (32, 32),
        ...                    p + "mlp.gate_proj.weight": (48, 32),
        ...                    p + "mlp.up_proj.weight": (48, 32),
        ...                    p + "mlp.down_proj.weight": (32, 48)})
        >>> tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        >>> model = model_from_hf_tensors(cfg, tensors, scan_layers=True)
        >>> model.model.layers.self_attn.q_proj.kernel.shape
        (2, 32, 32)
        >>> back = hf_tensors_from_model(model)
        >>> all(np.array_equal(back[k], tensors[k]) for k in tensors)
        True
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"`config` must be a LlamaConfig, got {type(config).__name__}.")
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"`tensors` must be a mapping of Hugging Face names to arrays, got "
            f"{type(tensors).__name__}."
        )
    expected = hf_tensor_names(config)
    wanted = set(expected)
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelFileError(
            f"{source}: missing tensor(s) {shown}{more}. The checkpoint does not match its "
            f"config ({config.num_hidden_layers} layers, tie_word_embeddings="
            f"{config.tie_word_embeddings}); use the config.json saved with these weights."
        )
    unexpected = [
        name
        for name in tensors
        if name not in wanted
        and not (config.tie_word_embeddings and name == "lm_head.weight")
        and not name.endswith(_IGNORED_SUFFIXES)
    ]
    if unexpected:
        shown = ", ".join(repr(n) for n in sorted(unexpected)[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ModelFileError(
            f"{source}: unexpected tensor(s) {shown}{more}: not part of a Llama model with "
            f"this config. Check that the checkpoint is a LlamaForCausalLM whose config.json "
            f"matches (layer count, architecture)."
        )

    abstract = nnx.eval_shape(
        lambda: Llama(
            config,
            rngs=nnx.Rngs(0),
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            remat=remat,
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = _flat_params(state)
    layers = range(config.num_hidden_layers)
    filled: dict[tuple[Any, ...], Any] = {}
    plan: list[tuple[tuple[Any, ...], list[str], bool, bool]] = []
    for path, leaf in flat.items():
        if scan_layers and len(path) > 2 and path[:2] == ("model", "layers"):
            entries = [_hf_name(path, i) for i in layers]
        else:
            entries = [_hf_name(path, None)]
        if any(e is None for e in entries):
            raise AssertionError(f"no Hugging Face name for parameter {path}")  # pragma: no cover
        names = [e[0] for e in entries]  # type: ignore[index]
        transpose = entries[0][1]  # type: ignore[index]
        stacked = scan_layers and names[0].startswith("model.layers.")
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        hf_shape = shape[::-1] if transpose else shape
        for name in names:
            value = tensors[name]
            got = getattr(value, "shape", None)
            if got is None or tuple(got) != hf_shape:
                raise ModelFileError(
                    f"{source}: tensor {name!r} has shape {got}, expected "
                    f"{hf_shape} for this config; the weights and config.json do not match."
                )
            kind = np.dtype(getattr(value, "dtype", np.float32))
            if not (np.issubdtype(kind, np.floating) or kind.name == "bfloat16"):
                raise ModelFileError(
                    f"{source}: tensor {name!r} has dtype {kind}, expected a floating "
                    f"dtype; re-export the checkpoint unquantized."
                )
        plan.append((path, names, transpose, stacked))

    target = jnp.dtype(param_dtype)
    for path, names, transpose, stacked in plan:
        arrays = [np.asarray(tensors[name]) for name in names]
        if transpose:
            arrays = [a.T for a in arrays]
        value = np.stack(arrays) if stacked else arrays[0]
        filled[path] = jnp.asarray(value, dtype=target)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(filled))
    return nnx.merge(graphdef, state)


def hf_tensors_from_model(model: Llama) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays under Hugging Face names and layouts.

    The inverse of :func:`model_from_hf_tensors` (scanned layers are unstacked; tied models
    have no ``lm_head.weight``).

    Args:
        model: A :class:`Llama` (merge any LoRA layers into the kernels first).

    Returns:
        A dict of C-contiguous float32 arrays.

    Raises:
        ValueError: the model holds parameters that have no Hugging Face name (e.g. LoRA
            layers that were not merged).

    Examples:
        >>> from flax import nnx
        >>> from lorajax._src.models.config import LlamaConfig
        >>> from lorajax._src.models.convert import hf_tensors_from_model
        >>> from lorajax._src.models.llama import Llama
        >>> model = Llama(LlamaConfig(97, 32, 48, 2, 4, 2), rngs=nnx.Rngs(0))
        >>> hf_tensors_from_model(model)["model.layers.1.self_attn.k_proj.weight"].shape
        (16, 32)
    """
    if not isinstance(model, Llama):
        raise TypeError(f"`model` must be a Llama, got {type(model).__name__}.")
    flat = _flat_params(nnx.state(model))
    scanned = model.scan_layers
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat.items():
        stacked = scanned and len(path) > 2 and path[:2] == ("model", "layers")
        layers = range(model.config.num_hidden_layers) if stacked else [None]
        entries = [_hf_name(path, i) for i in layers]
        if any(e is None for e in entries):
            raise ValueError(
                f"model parameter {'/'.join(map(str, path))!r} has no Hugging Face name; merge "
                f"LoRA layers into the kernels first (lorajax.nnx.merge_lora)."
            )
        value = np.asarray(jax.device_get(leaf), dtype=np.float32)
        for i, (name, transpose) in enumerate(entries):  # type: ignore[misc]
            array = value[i] if stacked else value
            out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out

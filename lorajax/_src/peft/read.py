"""Reading PEFT adapter directories (ours or PEFT's own) into lorajax adapters."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lorajax._src.adapters.tree import LoRA
from lorajax._src.matrices import MatrixSpec
from lorajax._src.peft.names import (
    _DEFAULT_ALPHA,
    _DEFAULT_R,
    _EXTRAS_KEY,
    _FULL_KEY,
    _FULL_WEIGHTS,
    _KEY,
    _KIND,
    _PREFIX,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    _kernel_index,
    _pattern_key,
)

__all__ = ["load_peft"]


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or regenerate the file.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: peft_type is {peft_type!r}; only 'LORA' adapters can be loaded (merge "
            "other PEFT methods in PEFT, or train a LoRA adapter)."
        )
    if config.get("fan_in_fan_out", False):
        raise ValueError(
            f"{path}: fan_in_fan_out is {config['fan_in_fan_out']!r}; only nn.Linear layouts "
            "(fan_in_fan_out false, as for Llama) are supported. Re-save the adapter for a "
            "model with nn.Linear layers."
        )
    if config.get("lora_bias", False):
        raise ValueError(
            f"{path}: lora_bias is {config['lora_bias']!r}; LoRA biases are not supported. "
            "Train the adapter with lora_bias=False."
        )
    r = config.get("r", _DEFAULT_R)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{path}: `r` must be a positive int, got {r!r}.")
    alpha = config.get("lora_alpha", _DEFAULT_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{path}: `lora_alpha` must be a positive number, got {alpha!r}.")
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag, False), bool):
            raise ValueError(f"{path}: `{flag}` must be true or false, got {config[flag]!r}.")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise ValueError(
                f"{path}: `{name}` must map module regexes to values, got {pattern!r}."
            )
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{path}: `{name}` key {key!r} is not a regex ({e}).") from None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(
                    f"{path}: `{name}[{key!r}]` must be a positive number, got {value!r}."
                )
            if name == "rank_pattern" and not float(value).is_integer():
                raise ValueError(f"{path}: `rank_pattern[{key!r}]` must be an int, got {value!r}.")
    return config


def _input_dir(path: Any) -> tuple[pathlib.Path, pathlib.Path]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    directory = pathlib.Path(path)
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise FileNotFoundError(
            f"{directory}: {what}; expected a PEFT adapter directory with "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}."
        )
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: missing; a PEFT adapter directory needs {ADAPTER_CONFIG_NAME} "
            "(r, lora_alpha, ...) next to its weights. Save it with save_peft or PEFT's "
            "save_pretrained."
        )
    if not weights_path.is_file():
        legacy = directory / "adapter_model.bin"
        fix = (
            f"only safetensors is read: re-save it in PEFT with save_pretrained(..., "
            f"safe_serialization=True) ({legacy.name} found)"
            if legacy.is_file()
            else "save the adapter again"
        )
        raise FileNotFoundError(f"{weights_path}: missing; {fix}.")
    return config_path, weights_path


def load_peft(path: str | os.PathLike, params: Any) -> Any:
    r"""Reads a Hugging Face PEFT LoRA directory into an adapter tree for ``params``.

    Works on directories written by :func:`save_peft` and by PEFT's
    ``PeftModel.save_pretrained`` for a Llama-family ``*ForCausalLM``. Each module
    ``base_model.model.<module>`` of the weights file is mapped to the kernel of
    ``params`` with that name (``model.layers.3.mlp.up_proj`` is
    ``model/layers/3/mlp/up_proj/kernel``, or layer 3 of the stacked
    ``model/layers/mlp/up_proj/kernel``), with ``a = lora_Aᵀ``, ``b = lora_Bᵀ``,
    ``magnitude = lora_magnitude_vector``, rank and ``α`` from ``r``/``lora_alpha`` or
    the first matching ``rank_pattern``/``alpha_pattern`` key, and ``s = α/r`` (``α/√r``
    with ``use_rslora``). Kernels without an adapter in the file get ``None``; layers of a
    stacked kernel that the file leaves out get zero factors (and, with DoRA, the column
    norms of their kernel), which leaves them unchanged. Every key, shape and config field
    is checked before any array is read.

    Args:
        path: The adapter directory.
        params: The Llama params tree the adapter is for (nested dicts as
            ``nnx.to_pure_dict`` gives them, unscanned or scanned; arrays or
            ``jax.ShapeDtypeStruct``, except that DoRA files that leave out layers of a
            stacked kernel need the kernel values).

    Returns:
        An adapter tree with the structure of ``params``: a
        :class:`~lorajax.adapters.LoRA` (float32 factors unless the file records
        otherwise) at every adapted kernel, ``None`` elsewhere. Use it with
        :func:`lorajax.adapters.merge` / :func:`~lorajax.adapters.apply` or keep training.

    Raises:
        FileNotFoundError: the directory, ``adapter_config.json`` or
            ``adapter_model.safetensors`` is missing.
        ValueError: the config is not a plain LoRA one (another ``peft_type``,
            ``fan_in_fan_out``, LoRA biases), a key is not a LoRA key, a module has no
            kernel in ``params``, a shape does not fit the kernel or the rank, a
            ``lora_A``/``lora_B`` lacks its partner, DoRA magnitudes are missing (or
            present without ``use_dora``), or layers of one stacked kernel differ in rank
            or ``α``.

    Examples:
        >>> import tempfile, jax, jax.numpy as jnp, lorajax
        >>> from lorajax.peft_format import load_peft, save_peft
        >>> params = {"model": {"layers": {"mlp": {"up_proj": {
        ...     "kernel": jnp.ones((3, 8, 16))}}}}}  # 3 stacked layers
        >>> ad, _ = lorajax.adapters.init(jax.random.key(0), params, rank=4, use_rslora=True)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_peft(d, ad)
        ...     back = load_peft(d, params)
        >>> lora = back["model"]["layers"]["mlp"]["up_proj"]["kernel"]
        >>> lora.a.shape, lora.b.shape, lora.scale
        ((3, 8, 4), (3, 4, 16), 2.0)
    """
    config_path, weights_path = _input_dir(path)
    config = _read_config(config_path)
    r_default = config.get("r", _DEFAULT_R)
    alpha_default = float(config.get("lora_alpha", _DEFAULT_ALPHA))
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    try:
        with safe_open(str(weights_path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"{weights_path}: not a valid safetensors file ({e}); save the adapter again."
        ) from None

    # Parse and pair the keys.
    modules: dict[str, dict[str, str]] = {}
    full: list[str] = []
    for key in shapes:
        if _FULL_KEY.fullmatch(key):
            full.append(key)
            continue
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{weights_path}: key {key!r} is not a LoRA weight of a linear module (expected "
                f"'{_PREFIX}<module>.lora_A.weight', '.lora_B.weight' or "
                "'.lora_magnitude_vector'); embedding adapters, modules_to_save and LoRA "
                "biases are not supported. Save the adapter with linear target modules only."
            )
        kind = _KIND.get(match["kind"], "M")
        modules.setdefault(match["module"], {})[kind] = key
    if not modules:
        raise ValueError(f"{weights_path}: holds no LoRA weights; save the adapter again.")

    index, paths, treedef, leaves = _kernel_index(params)
    shape_of = {p: tuple(getattr(leaf, "shape", ())) for p, leaf in zip(paths, leaves)}
    # param path -> {layer or None: (module, rank, alpha)}
    plan: dict[str, dict[int | None, tuple[str, int, float]]] = {}
    for module, keys in modules.items():
        for part, partner in (("A", "B"), ("B", "A")):
            if part in keys and partner not in keys:
                raise ValueError(
                    f"{weights_path}: {keys[part]!r} has no partner lora_{partner}.weight "
                    f"for module {module!r}; the file is incomplete, save the adapter again."
                )
        if "A" not in keys:
            raise ValueError(
                f"{weights_path}: module {module!r} has a magnitude vector but no lora_A/lora_B "
                "weights; the file is incomplete, save the adapter again."
            )
        if module not in index:
            known = sorted(index)[:4]
            raise ValueError(
                f"{weights_path}: module {module!r} has no kernel in `params` (modules look "
                f"like {known}). Pass the params of the model the adapter was trained for."
            )
        where, layer = index[module]
        *_, d_in, d_out = shape_of[where]
        hit = _pattern_key(rank_pattern, module)
        r = int(r_default if hit is None else rank_pattern[hit])
        hit = _pattern_key(alpha_pattern, module)
        alpha = float(alpha_default if hit is None else alpha_pattern[hit])
        want = {"A": (r, d_in), "B": (d_out, r), "M": (d_out,)}
        for part, key in keys.items():
            if shapes[key] != want[part]:
                raise ValueError(
                    f"{weights_path}: {key!r} has shape {shapes[key]}, but the kernel "
                    f"{where!r} of shape {shape_of[where]} at rank {r} (from "
                    f"{ADAPTER_CONFIG_NAME}) needs {want[part]}. Check that the adapter is for "
                    "this model and that r/rank_pattern match its weights."
                )
        if use_dora and "M" not in keys:
            raise ValueError(
                f"{weights_path}: {ADAPTER_CONFIG_NAME} sets use_dora but module {module!r} "
                "has no lora_magnitude_vector; the file is incomplete, or set use_dora to "
                "false for a plain LoRA adapter."
            )
        if not use_dora and "M" in keys:
            raise ValueError(
                f"{weights_path}: {keys['M']!r} is a DoRA magnitude but {ADAPTER_CONFIG_NAME} "
                'does not set use_dora; set "use_dora": true in the config.'
            )
        plan.setdefault(where, {})[layer] = (module, r, alpha)

    for where, layers in plan.items():
        ranks_alphas = {(r, a) for _, r, a in layers.values()}
        if len(ranks_alphas) > 1:
            raise ValueError(
                f"{weights_path}: the layers of the stacked kernel {where!r} have different "
                f"(rank, alpha) {sorted(ranks_alphas)}; one LoRA holds one rank and alpha for "
                "all layers. Load these params unscanned (scan_layers=False)."
            )

    # Full copies of the embedding / output weights must be the base's own: we keep the base.
    for key in full:
        where, transposed = _FULL_WEIGHTS[_FULL_KEY.fullmatch(key)["module"]]  # type: ignore[index]
        if where not in shape_of:
            continue  # e.g. lm_head.weight of a model with tied embeddings
        mine = np.asarray(leaves[paths.index(where)], np.float32)
        with safe_open(str(weights_path), framework="numpy") as f:
            theirs = np.asarray(f.get_tensor(key), np.float32)
        if transposed:
            theirs = theirs.T
        if theirs.shape != mine.shape or not np.array_equal(theirs, mine):
            raise ValueError(
                f"{weights_path}: {key!r} is a full copy of the base weight {where!r} that "
                "differs from `params` (PEFT saves it when an embedding-like module such as "
                "lm_head is targeted, or when it was resized or trained); only the LoRA "
                "factors are loaded. Pass the params of the base model the adapter was "
                "trained on, or re-save the adapter with save_embedding_layers=False."
            )

    try:
        extras = json.loads(metadata.get(_EXTRAS_KEY, "{}"))
        assert isinstance(extras, dict)
    except (json.JSONDecodeError, AssertionError):
        raise ValueError(
            f"{weights_path}: the {_EXTRAS_KEY!r} header metadata is not a JSON object; save "
            "the adapter again."
        ) from None

    # Everything is checked: read the tensors and build the adapters.
    built: dict[str, LoRA] = {}
    with safe_open(str(weights_path), framework="numpy") as f:

        def read(key: str) -> np.ndarray:
            return np.asarray(f.get_tensor(key), np.float32)

        for where, layers in plan.items():
            shape = shape_of[where]
            (_, r, alpha) = next(iter(layers.values()))
            scale = alpha / (math.sqrt(r) if use_rslora else r)
            stacked = len(shape) > 2
            count = shape[0] if stacked else 1
            *_, d_in, d_out = shape
            a = np.zeros((count, d_in, r), np.float32)
            b = np.zeros((count, r, d_out), np.float32)
            m = np.zeros((count, d_out), np.float32) if use_dora else None
            for i in range(count):
                entry = layers.get(i if stacked else None)
                if entry is None:
                    if m is not None:  # a zero adapter with the kernel's own norms: no change
                        kernel = np.asarray(leaves[paths.index(where)][i], np.float32)
                        m[i] = np.sqrt(np.sum(np.square(kernel), axis=0))
                    continue
                keys = modules[entry[0]]
                a[i], b[i] = read(keys["A"]).T, read(keys["B"]).T
                if m is not None:
                    m[i] = read(keys["M"])
            if not stacked:
                a, b, m = a[0], b[0], (None if m is None else m[0])
            extra = extras.get(where, {}) if isinstance(extras.get(where), dict) else {}
            dtype = jnp.dtype(extra.get("dtype", "float32"))
            built[where] = LoRA(
                a=jnp.asarray(a, dtype),
                b=jnp.asarray(b, dtype),
                magnitude=None if m is None else jnp.asarray(m),
                scale=float(extra.get("scale", scale)),
                alpha=float(extra.get("alpha", alpha)),
                rank=r,
                frozen_a=bool(extra.get("frozen_a", False)),
                layout=MatrixSpec(batch_axes=tuple(range(len(shape) - 2))).resolve(shape, where),
                sparsity=None if extra.get("sparsity") is None else float(extra["sparsity"]),
            )
    return treedef.unflatten([built.get(p) for p in paths])

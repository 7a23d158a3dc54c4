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

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from lorajax._src.adapters.merge import merge
from lorajax._src.adapters.tree import LoRA, check_adapters_match, is_adapter_leaf
from lorajax._src.files import write_atomic
from lorajax._src.matrices import MatrixSpec
from lorajax._src.targets import path_str

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "load_peft",
    "save_merged",
    "save_peft",
]

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


# --------------------------------------------------------------------------- writing


def _output_dir(path: Any) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"{directory}: exists and is not a directory; pass a directory path (it is "
            "created if missing)."
        )
    return directory


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _patterns(
    entries: list[tuple[str, str, Any]], default: Any, all_of_leaf: dict[str, int]
) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern`` for ``(module, leaf name, value)`` entries.

    A leaf name (``"down_proj"``) is the key when every module of that name has the same
    non-default value; otherwise each differing module gets its own escaped full name.
    """
    out: dict[str, Any] = {}
    by_leaf: dict[str, list[tuple[str, Any]]] = {}
    for module, leaf, value in entries:
        by_leaf.setdefault(leaf, []).append((module, value))
    for leaf, items in by_leaf.items():
        values = {v for _, v in items}
        if len(items) == all_of_leaf[leaf] and len(values) == 1:
            (value,) = values
            if value != default:
                out[leaf] = value
            continue
        for module, value in items:
            if value != default:
                out[re.escape(module)] = value
    return out


def save_peft(
    path: str | os.PathLike,
    adapters: Any,
    *,
    base_model_name_or_path: str | None = None,
    target_modules: Sequence[str] | str | None = None,
) -> None:
    r"""Writes adapters as a Hugging Face PEFT LoRA directory.

    The directory gets ``adapter_model.safetensors`` (float32 ``lora_A.weight = aᵀ``
    ``(r, d_in)``, ``lora_B.weight = bᵀ`` ``(d_out, r)`` and, for DoRA,
    ``lora_magnitude_vector`` ``(d_out,)``, under PEFT's names) and an
    ``adapter_config.json`` that ``peft.PeftConfig.from_pretrained`` reads, so
    ``peft.PeftModel.from_pretrained(LlamaForCausalLM..., path)`` loads the adapter.
    ``r``/``lora_alpha`` are the most common rank and alpha; modules that differ get
    ``rank_pattern``/``alpha_pattern`` entries. ``use_rslora`` is set when every scale is
    ``α/√r`` (and not all are ``α/r``). A stacked kernel ``(L, d_in, d_out)`` is written as
    ``L`` modules ``model.layers.<i>...``.

    Both files are written under temporary names and renamed into place, so a failure
    leaves no partial file. The directory is created if needed; other files in it are
    left alone.

    Args:
        path: The output directory.
        adapters: An adapter tree for a Llama params tree (from
            :func:`lorajax.adapters.init` or :func:`load_peft`): LoRA nodes on
            ``.../<module>/kernel`` leaves, ``None`` elsewhere.
        base_model_name_or_path: Recorded in the config (e.g. the Hub id of the base
            model) so that ``AutoPeftModelForCausalLM`` can find the base.
        target_modules: PEFT's ``target_modules`` (module names or name suffixes, or one
            regular expression). By default: the leaf names (``"q_proj"``, ...) whose
            every instance is adapted, and the full names of the other adapted modules.

    Returns:
        None.

    Raises:
        TypeError: ``path`` is not a path or an argument has the wrong type.
        ValueError: ``adapters`` holds no LoRA, an adapter is not on a ``kernel`` leaf of
            a Llama module path, its layout is not the plain ``(*batch, d_in, d_out)``
            one, only some adapters carry a DoRA magnitude, or ``target_modules`` misses
            an adapted module.
        NotADirectoryError: ``path`` exists and is not a directory.
        OSError: the directory cannot be written.

    Examples:
        >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, lorajax
        >>> from lorajax.peft_format import load_peft, save_peft
        >>> params = {"model": {"layers": {0: {"self_attn": {"q_proj": {
        ...     "kernel": jnp.ones((8, 8))}}}}}}
        >>> ad, _ = lorajax.adapters.init(jax.random.key(0), params, rank=2, alpha=4)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_peft(d, ad)
        ...     config = json.loads(pathlib.Path(d, "adapter_config.json").read_text())
        ...     back = load_peft(d, params)
        >>> config["r"], config["lora_alpha"], config["target_modules"]
        (2, 4, ['q_proj'])
        >>> lora = back["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
        >>> bool(jnp.array_equal(lora.a, ad["model"]["layers"][0]["self_attn"]["q_proj"][
        ...     "kernel"].a)), lora.scale
        (True, 2.0)
    """
    directory = _output_dir(path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            f"`base_model_name_or_path` must be a str or None, got {base_model_name_or_path!r}."
        )
    if (
        target_modules is not None
        and not isinstance(target_modules, str)
        and (
            not isinstance(target_modules, Sequence)
            or not all(isinstance(t, str) for t in target_modules)
        )
    ):
        raise TypeError(
            "`target_modules` must be a list of module names (e.g. ['q_proj', 'v_proj']), "
            f"a regular expression string, or None; got {target_modules!r}."
        )

    with_path, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter_leaf)
    # (module, leaf name, lora, layer or None, param path)
    entries: list[tuple[str, str, LoRA, int | None, str]] = []
    all_of_leaf: collections.Counter[str] = collections.Counter()
    for key_path, node in with_path:
        where = path_str(key_path)
        parts = where.split("/")
        if node is None:
            if len(parts) >= 2 and parts[-1] == "kernel":
                all_of_leaf[parts[-2]] += 1
            continue
        if not isinstance(node, LoRA):
            raise TypeError(
                f"`adapters` must hold LoRA nodes and None only; got {type(node).__name__} at "
                f"{where!r}. Pass the tree from lorajax.adapters.init or load_peft."
            )
        layout = node.layout
        if layout is None:
            raise ValueError(
                f"`adapters` at {where!r}: the LoRA has no layout, so its kernel shape is "
                "unknown. Build adapters with lorajax.adapters.init."
            )
        nd = len(layout.shape)
        plain = (
            layout.batch_axes == tuple(range(nd - 2))
            and layout.in_axes == (nd - 2,)
            and layout.out_axes == (nd - 1,)
        )
        names = _module_names(where, layout.batch_shape) if plain else None
        if names is None:
            raise ValueError(
                f"`adapters` at {where!r} (kernel shape {layout.shape}) has no PEFT module "
                "name: PEFT LoRA files hold adapters of nn.Linear kernels, i.e. leaves "
                "'<module path>/kernel' of shape (d_in, d_out), or stacked layers "
                "'model/layers/<module>/kernel' of shape (L, d_in, d_out). Leave it out of "
                "`targets`."
            )
        all_of_leaf[parts[-2]] += len(names)
        for i, name in enumerate(names):
            entries.append((name, parts[-2], node, i if layout.batch_shape else None, where))
    if not entries:
        raise ValueError(
            "`adapters` holds no LoRA node; build them with lorajax.adapters.init(key, params, "
            "rank=...) first."
        )
    doras = {lora.magnitude is not None for _, _, lora, _, _ in entries}
    if len(doras) > 1:
        with_m = sorted({w for _, _, lora, _, w in entries if lora.magnitude is not None})
        raise ValueError(
            f"only some adapters carry a DoRA magnitude (e.g. {with_m[0]!r}); PEFT's use_dora "
            "applies to every module. Call lorajax.adapters.dora on the whole tree, or drop "
            "the magnitudes."
        )
    use_dora = doras.pop()
    if target_modules is not None:
        for name, *_ in entries:
            if not _targets_match(target_modules, name):
                raise ValueError(
                    f"`target_modules`={target_modules!r} does not select the adapted module "
                    f"{name!r}, so PEFT would not load its weights. Add its name (or its leaf "
                    f"name {name.rsplit('.', 1)[-1]!r}), or leave target_modules=None."
                )

    # Scales: alpha/r, or alpha/sqrt(r) with rsLoRA (one flag for the whole file).
    def fits(lora: LoRA, rs: bool) -> bool:
        denom = math.sqrt(lora.rank) if rs else lora.rank
        return math.isclose(lora.scale, lora.alpha / denom, rel_tol=1e-12)

    loras = [lora for _, _, lora, _, _ in entries]
    use_rslora = all(fits(x, True) for x in loras) and not all(fits(x, False) for x in loras)
    extras: dict[str, dict[str, Any]] = {}
    alphas: list[float] = []
    for _, _, lora, _, where in entries:
        extra: dict[str, Any] = {}
        alpha = float(lora.alpha)
        if not fits(lora, use_rslora):
            alpha = lora.scale * (math.sqrt(lora.rank) if use_rslora else lora.rank)
            extra.update(alpha=float(lora.alpha), scale=float(lora.scale))
        if lora.frozen_a:
            extra["frozen_a"] = True
        if lora.sparsity is not None:
            extra["sparsity"] = float(lora.sparsity)
        if jnp.dtype(lora.a.dtype) != jnp.float32:
            extra["dtype"] = jnp.dtype(lora.a.dtype).name
        if extra:
            extras[where] = extra
        alphas.append(alpha)

    r = _most_common([lora.rank for lora in loras])
    lora_alpha = _most_common(alphas)
    rank_pattern = _patterns([(n, leaf, x.rank) for n, leaf, x, _, _ in entries], r, all_of_leaf)
    alpha_entries = [(n, leaf, a) for (n, leaf, *_), a in zip(entries, alphas)]
    alpha_pattern = {
        k: _number(v) for k, v in _patterns(alpha_entries, lora_alpha, all_of_leaf).items()
    }
    if target_modules is None:
        leaves_done: list[str] = []
        targets: list[str] = []
        for name, leaf, *_ in entries:
            if all_of_leaf[leaf] == sum(1 for e in entries if e[1] == leaf):
                if leaf not in leaves_done:
                    leaves_done.append(leaf)
                    targets.append(leaf)
            else:
                targets.append(name)
        target_modules = targets
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)

    tensors: dict[str, np.ndarray] = {}
    for name, _, lora, i, _ in entries:
        a, b, m = lora.a, lora.b, lora.magnitude
        if i is not None:
            a, b, m = a[i], b[i], (None if m is None else m[i])
        prefix = _PREFIX + name
        tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
        if m is not None:
            tensors[prefix + ".lora_magnitude_vector"] = np.asarray(m, np.float32)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": _number(lora_alpha),
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    metadata = {"format": "pt"}
    if extras:
        metadata[_EXTRAS_KEY] = json.dumps(extras, sort_keys=True)
    config_text = json.dumps(config, indent=2) + "\n"

    directory.mkdir(parents=True, exist_ok=True)

    def write_weights(tmp: str) -> None:
        safetensors.numpy.save_file(tensors, tmp, metadata=metadata)

    def write_config(tmp: str) -> None:
        pathlib.Path(tmp).write_text(config_text, encoding="utf-8")

    write_atomic(
        directory, {ADAPTER_WEIGHTS_NAME: write_weights, ADAPTER_CONFIG_NAME: write_config}
    )


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- merged model


def save_merged(
    path: str | os.PathLike, model: Any, adapters: Any = None, *, tokenizer: Any = None
) -> None:
    """Writes the model with its adapters merged as a Hugging Face checkpoint directory.

    The kernels become ``W0 + s·a·b`` (DoRA: ``m ⊙ (W0 + s·a·b)/‖W0 + s·a·b‖``, see
    :func:`lorajax.adapters.merge`); the directory then holds ``config.json`` and
    ``model.safetensors`` (written atomically by :func:`lorajax.models.save_hf`), which
    :func:`lorajax.models.load_hf` and ``transformers.LlamaForCausalLM.from_pretrained``
    read. ``model`` itself is not changed.

    Args:
        path: The output directory (created if needed).
        model: A :class:`lorajax.models.Llama` holding the base params the adapters were
            made for.
        adapters: An adapter tree for ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
            (e.g. from :func:`load_peft` or training), or ``None`` to save the model as is.
        tokenizer: Optional tokenizer with a ``save(directory)`` method.

    Returns:
        None.

    Raises:
        TypeError: ``model`` is not a Llama.
        ValueError: ``adapters`` do not fit the model's params.
        NotADirectoryError: ``path`` exists and is not a directory.

    Examples:
        >>> import tempfile, jax, numpy as np, lorajax
        >>> from flax import nnx
        >>> from lorajax import models
        >>> from lorajax.peft_format import save_merged
        >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
        ...                          num_hidden_layers=1, num_attention_heads=2,
        ...                          num_key_value_heads=1)
        >>> model = models.Llama(cfg, rngs=nnx.Rngs(0))
        >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        >>> ad, _ = lorajax.adapters.init(jax.random.key(1), params, rank=2, init="gaussian")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_merged(d, model, ad)
        ...     merged = models.load_hf(d)
        >>> bool(np.array_equal(merged(np.array([[1, 2]])), model(np.array([[1, 2]]))))
        True
    """
    from flax import nnx

    from lorajax._src.models.hf import save_hf
    from lorajax._src.models.llama import Llama

    if not isinstance(model, Llama):
        raise TypeError(f"`model` must be a lorajax.models.Llama, got {type(model).__name__}.")
    directory = _output_dir(path)
    if adapters is not None:
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(state)
        check_adapters_match(params, adapters)
        model = nnx.merge(graphdef, merge(params, adapters), rest)
    save_hf(model, directory, tokenizer=tokenizer)

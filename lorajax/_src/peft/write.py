"""Writing PEFT adapter directories, and the merged model as a Hugging Face checkpoint."""

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

from lorajax._src.adapters.merge import merge
from lorajax._src.adapters.tree import LoRA, check_adapters_match, is_adapter_leaf
from lorajax._src.files import write_atomic
from lorajax._src.peft.names import (
    _EXTRAS_KEY,
    _PREFIX,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    _module_names,
    _number,
    _targets_match,
)
from lorajax._src.targets import path_str

__all__ = ["save_peft", "save_merged"]


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

r"""Which leaves of a parameter tree are projected, and how each is read as matrices.

``targets`` may be:

- ``None``: every leaf with at least two axes;
- a preset, ``"all-linear"``, ``"attention"`` or ``"mlp"`` (see :data:`PRESETS`);
- any other string: a regular expression searched (``re.search``) in the leaf's path,
  written with ``/`` between keys, e.g. ``"layers/\\d+/(q|k|v|o)_proj/kernel"``;
- a callable ``(path, leaf) -> MatrixSpec | bool | None``;
- one ``MatrixSpec``: applied to every leaf with at least two axes;
- a pytree (a prefix of the params tree) of ``MatrixSpec``, ``bool`` or ``None`` leaves.

optax's ``GaLoreDimensionNumbers`` are accepted wherever a ``MatrixSpec`` is.

Leaves selected without an explicit spec get the default layout of
:func:`default_spec`: the last two axes are ``(d_in, d_out)`` and leading axes index
stacked layers; Flax multi-head attention kernels (``query``/``key``/``value``:
``(d, heads, head_dim)``; ``out``: ``(heads, head_dim, d)``) keep heads on the
``d_out`` (resp. ``d_in``) side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from optax.contrib import GaLoreDimensionNumbers

from lorajax._src.matrices import MatrixLayout, MatrixSpec

__all__ = ["PRESETS", "default_spec", "path_str", "resolve_targets", "select_targets"]

Targets = Any  # None | str | Callable | pytree of specs

_VARIABLE_SUFFIXES = ("value", "raw_value")
_KERNEL_NAMES = {"kernel", "weight", "w"}
_EXCLUDED = {
    "embed_tokens", "embedding", "embeddings", "embed", "wte", "wpe", "tok_embeddings",
    "word_embeddings", "position_embeddings", "token_type_embeddings", "shared", "lm_head",
}  # fmt: skip
_ATTENTION_MODULES = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "out_proj", "query", "key", "value",
    "query_key_value", "c_attn", "Wqkv", "wqkv", "wq", "wk", "wv",
}  # fmt: skip
_MLP_MODULES = {
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2",
    "w3", "wi", "wi_0", "wi_1", "dense_h_to_4h", "dense_4h_to_h", "intermediate",
}  # fmt: skip
_ATTENTION_SCOPE = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_SCOPE = re.compile(r"mlp|ffn|feed_?forward|DenseReluDense", re.IGNORECASE)
_CONV = re.compile(r"conv", re.IGNORECASE)

#: The preset names accepted by ``targets``, with what each selects.
PRESETS: dict[str, str] = {
    "all-linear": "every linear kernel (leaf named kernel/weight with >= 2 axes) except "
    "embeddings, lm_head and convolutions",
    "attention": "q/k/v/o projections (q_proj, k_proj, v_proj, o_proj, query, key, value, "
    "out, c_attn, query_key_value, Wqkv, ...) and any kernel inside an attention module",
    "mlp": "feed-forward projections (gate_proj, up_proj, down_proj, fc1, fc2, c_fc, wi, "
    "wo, ...) and any kernel inside an mlp/ffn module",
}


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Joins a JAX key path into ``"layers/0/q_proj/kernel"``."""
    return "/".join(_key_str(k) for k in path)


def _parts(path: str) -> list[str]:
    parts = path.split("/") if path else []
    while parts and parts[-1] in _VARIABLE_SUFFIXES:
        parts = parts[:-1]
    return parts


def default_spec(path: str, shape: Sequence[int]) -> MatrixSpec | None:
    """The layout a selected leaf gets when no explicit spec is given.

    Args:
        path: The leaf's path string.
        shape: The leaf's shape.

    Returns:
        ``None`` for leaves with fewer than two axes; otherwise a spec whose leading axes
        are batch axes (stacked layers), except for Flax multi-head attention kernels.

    Examples:
        >>> from lorajax._src.targets import default_spec
        >>> default_spec("layers/q_proj/kernel", (30, 576, 576))
        MatrixSpec(in_axes=-2, out_axes=-1, batch_axes=(0,))
        >>> default_spec("attention/query/kernel", (512, 8, 64))
        MatrixSpec(in_axes=0, out_axes=(1, 2), batch_axes=())
    """
    ndim = len(shape)
    if ndim < 2:
        return None
    parts = _parts(path)
    module = parts[-2] if len(parts) >= 2 and parts[-1] == "kernel" else None
    in_scope = any(_ATTENTION_SCOPE.search(p) for p in parts[:-2])
    if ndim >= 3 and in_scope and module in ("query", "key", "value"):
        lead = ndim - 3
        return MatrixSpec(lead, (lead + 1, lead + 2), tuple(range(lead)))
    if ndim >= 3 and in_scope and module == "out":
        lead = ndim - 3
        return MatrixSpec((lead, lead + 1), lead + 2, tuple(range(lead)))
    return MatrixSpec(batch_axes=tuple(range(ndim - 2)))


def _is_linear_kernel(parts: list[str]) -> bool:
    if not parts or parts[-1] not in _KERNEL_NAMES:
        return False
    return not any(p in _EXCLUDED or _CONV.search(p) for p in parts)


def _is_attention(parts: list[str]) -> bool:
    modules = parts[:-1]
    return any(p in _ATTENTION_MODULES for p in modules) or any(
        _ATTENTION_SCOPE.search(p) for p in modules
    )


def _is_mlp(parts: list[str]) -> bool:
    modules = parts[:-1]
    if any(p in _MLP_MODULES for p in modules):
        return True
    return any(_MLP_SCOPE.search(p) for p in modules) and not _is_attention(parts)


def _preset_selects(name: str, path: str) -> bool:
    parts = _parts(path)
    if not _is_linear_kernel(parts):
        return False
    if name == "attention":
        return _is_attention(parts)
    if name == "mlp":
        return _is_mlp(parts)
    return True  # all-linear


class TreeFn:
    """Marks a callable ``params -> pytree of specs`` (optax's GaLore convention)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (MatrixSpec, GaLoreDimensionNumbers, bool))


def _as_spec(value: Any, path: str, leaf: Any) -> MatrixSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return default_spec(path, leaf.shape)
    if isinstance(value, GaLoreDimensionNumbers):
        return MatrixSpec(value.reduction_axis, value.output_axis)  # type: ignore[arg-type]
    if isinstance(value, MatrixSpec):
        return value
    raise TypeError(
        f"`targets` gave {value!r} for leaf {path!r}; expected a MatrixSpec, a bool or None."
    )


def _describe(paths: list[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:6])
    more = f" and {len(paths) - 6} more" if len(paths) > 6 else ""
    return f"{shown}{more}" if paths else "(no leaves)"


def select_targets(params: Any, targets: Targets) -> tuple[list[MatrixSpec | None], list[str]]:
    """Returns one spec (or ``None``) per leaf of ``params``, and the leaves' paths.

    Raises:
        ValueError: if a string or callable selects no matrix, if a regex is invalid or
            if a pytree of specs does not match the params.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    if not leaves:
        return [], []

    if targets is None:
        return [default_spec(p, leaf.shape) for p, leaf in zip(paths, leaves)], paths

    if isinstance(targets, str):
        if targets in PRESETS:
            chosen = [_preset_selects(targets, p) for p in paths]
            what = f"preset {targets!r}"
        else:
            try:
                pattern = re.compile(targets)
            except re.error as e:
                raise ValueError(
                    f"`targets`={targets!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                    f"valid regular expression: {e}."
                ) from None
            chosen = [bool(pattern.search(p)) for p in paths]
            what = f"regex {targets!r}"
        specs = [
            default_spec(p, leaf.shape) if c else None for c, p, leaf in zip(chosen, paths, leaves)
        ]
        if not any(s is not None for s in specs):
            raise ValueError(
                f"`targets`={what} selects no leaf with at least 2 axes. Leaf paths are "
                f"{_describe(paths)}. Fix the pattern (it is searched with re.search in "
                "'/'-joined paths) or pass targets=None for every matrix."
            )
        return specs, paths

    if isinstance(targets, (MatrixSpec, GaLoreDimensionNumbers)):
        specs = [
            _as_spec(targets, p, leaf) if len(leaf.shape) >= 2 else None
            for p, leaf in zip(paths, leaves)
        ]
        return specs, paths

    if isinstance(targets, TreeFn):
        targets = targets.fn(params)
    elif callable(targets) and not _is_spec_leaf(targets):
        specs = [_as_spec(targets(p, leaf), p, leaf) for p, leaf in zip(paths, leaves)]
        if not any(s is not None for s in specs):
            raise ValueError(
                f"`targets` callable {targets!r} returned None for every leaf "
                f"({_describe(paths)}). Return a MatrixSpec (or True) for the leaves to project."
            )
        return specs, paths

    spec_leaves, spec_def = jax.tree.flatten(targets, is_leaf=_is_spec_leaf)
    try:
        subtrees = spec_def.flatten_up_to(params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`targets` pytree must have the structure of the params (or a prefix of it), "
            f"with MatrixSpec/bool/None leaves. Mismatch: {e}"
        ) from None
    per_leaf: list[Any] = []
    for value, subtree in zip(spec_leaves, subtrees):
        per_leaf.extend([value] * len(jax.tree.leaves(subtree)))
    return [_as_spec(v, p, leaf) for v, p, leaf in zip(per_leaf, paths, leaves)], paths


def resolve_targets(params: Any, targets: Targets = None) -> Any:
    """Resolves ``targets`` against ``params`` into a pytree of layouts.

    This is what :func:`lorajax.low_rank` does at ``init``; call it to see which leaves a
    ``targets`` value selects and how each is read as matrices.

    Args:
        params: A parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
        targets: See the module docstring.

    Returns:
        A pytree with the structure of ``params`` whose leaves are
        :class:`~lorajax.MatrixLayout` (selected) or ``None``.

    Examples:
        >>> import jax.numpy as jnp, lorajax
        >>> params = {"mlp": {"up_proj": {"kernel": jnp.zeros((8, 32)),
        ...                               "bias": jnp.zeros(32)}}}
        >>> layouts = lorajax.resolve_targets(params, "mlp")
        >>> layouts["mlp"]["up_proj"]["kernel"].matrix_shape, layouts["mlp"]["up_proj"]["bias"]
        ((8, 32), None)
    """
    specs, paths = select_targets(params, targets)
    leaves, treedef = jax.tree.flatten(params)
    layouts: list[MatrixLayout | None] = [
        None if s is None else s.resolve(leaf.shape, p) for s, p, leaf in zip(specs, paths, leaves)
    ]
    return treedef.unflatten(layouts)

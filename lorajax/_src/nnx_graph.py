"""Walking and editing a Flax NNX module graph in place, for :mod:`lorajax.nnx`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorajax._src.matrices import MatrixLayout

__all__ = [
    "children",
    "complete_targets",
    "factor_partition",
    "factor_variable",
    "join_path",
    "lookup",
    "nest",
    "replace_node",
    "walk",
]


def children(node: Any) -> list[tuple[Any, Any]]:
    impl = nnx.graphlib.get_node_impl(node)
    if impl is None:
        return []
    return [
        (k, v)
        for k, v in impl.node_dict(node).items()
        if not (isinstance(k, str) and k.startswith("_pytree__"))
    ]


def walk(model: Any, stop: Callable[[Any], bool]):
    """Yields ``(path, node)`` for every node and variable below ``model``.

    A node shared by several parents is yielded at each of its paths, but its subtree
    is walked once. Nodes for which ``stop`` is true are yielded, not entered.
    """
    seen: set[int] = set()
    stack: list[tuple[tuple[Any, ...], Any]] = [((), model)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, nnx.Variable) or not nnx.graphlib.is_node(node) or stop(node):
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        for key, child in reversed(children(node)):
            stack.append(((*path, key), child))


def child(node: Any, key: Any) -> Any:
    return dict(children(node))[key]


def replace_node(root: Any, path: tuple[Any, ...], new: Any) -> None:
    """Puts ``new`` at ``path`` below ``root``, in place where the container allows it."""
    if not path:
        raise ValueError(
            "add_lora/merge_lora edit layers inside a model; the model itself is a single "
            "layer. Wrap it in an nnx.Module (e.g. nnx.Sequential(layer))."
        )
    parent = root
    for key in path[:-1]:
        parent = child(parent, key)
    key = path[-1]
    impl = nnx.graphlib.get_node_impl(parent)
    set_key = getattr(impl, "set_key", None)
    if set_key is not None:
        set_key(parent, key, new)
        return
    unflatten = getattr(impl, "unflatten", None)
    if unflatten is None:
        raise TypeError(
            f"Cannot replace the layer at {'/'.join(map(str, path))!r} inside a "
            f"{type(parent).__name__}; hold layers in modules, nnx.List, nnx.Dict, lists, "
            "dicts or tuples."
        )
    items, aux = impl.flatten(parent)
    rebuilt = unflatten([(k, new if k == key else v) for k, v in items], aux)
    replace_node(root, path[:-1], rebuilt)


def join_path(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def nest(flat: dict[tuple[Any, ...], Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def complete_targets(targets: Any, params: Any, where: tuple[Any, ...] = ()) -> Any:
    """A nested-dict ``targets`` with every key of ``params``; missing keys select nothing."""
    if not isinstance(targets, dict) or not isinstance(params, dict):
        return targets
    by_key = {str(k): v for k, v in targets.items()}
    unknown = sorted(set(by_key) - {str(k) for k in params})
    if unknown:
        at = f" under {join_path(where)!r}" if where else ""
        raise ValueError(
            f"`targets` has keys {unknown}{at} that the model's parameters do not have there; "
            f"the keys are {sorted(str(k) for k in params)}."
        )
    return {
        k: complete_targets(by_key[str(k)], v, (*where, k)) if str(k) in by_key else None
        for k, v in params.items()
    }


def lookup(grads: Any, path: tuple[Any, ...]) -> jax.Array:
    """The entry of a gradient ``nnx.State`` (or nested dict) at a parameter path."""
    node = grads
    for k in path:
        found = False
        if isinstance(node, dict):
            for candidate in (k, str(k)):
                if candidate in node:
                    node, found = node[candidate], True
                    break
        if not found:
            raise ValueError(
                f"`grads` has no entry for {join_path(path)!r}. Pass the gradient of the loss "
                "with respect to the model's parameters, e.g. nnx.grad(loss_fn)(model, batch)."
            )
    if isinstance(node, nnx.Variable):
        node = node.get_value()
    return node


def factor_partition(names: Any, layout: MatrixLayout) -> tuple[tuple, tuple] | None:
    """Axis names of ``a`` and ``b`` that follow the kernel's, or ``None``."""
    if names is None:
        return None
    names = tuple(names) + (None,) * (len(layout.shape) - len(tuple(names)))

    def side(axes: tuple[int, ...]) -> Any:
        # Flattening keeps a sharding only when it sits on the leading axis of the group.
        first, *rest = (names[ax] for ax in axes)
        return first if all(r is None for r in rest) else None

    batch = tuple(names[ax] for ax in layout.batch_axes)
    return (*batch, side(layout.in_axes), None), (*batch, None, side(layout.out_axes))


def factor_variable(kind: type, value: jax.Array, kernel: nnx.Variable, names: Any):
    meta = kernel.get_metadata()
    kept = {k: meta[k] for k in ("mesh", "sharding_rules") if k in meta}
    sharding = getattr(kernel.get_value(), "sharding", None)
    if names is not None and isinstance(sharding, NamedSharding):
        value = jax.device_put(value, NamedSharding(sharding.mesh, P(*names)))
    if names is not None and meta.get("out_sharding") is not None:
        kept["out_sharding"] = names
    return kind(value, eager_sharding=False, **kept)

"""Orbax checkpoints of a train state, a data position and adapters, restorable on any mesh.

Directories are local paths or bucket URIs such as ``gs://bucket/run``: paths go through
``etils.epath`` as Orbax's own do (``gs://`` needs ``gcsfs``, or TensorFlow, installed).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Sharding, SingleDeviceSharding

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "abstract_state",
    "save_adapters",
    "restore_adapters",
]

_ITEMS = ("state", "data", "metadata")
_ADAPTER_ITEMS = ("adapters", "metadata")
_FORMAT = 1
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _directory(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: absolute when local, a bucket URI (``gs://``) as is."""
    text = os.fspath(path)
    if _URI.match(text):
        return epath.Path(text)
    return epath.Path(pathlib.Path(text).absolute())


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not fit what is being restored."""


# -- tree <-> nested dict of arrays ---------------------------------------------------


def _entry_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)  # pragma: no cover - every jax key type has one of the above


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> str:
    return str(x.dtype._impl)


def _flatten(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """Leaf paths (tuples of names), leaves and the treedef of ``tree``."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(_entry_name(e) for e in path) for path, _ in pairs]
    seen: dict[tuple[str, ...], int] = {}
    for i, path in enumerate(paths):
        if path in seen:
            raise CheckpointError(
                f"Two leaves of the tree have the same name {'/'.join(path)!r} once their keys "
                "are written as strings (e.g. the dict keys 0 and '0'); rename one of them."
            )
        seen[path] = i
    return paths, [leaf for _, leaf in pairs], treedef


def _nest(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves):
        node = root
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1] if path else "_"] = leaf
    return root


def _unnest(root: Mapping[str, Any], paths: list[tuple[str, ...]]) -> list[Any]:
    out = []
    for path in paths:
        node: Any = root
        for name in path or ("_",):
            node = node[name]
        out.append(node)
    return out


def _describe(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, Any]:
    """JSON manifest of the leaves: shape, dtype and the PRNG impl of key leaves."""
    manifest = {}
    for path, leaf in zip(paths, leaves):
        entry: dict[str, Any] = {"shape": list(np.shape(leaf))}
        if _is_key(leaf):
            entry["dtype"] = "key"
            entry["impl"] = _key_impl(leaf)
        else:
            # Never fetch a jax.Array's values: in a multi-process run they span devices
            # this process cannot read.
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            entry["dtype"] = str(np.dtype(dtype))
        manifest["/".join(path)] = entry
    return manifest


def _to_savable(leaf: Any) -> Any:
    return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def _default_sharding() -> Sharding:
    return SingleDeviceSharding(jax.devices()[0])


def abstract_state(tree: Any, shardings: Any = None) -> Any:
    """The ``jax.ShapeDtypeStruct`` tree of ``tree``, each leaf with a sharding.

    This is the ``target`` a restore places leaves by: the sharding of a leaf is taken
    from ``shardings`` (a tree like ``tree`` of ``jax.sharding.Sharding``, or a single
    sharding for every leaf), else from the leaf itself when it is a ``jax.Array``, else
    the first device.

    Args:
        tree: A pytree of arrays or ``jax.ShapeDtypeStruct``.
        shardings: ``None``, one ``Sharding``, or a tree like ``tree`` of them.

    Returns:
        A tree like ``tree`` of ``jax.ShapeDtypeStruct`` with ``sharding`` set.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lorajax.checkpoint import abstract_state
        >>> abstract_state({"w": jnp.zeros((2, 3))})["w"].shape
        (2, 3)
    """
    leaves, treedef = jax.tree.flatten(tree)
    if shardings is None or isinstance(shardings, Sharding):
        shard_leaves = [shardings] * len(leaves)
    else:
        try:
            shard_leaves = treedef.flatten_up_to(shardings)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"`shardings` must be one Sharding or a tree like the state; its structure "
                f"differs: {err}"
            ) from None
    out = []
    for leaf, sharding in zip(leaves, shard_leaves):
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or _default_sharding()
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        out.append(jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding))
    return treedef.unflatten(out)


def _restore_target(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """What Orbax restores for one target leaf (raw key data for a PRNG key)."""
    if not _is_key(leaf):
        return leaf
    data = jax.eval_shape(jax.random.key_data, leaf)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_default_sharding())


def _from_restored(value: Any, leaf: jax.ShapeDtypeStruct) -> Any:
    if not _is_key(leaf):
        return value
    key = jax.random.wrap_key_data(value, impl=leaf.dtype._impl)
    return jax.device_put(key, leaf.sharding)


def _check_manifest(where: str, saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    missing = [p for p in wanted if p not in saved]
    extra = [p for p in saved if p not in wanted]
    problems = []
    if missing:
        problems.append(f"leaves in the target but not in the checkpoint: {missing[:8]}")
    if extra:
        problems.append(f"leaves in the checkpoint but not in the target: {extra[:8]}")
    for path, want in wanted.items():
        have = saved.get(path)
        if have is None:
            continue
        if list(have["shape"]) != list(want["shape"]):
            problems.append(
                f"{path!r} has shape {tuple(have['shape'])} in the checkpoint but "
                f"{tuple(want['shape'])} in the target"
            )
        if (have["dtype"] == "key") != (want["dtype"] == "key"):
            problems.append(
                f"{path!r} is {have['dtype']} in the checkpoint but {want['dtype']} in the target"
            )
        elif have["dtype"] == "key" and have.get("impl") != want.get("impl"):
            problems.append(
                f"{path!r} is a PRNG key of impl {have.get('impl')} in the checkpoint but "
                f"{want.get('impl')} in the target"
            )
    if problems:
        raise CheckpointError(
            f"{where} does not match the target: " + "; ".join(problems) + ". Build the target "
            "the same way as the saved state (same model config, method, rank and targets)."
        )


def _check_config(where: str, saved: Mapping[str, Any], expect: Mapping[str, Any] | None) -> None:
    if not expect:
        return
    diffs = []
    for name, want in expect.items():
        have = saved.get(name, "<absent>")
        if _jsonable(have) != _jsonable(want):
            diffs.append(f"{name}: saved {have!r}, requested {want!r}")
    if diffs:
        raise CheckpointError(
            f"{where} was saved with another configuration ({'; '.join(diffs)}). Use the "
            "saved settings to resume, or start a new run in another directory."
        )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _restore_arrays(
    where: str, restore: Any, paths: list[tuple[str, ...]], targets: list[Any]
) -> list[Any]:
    """Runs an Orbax restore of the nested arrays; damage becomes a CheckpointError."""
    try:
        restored = restore(_nest(paths, [_restore_target(t) for t in targets]))
        values = _unnest(restored, paths)
    except CheckpointError:
        raise
    except Exception as err:  # tensorstore, OCDBT and msgpack raise many kinds
        raise CheckpointError(
            f"{where} could not be read; a file in it is missing, truncated or corrupt "
            f"({type(err).__name__}: {str(err)[:300]}). Restore an earlier step or delete "
            "this one."
        ) from err
    return [_from_restored(v, t) for v, t in zip(values, targets)]


def _metadata(step: int | None, config: Mapping[str, Any] | None, manifest: Any) -> dict:
    import lorajax

    return {
        "format": _FORMAT,
        "lorajax_version": lorajax.__version__,
        "step": step,
        "config": _jsonable(dict(config or {})),
        "leaves": manifest,
    }


def _read_json(path: epath.Path, where: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{where}: {str(path)!r} cannot be read as JSON ({err}); the checkpoint is damaged. "
            "Restore an earlier step or delete this one."
        ) from None


def _item_file(step_dir: epath.Path, item: str) -> epath.Path:
    """The JSON file Orbax's JsonSave writes for ``item`` (``<item>/metadata``)."""
    return step_dir / item / "metadata"


def _check_items(where: str, step_dir: epath.Path, items: tuple[str, ...]) -> None:
    missing = [item for item in items if not (step_dir / item).is_dir()]
    if missing:
        raise CheckpointError(
            f"{where} is incomplete: the item(s) {missing} are missing from {str(step_dir)!r} "
            f"(expected {list(items)}). Restore an earlier step or delete this one."
        )


# -- the train-state checkpointer -----------------------------------------------------


class Checkpointer:
    """Numbered checkpoints of a train state, its data position and metadata.

    A thin layer over ``orbax.checkpoint.CheckpointManager``. Each step directory holds
    three items:

    - ``state``: every array of the state pytree (params, adapters, optimizer state with
      its bases, keys and counts, step), written with Orbax's standard handler. PRNG key
      arrays are stored as their raw data and rewrapped with the same impl.
    - ``data``: the data iterator position (:meth:`lorajax.data.BatchIterator.state`), as
      JSON.
    - ``metadata``: JSON with ``lorajax_version``, ``step``, ``config`` (the run's method,
      rank, targets, ...) and a manifest of every leaf (shape, dtype).

    Orbax writes each step into a temporary directory and renames it when complete, so a
    crash during a save (even an asynchronous one) leaves the previous checkpoints whole
    and :meth:`latest_step` ignores the unfinished one.

    :meth:`restore` places every leaf with the sharding of its ``target`` leaf: a state
    saved on one device restores onto a mesh and back. Everything that can be checked
    (the step exists, its items are present, the config and the target's structure and
    shapes match) is checked before any array is read; a damaged file raises
    :class:`CheckpointError` naming the step.

    Args:
        directory: The checkpoint directory (created by the first save): a local path
            or a bucket URI such as ``gs://bucket/run``. In a multi-process run every
            process passes the same directory, on storage they all reach.
        max_to_keep: Keep only the last ``max_to_keep`` checkpoints (``None``: all).
        async_save: Write in a background thread; :meth:`wait` waits for it.
        config: JSON-serialisable settings stored with every checkpoint and compared on
            restore (``expect_config``).

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from lorajax.checkpoint import Checkpointer
        >>> state = {"w": jnp.arange(4.0), "step": jnp.int32(3)}
        >>> with Checkpointer(tempfile.mkdtemp(), config={"rank": 2}) as ckpt:
        ...     _ = ckpt.save(3, state, data_state={"epoch": 0})
        ...     ckpt.wait()
        ...     restored, data_state, meta = ckpt.restore(target=state)
        >>> restored["w"].tolist(), data_state, meta["config"]
        ([0.0, 1.0, 2.0, 3.0], {'epoch': 0}, {'rank': 2})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1
        ):
            raise ValueError(f"`max_to_keep` must be a positive int or None, got {max_to_keep!r}.")
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"`config` must be a mapping or None, got {config!r}.")
        self.directory = _directory(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"`directory` {str(directory)!r} exists and is not a directory.")
        self.config = _jsonable(dict(config or {}))
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager: ocp.CheckpointManager | None = None

    # -- plumbing

    def _open(self, create: bool) -> ocp.CheckpointManager | None:
        if self._manager is None:
            if not create and not self.directory.is_dir():
                return None
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options, item_names=_ITEMS
            )
        return self._manager

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, steps={self.all_steps()})"

    # -- queries

    def all_steps(self) -> list[int]:
        """The steps of the finished checkpoints, ascending."""
        manager = self._open(create=False)
        if manager is None:
            return []
        return sorted(int(s) for s in manager.all_steps())

    def latest_step(self) -> int | None:
        """The last finished checkpoint's step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The ``metadata`` item of a step (default: the latest), read without the arrays.

        Raises:
            CheckpointError: If there is no such checkpoint or it is damaged.
        """
        step = self._resolve_step(step)
        where = f"Checkpoint step {step} in {str(self.directory)!r}"
        step_dir = self.directory / str(step)
        _check_items(where, step_dir, ("metadata",))
        meta = _read_json(_item_file(step_dir, "metadata"), where)
        if not isinstance(meta, dict) or "leaves" not in meta or "config" not in meta:
            raise CheckpointError(
                f"{where} has a metadata item that lorajax did not write; restore a checkpoint "
                "saved by lorajax.checkpoint.Checkpointer."
            )
        return meta

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"No checkpoint in {str(self.directory)!r}: the directory "
                f"{'is empty' if self.directory.is_dir() else 'does not exist'} or holds only "
                "unfinished saves. Check the path, or start without restoring."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint of step {step!r} in {str(self.directory)!r}; the saved steps "
                f"are {steps}."
            )
        return step

    # -- save / restore

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (and the data position) as checkpoint ``step``.

        With ``async_save`` the arrays are copied off the devices before this returns and
        written in the background; the state can be updated (or donated) right away.

        Args:
            step: The step number (a non-negative int, larger than every saved step).
            state: The pytree to save, e.g. a :class:`lorajax.train.TrainState`.
            data_state: A JSON-serialisable data position, e.g. ``BatchIterator.state()``.
            force: Save even if the manager's policy would skip this step.

        Returns:
            Whether a checkpoint was started.

        Raises:
            ValueError: On a bad step, a step already saved, or a data state that is not
                JSON-serialisable.
        """
        if not isinstance(step, int | np.integer) or isinstance(step, bool) or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
        step = int(step)
        try:
            data_json = json.loads(json.dumps({"iterator": data_state}))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`data_state` must be JSON-serialisable (e.g. BatchIterator.state()), got "
                f"{data_state!r}: {err}"
            ) from None
        steps = self.all_steps()
        if step in steps:
            raise ValueError(
                f"Step {step} is already saved in {str(self.directory)!r}; save a later step "
                "or delete that checkpoint first."
            )
        paths, leaves, _ = _flatten(state)
        meta = _metadata(step, self.config, _describe(paths, leaves))
        arrays = _nest(paths, [_to_savable(x) for x in leaves])
        manager = self._open(create=True)
        assert manager is not None
        return manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                data=ocp.args.JsonSave(data_json),
                metadata=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(
        self,
        step: int | None = None,
        *,
        target: Any,
        expect_config: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restores a checkpoint onto the structure and shardings of ``target``.

        Args:
            step: The step to restore (default: the latest finished one).
            target: A pytree like the saved state whose leaves are arrays or
                ``jax.ShapeDtypeStruct`` (see :func:`abstract_state`); each restored leaf
                gets the target leaf's sharding (the first device when it has none).
            expect_config: Settings that must equal the saved ``config`` (e.g.
                ``{"method": "lora", "rank": 8}``).

        Returns:
            ``(state, data_state, metadata)``: the state as a tree like ``target``, the
            saved data position (``None`` if none was saved) and the metadata dict.

        Raises:
            CheckpointError: No checkpoint, a missing item, a config that differs from
                ``expect_config``, a target of another structure or shape, or a damaged
                file.
        """
        self.wait()
        step = self._resolve_step(step)
        where = f"Checkpoint step {step} in {str(self.directory)!r}"
        _check_items(where, self.directory / str(step), _ITEMS)
        meta = self.metadata(step)
        _check_config(where, meta["config"], expect_config)
        abstract = abstract_state(target)
        paths, targets, treedef = _flatten(abstract)
        _check_manifest(where, meta["leaves"], _describe(paths, targets))
        data = _read_json(_item_file(self.directory / str(step), "data"), where)
        manager = self._open(create=False)
        assert manager is not None

        def restore(nested: Any) -> Any:
            out = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(nested))
            )
            return out["state"]

        values = _restore_arrays(where, restore, paths, targets)
        iterator = data.get("iterator") if isinstance(data, dict) else None
        return treedef.unflatten(values), iterator, meta

    def wait(self) -> None:
        """Waits until every started save is finished on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None


# -- adapters only --------------------------------------------------------------------


def _adapter_meta(adapters: Any) -> dict[str, Any]:
    from lorajax._src.adapters.tree import LoRA

    out = {}
    pairs = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, LoRA))[0]
    for path, node in pairs:
        if isinstance(node, LoRA):
            name = "/".join(_entry_name(e) for e in path)
            out[name] = {
                "scale": node.scale,
                "alpha": node.alpha,
                "rank": node.rank,
                "frozen_a": node.frozen_a,
                "dora": node.magnitude is not None,
            }
    return _jsonable(out)


def save_adapters(
    path: str | os.PathLike, adapters: Any, *, config: Mapping[str, Any] | None = None
) -> None:
    """Saves an adapter tree (e.g. ``TrainState.adapters``) into one checkpoint directory.

    The directory appears only once it is complete (Orbax writes a temporary directory and
    renames it). Each :class:`~lorajax.adapters.LoRA`'s static settings (scale, alpha,
    rank, DoRA) are stored with the arrays and checked on restore.

    Args:
        path: The directory to create (a local path or a bucket URI); it must not exist.
        adapters: A tree of ``LoRA`` nodes (and ``None``), or any pytree of arrays.
        config: JSON-serialisable settings stored in the metadata.

    Returns:
        None; ``path`` then holds the adapters and their metadata (read them back with
        :func:`restore_adapters`).

    Raises:
        ValueError: If ``path`` exists.

    Examples:
        >>> import os, tempfile, jax, jax.numpy as jnp, lorajax
        >>> from lorajax.checkpoint import save_adapters, restore_adapters
        >>> w = {"dense": {"kernel": jnp.ones((4, 3))}}
        >>> ad, _ = lorajax.adapters.init(jax.random.key(0), w, rank=2, targets=None)
        >>> path = os.path.join(tempfile.mkdtemp(), "adapters")
        >>> save_adapters(path, ad, config={"rank": 2})
        >>> back, meta = restore_adapters(path, ad)
        >>> bool((back["dense"]["kernel"].a == ad["dense"]["kernel"].a).all())
        True
    """
    path = _directory(path)
    if path.exists():
        raise ValueError(f"`path` {str(path)!r} exists; choose a new directory or delete it first.")
    paths, leaves, _ = _flatten(adapters)
    meta = _metadata(None, config, _describe(paths, leaves))
    meta["adapters"] = _adapter_meta(adapters)
    arrays = _nest(paths, [_to_savable(x) for x in leaves])
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(meta)
            ),
        )


def restore_adapters(path: str | os.PathLike, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores adapters saved by :func:`save_adapters` onto the structure of ``target``.

    Args:
        path: The directory :func:`save_adapters` wrote.
        target: An adapter tree of the same structure, shapes and LoRA settings (arrays or
            ``jax.ShapeDtypeStruct``); leaves are placed with its shardings.

    Returns:
        ``(adapters, metadata)``.

    Raises:
        CheckpointError: A missing or damaged directory, or a target whose structure,
            shapes or LoRA settings (scale, alpha, rank) differ.
    """
    path = _directory(path)
    where = f"Adapter checkpoint {str(path)!r}"
    if not path.is_dir():
        raise CheckpointError(
            f"{where} does not exist (or is not a directory); check the path given to "
            "save_adapters."
        )
    _check_items(where, path, _ADAPTER_ITEMS)
    meta = _read_json(_item_file(path, "metadata"), where)
    if not isinstance(meta, dict) or "leaves" not in meta:
        raise CheckpointError(f"{where} has a metadata item that lorajax did not write.")
    abstract = abstract_state(target)
    paths, targets, treedef = _flatten(abstract)
    _check_manifest(where, meta["leaves"], _describe(paths, targets))
    want = _adapter_meta(target)
    have = meta.get("adapters", {})
    diffs = [
        f"{name}: saved {have.get(name)}, target {settings}"
        for name, settings in want.items()
        if have.get(name) != settings
    ]
    if diffs:
        raise CheckpointError(
            f"{where} holds adapters with other settings than the target: "
            + "; ".join(diffs[:4])
            + ". Build the target with the saved rank, alpha and init."
        )

    def restore(nested: Any) -> Any:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            out = checkpointer.restore(
                path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(nested))
            )
        return out["adapters"]

    values = _restore_arrays(where, restore, paths, targets)
    return treedef.unflatten(values), meta

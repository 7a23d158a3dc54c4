"""Batches from a packed dataset: a resumable, shardable shuffled stream, and eval batches.

Examples:
    >>> import numpy as np
    >>> from lorajax.data import BatchIterator, PackedDataset
    >>> dataset = PackedDataset(np.arange(40, dtype=np.int32).reshape(10, 4))
    >>> batches = BatchIterator(dataset, batch_size=4, seed=0)
    >>> first = next(batches)
    >>> saved = batches.state()
    >>> again = BatchIterator.from_state(dataset, 4, saved)
    >>> bool(np.array_equal(next(batches), next(again)))
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from jaxtyping import Int

from lorajax._src.data import PackedDataset, _check_seed, _int

__all__ = ["BatchIterator", "eval_batches"]


def _check_dataset(dataset: Any) -> PackedDataset:
    if not isinstance(dataset, PackedDataset):
        raise TypeError(
            f"`dataset` must be a PackedDataset (from pack or make_datasets), got "
            f"{type(dataset).__name__}."
        )
    return dataset


def _check_shards(batch_size: int, shard_index: Any, num_shards: Any) -> tuple[int, int]:
    num_shards = _int("num_shards", num_shards, minimum=1, what="a positive int")
    shard_index = _int("shard_index", shard_index, minimum=0, what="a non-negative int")
    if shard_index >= num_shards:
        raise ValueError(
            f"`shard_index` must be in [0, num_shards={num_shards}), got {shard_index}. Pass "
            "e.g. jax.process_index() and jax.process_count()."
        )
    if batch_size % num_shards:
        raise ValueError(
            f"`batch_size`={batch_size} (the global batch) must be divisible by "
            f"`num_shards`={num_shards}; use a multiple of {num_shards}."
        )
    return shard_index, num_shards


_STATE_KEYS = ("epoch", "step_in_epoch", "batches_served", "seed", "batch_size", "num_rows")


class BatchIterator(Iterator[np.ndarray]):
    """An endless, resumable, shardable iterator of shuffled training batches.

    ``batch_size`` is the global batch. Epoch ``e`` visits the rows in the order
    ``numpy.random.default_rng([seed, e]).permutation(len(dataset))``; global batch ``j`` of
    the epoch is that permutation's slice ``[j * batch_size, (j + 1) * batch_size)``, and the
    last incomplete slice is dropped, so every batch is full and no row appears twice in an
    epoch. Shard ``i`` of ``num_shards`` (e.g. ``jax.process_index()`` of
    ``jax.process_count()``) yields rows ``[i * b, (i + 1) * b)`` of each global batch, with
    ``b = batch_size // num_shards``: the shards of all processes together are exactly the
    global batch that one process would see.

    The position is :meth:`state`, a small JSON-serialisable dict shared by all shards;
    :meth:`restore` (or :meth:`from_state`) resumes exactly where it was taken.

    Args:
        dataset: the rows to draw from.
        batch_size: the global batch size; at most ``len(dataset)``.
        seed: the shuffle seed.
        shard_index: which slice of each global batch this iterator yields.
        num_shards: how many slices each global batch is cut into; divides ``batch_size``.

    Examples:
        >>> import json
        >>> import numpy as np
        >>> data = PackedDataset(np.arange(20).reshape(10, 2))
        >>> it = BatchIterator(data, batch_size=4, seed=1)
        >>> it.steps_per_epoch  # 10 rows -> 2 full batches per epoch
        2
        >>> _ = [next(it) for _ in range(3)]
        >>> saved = json.dumps(it.state())
        >>> expected = next(it)
        >>> resumed = BatchIterator.from_state(data, 4, json.loads(saved))
        >>> bool(np.array_equal(next(resumed), expected))
        True
        >>> halves = [next(BatchIterator(data, 4, seed=1, shard_index=i, num_shards=2))
        ...           for i in range(2)]
        >>> bool(np.array_equal(np.concatenate(halves), next(BatchIterator(data, 4, seed=1))))
        True
    """

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
    ):
        self._dataset = _check_dataset(dataset)
        self._batch_size = _int("batch_size", batch_size, minimum=1, what="a positive int")
        self._seed = _check_seed(seed)
        self._shard_index, self._num_shards = _check_shards(
            self._batch_size, shard_index, num_shards
        )
        if len(dataset) < self._batch_size:
            raise ValueError(
                f"The dataset has {len(dataset)} rows, fewer than `batch_size`="
                f"{self._batch_size}, so no full batch fits. Use a smaller `batch_size` or "
                "`seq_len`, or more text."
            )
        self._local = self._batch_size // self._num_shards
        self._steps_per_epoch = len(dataset) // self._batch_size
        self._epoch = 0
        self._step = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @classmethod
    def from_state(
        cls,
        dataset: PackedDataset,
        batch_size: int,
        state: Mapping[str, Any],
        *,
        shard_index: int = 0,
        num_shards: int = 1,
    ) -> BatchIterator:
        """Builds an iterator positioned at ``state`` (the seed comes from ``state``).

        Args:
            dataset: the same rows as when ``state`` was taken.
            batch_size: the same global batch size.
            state: a dict from :meth:`state` (possibly through JSON).
            shard_index: this iterator's shard (may differ from the saving process's).
            num_shards: the number of shards (any divisor of ``batch_size``).

        Returns:
            The iterator, which next yields what the saved one would have.
        """
        if not isinstance(state, Mapping) or "seed" not in state:
            raise ValueError(f"`state` must be a dict from BatchIterator.state(), got {state!r}.")
        iterator = cls(
            dataset,
            batch_size,
            seed=state["seed"],
            shard_index=shard_index,
            num_shards=num_shards,
        )
        iterator.restore(state)
        return iterator

    @property
    def dataset(self) -> PackedDataset:
        """The rows this iterator draws from."""
        return self._dataset

    @property
    def batch_size(self) -> int:
        """The global batch size."""
        return self._batch_size

    @property
    def local_batch_size(self) -> int:
        """Rows per yielded array: ``batch_size // num_shards``."""
        return self._local

    @property
    def seed(self) -> int:
        """The shuffle seed."""
        return self._seed

    @property
    def shard_index(self) -> int:
        """This iterator's slice of each global batch."""
        return self._shard_index

    @property
    def num_shards(self) -> int:
        """How many slices each global batch is cut into."""
        return self._num_shards

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch: ``len(dataset) // batch_size``."""
        return self._steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._order = rng.permutation(len(self._dataset))
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Int[np.ndarray, "local_batch seq_len_plus_1"]:
        order = self._permutation(self._epoch)
        start = self._step * self._batch_size + self._shard_index * self._local
        batch = self._dataset.tokens[order[start : start + self._local]]
        self._step += 1
        if self._step == self._steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """Returns the position: a dict of plain ints, JSON-serialisable.

        Keys: ``epoch`` and ``step_in_epoch`` (where the next batch comes from),
        ``batches_served`` (global batches yielded so far), and ``seed``, ``batch_size``
        and ``num_rows``, which :meth:`restore` checks. It does not depend on the shard, so
        one process's state restores every process.

        Returns:
            The state dict.
        """
        return {
            "epoch": self._epoch,
            "step_in_epoch": self._step,
            "batches_served": self._epoch * self._steps_per_epoch + self._step,
            "seed": self._seed,
            "batch_size": self._batch_size,
            "num_rows": len(self._dataset),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Moves to the position saved by :meth:`state`.

        Args:
            state: a dict from :meth:`state` (possibly through JSON).

        Raises:
            ValueError: keys are missing or unknown, a value is not a non-negative int,
                or ``seed``, ``batch_size`` or ``num_rows`` differ from this iterator's
                (the state belongs to another run or dataset).
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"`state` must be a dict from BatchIterator.state(), got {state!r}.")
        missing = [key for key in _STATE_KEYS if key not in state]
        unknown = sorted(str(key) for key in state if key not in _STATE_KEYS)
        if missing or unknown:
            raise ValueError(
                f"`state` is not a BatchIterator state: missing keys {missing}, unknown keys "
                f"{unknown}; expected exactly {list(_STATE_KEYS)}."
            )
        values = {
            key: _int(f"state[{key!r}]", state[key], minimum=0, what="a non-negative int")
            for key in _STATE_KEYS
        }
        mine = {"seed": self._seed, "batch_size": self._batch_size, "num_rows": len(self._dataset)}
        for key, value in mine.items():
            if values[key] != value:
                raise ValueError(
                    f"`state[{key!r}]`={values[key]} does not match this iterator's {key}="
                    f"{value}: the state was saved by another run or for another dataset. "
                    f"Build the iterator with the same dataset, batch_size and seed "
                    "(BatchIterator.from_state takes the seed from the state)."
                )
        if values["step_in_epoch"] >= self._steps_per_epoch:
            raise ValueError(
                f"`state['step_in_epoch']`={values['step_in_epoch']} is out of range: an "
                f"epoch has {self._steps_per_epoch} steps."
            )
        served = values["epoch"] * self._steps_per_epoch + values["step_in_epoch"]
        if values["batches_served"] != served:
            raise ValueError(
                f"`state['batches_served']`={values['batches_served']} contradicts epoch="
                f"{values['epoch']} and step_in_epoch={values['step_in_epoch']} (expected "
                f"{served}); the state is corrupt."
            )
        self._epoch, self._step = values["epoch"], values["step_in_epoch"]

    def __repr__(self) -> str:
        return (
            f"BatchIterator(rows={len(self._dataset)}, batch_size={self._batch_size}, "
            f"seed={self._seed}, shard={self._shard_index}/{self._num_shards}, "
            f"epoch={self._epoch}, step_in_epoch={self._step})"
        )


def eval_batches(
    dataset: PackedDataset, batch_size: int, *, shard_index: int = 0, num_shards: int = 1
) -> list[Int[np.ndarray, "local_batch seq_len_plus_1"]]:
    """Returns the dataset's rows in order, in full batches, for evaluation.

    With ``len(dataset) >= batch_size``: ``len(dataset) // batch_size`` batches of
    ``batch_size`` rows, and the remaining rows are dropped (every batch has one shape, so
    one compiled program serves them all). With fewer rows than ``batch_size``: one batch of
    all the rows (with shards: of the largest multiple of ``num_shards`` rows). Shard ``i``
    gets rows ``[i * b, (i + 1) * b)`` of each batch, ``b`` = batch rows // ``num_shards``.

    Args:
        dataset: the eval rows.
        batch_size: the global batch size.
        shard_index: which slice of each batch to return.
        num_shards: how many slices each batch is cut into; divides ``batch_size``.

    Returns:
        A list of int32 arrays of shape ``(b, seq_len + 1)``.

    Examples:
        >>> import numpy as np
        >>> data = PackedDataset(np.arange(14).reshape(7, 2))
        >>> [b[:, 0].tolist() for b in eval_batches(data, 3)]  # row 6 is dropped
        [[0, 2, 4], [6, 8, 10]]
        >>> [b.shape for b in eval_batches(data, 8)]  # fewer rows than a batch: all of them
        [(7, 2)]
    """
    dataset = _check_dataset(dataset)
    batch_size = _int("batch_size", batch_size, minimum=1, what="a positive int")
    shard_index, num_shards = _check_shards(batch_size, shard_index, num_shards)
    rows = len(dataset)
    if rows >= batch_size:
        size, count = batch_size, rows // batch_size
    else:
        size, count = rows - rows % num_shards, 1
    if size == 0:
        raise ValueError(
            f"The eval dataset has {rows} rows: too few for one batch over {num_shards} "
            "shard(s). Use a larger `eval_fraction`, a smaller `seq_len`, or more text."
        )
    local = size // num_shards
    return [
        dataset.tokens[j * size + shard_index * local : j * size + (shard_index + 1) * local].copy()
        for j in range(count)
    ]

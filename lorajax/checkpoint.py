"""Checkpoints with Orbax: the full train state, the data position, and adapters alone.

- :class:`Checkpointer`: numbered, atomic (optionally asynchronous) checkpoints of a
  :class:`lorajax.train.TrainState` (params, adapters, optimizer state with its bases and
  keys, step), the :class:`lorajax.data.BatchIterator` position and metadata (lorajax
  version, step, the run's config). :meth:`Checkpointer.restore` places every leaf with
  the sharding of a target, so a state saved on one device restores onto a mesh and back,
  and a resumed run continues exactly.
- :func:`abstract_state`: the ``jax.ShapeDtypeStruct`` target of a restore.
- :func:`save_adapters` / :func:`restore_adapters`: an adapter tree alone, in one
  directory.
- :class:`CheckpointError`: a missing, damaged or mismatched checkpoint.
"""

from lorajax._src.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_state,
    restore_adapters,
    save_adapters,
)

__all__ = [
    "Checkpointer",
    "abstract_state",
    "save_adapters",
    "restore_adapters",
    "CheckpointError",
]

"""Text to packed token batches: corpora, packing, a train/eval split, resumable batches.

- :func:`default_corpus`: the embedded default, the Python documentation text that every
  Python install ships (``pydoc_data.topics``); :func:`read_texts` reads your own files.
- :func:`make_datasets`: tokenise, split by document into train and eval, and
  :func:`pack` each into :class:`PackedDataset` rows of ``seq_len + 1`` tokens.
- :class:`BatchIterator`: deterministic shuffled batches, split across hosts, whose
  position (:meth:`BatchIterator.state`) can be saved and restored exactly.
- :func:`eval_batches`: fixed evaluation batches.
"""

from lorajax._src.batches import BatchIterator, eval_batches
from lorajax._src.corpus import TEXT_SUFFIXES, default_corpus, read_texts
from lorajax._src.data import PackedDataset, make_datasets, pack, tokenize

__all__ = [
    "TEXT_SUFFIXES",
    "default_corpus",
    "read_texts",
    "tokenize",
    "PackedDataset",
    "pack",
    "make_datasets",
    "BatchIterator",
    "eval_batches",
]

"""Text to training batches: read, tokenise, split, pack and iterate deterministically.

The pipeline is

1. :func:`default_corpus` or :func:`read_texts`: a list of documents (strings);
2. :func:`make_datasets`: tokenise, split the documents into a train and an eval set, and
   :func:`pack` each set into rows of ``seq_len + 1`` tokens (a :class:`PackedDataset`);
3. :class:`BatchIterator`: an endless, resumable stream of shuffled training batches that
   several processes can share (each takes its slice of the same global batch);
   :func:`eval_batches`: the eval rows in order, in fixed-size batches.

A tokenizer is any object with ``encode(text: str) -> list[int]`` and an int attribute
``eos_id`` (e.g. :class:`lorajax.models.Tokenizer`). Every document is followed by
``eos_id`` in the packed stream, so the model learns where a text ends.

Examples:
    >>> import numpy as np
    >>> from lorajax._src.data import BatchIterator, make_datasets
    >>> class Bytes:  # one token per UTF-8 byte, end-of-text is 256
    ...     eos_id = 256
    ...     def encode(self, text):
    ...         return list(text.encode())
    >>> texts = [f"document number {i} says hello" for i in range(20)]
    >>> train, evals = make_datasets(texts, Bytes(), seq_len=15, eval_fraction=0.2)
    >>> train.seq_len, len(train) > len(evals) > 0
    (15, True)
    >>> batches = BatchIterator(train, batch_size=4, seed=0)
    >>> batch = next(batches)
    >>> batch.shape, batch.dtype
    ((4, 16), dtype('int32'))
    >>> inputs, targets = batch[:, :-1], batch[:, 1:]
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from jaxtyping import Int

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

#: File suffixes that :func:`read_texts` collects when it walks a directory (compared
#: case-insensitively). A ``.jsonl`` file holds one JSON object per line with a ``"text"``
#: field; every other file is one document.
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md", ".markdown", ".rst", ".py", ".jsonl")

_INT32_MAX = np.iinfo(np.int32).max


class _Tokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------- validation


def _int(name: str, value: Any, *, minimum: int, what: str) -> int:
    """Returns ``value`` as an int when it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be {what}, got {value!r}.") from None
    if result < minimum:
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    return result


def _check_seq_len(seq_len: Any) -> int:
    return _int("seq_len", seq_len, minimum=1, what="a positive int (tokens per sequence)")


def _check_seed(seed: Any) -> int:
    return _int("seed", seed, minimum=0, what="a non-negative int")


def _check_eos(eos_id: Any) -> int:
    eos = _int("eos_id", eos_id, minimum=0, what="a non-negative int (a token id)")
    if eos > _INT32_MAX:
        raise ValueError(f"`eos_id` must fit in int32, got {eos_id!r}.")
    return eos


def _check_tokenizer(tokenizer: Any) -> int:
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(
            "`tokenizer` must have a method `encode(text: str) -> list[int]`, got "
            f"{type(tokenizer).__name__}. Pass e.g. the tokenizer returned by "
            "lorajax.models.load()."
        )
    if not hasattr(tokenizer, "eos_id"):
        raise TypeError(
            f"`tokenizer` must have an int attribute `eos_id` (the end-of-text token), but "
            f"{type(tokenizer).__name__} has none. Set it, e.g. `tokenizer.eos_id = 0`."
        )
    try:
        return _check_eos(tokenizer.eos_id)
    except ValueError:
        raise ValueError(
            f"`tokenizer.eos_id` must be a non-negative int token id, got {tokenizer.eos_id!r}."
        ) from None


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str | bytes):
        raise TypeError(
            "`texts` must be a sequence of documents (strings), got a single "
            f"{type(texts).__name__}. Wrap it in a list: [text]."
        )
    texts = list(texts)
    if not texts:
        raise ValueError("`texts` is empty: pass at least one document.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`texts[{i}]` must be a str, got {type(text).__name__}.")
    return texts


def _as_ids(ids: Any, where: str) -> np.ndarray:
    """One document's token ids as a 1-D int32 array (checked: integers in [0, 2**31))."""
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros((0,), np.int32)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{where} must be a flat sequence of int token ids, got an array of shape "
            f"{array.shape} and dtype {array.dtype}."
        )
    if array.min() < 0 or array.max() > _INT32_MAX:
        raise ValueError(
            f"{where} holds token ids outside [0, 2**31): min {array.min()}, max {array.max()}."
        )
    return array.astype(np.int32, copy=False)


# ----------------------------------------------------------------------------- documents


def default_corpus() -> list[str]:
    """Returns the built-in corpus: the Python documentation topics shipped with Python.

    Every CPython installation carries the text of ``help("topics")`` in
    ``pydoc_data.topics.topics`` (a dict topic -> text; 79 topics and about 465k characters
    on Python 3.11). Each topic is one document, in sorted topic order, so the corpus is the
    same on every run on a given Python version.

    Returns:
        The documents, in sorted topic order.

    Raises:
        RuntimeError: this Python installation lacks ``pydoc_data`` (some minimal
            distributions strip it); the message says how to get it or what to use instead.

    Examples:
        >>> docs = default_corpus()
        >>> len(docs) > 50 and all(isinstance(d, str) and d.strip() for d in docs)
        True
        >>> docs == default_corpus()
        True
    """
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except (ImportError, AttributeError) as error:
        raise RuntimeError(
            "The default corpus is the standard library's `pydoc_data.topics`, which this "
            f"Python installation lacks ({error}). Install the full standard library (e.g. "
            "Debian's `libpython3-stdlib` package, or the python.org/uv/conda builds, which "
            "ship it), or train on your own text files with read_texts(paths)."
        ) from error
    documents = [topics[key] for key in sorted(topics)]
    documents = [doc for doc in documents if isinstance(doc, str) and doc.strip()]
    if not documents:
        raise RuntimeError(
            "`pydoc_data.topics.topics` holds no text in this Python installation. Train on "
            "your own text files with read_texts(paths)."
        )
    return documents


def _collect_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    files: list[str] = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(
                    os.path.join(root, name)
                    for name in names
                    if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES)
                )
            files.extend(sorted(found))
        else:
            files.append(path)
    return files


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path!r} is not UTF-8 text (bad byte at offset {error.start}). Convert it to "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out."
        ) from None


def _read_jsonl(path: str, text: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path!r} line {number} is not valid JSON ({error.msg}). A .jsonl file needs "
                'one JSON object per line, e.g. {"text": "..."}.'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(
                f'{path!r} line {number} has no string field "text". A .jsonl file needs '
                'one JSON object per line, e.g. {"text": "..."}.'
            )
        documents.append(record["text"])
    return documents


def read_texts(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    r"""Reads text files as documents.

    A file is one document, except a ``.jsonl`` file, whose lines are JSON objects whose
    ``"text"`` fields are the documents. A directory contributes, recursively and in sorted
    path order, its files whose suffix is in :data:`TEXT_SUFFIXES` (hidden files and
    directories are skipped); a file named explicitly is read whatever its suffix. Files are
    decoded as UTF-8 (a leading byte-order mark is dropped). Documents that are empty or only
    whitespace are left out.

    Args:
        paths: a file or directory, or a sequence of them; the order is kept.

    Returns:
        The documents, in order.

    Raises:
        FileNotFoundError: a path does not exist (checked before anything is read).
        ValueError: a file is not UTF-8, a ``.jsonl`` line is not an object with a
            ``"text"`` string, or nothing but whitespace was found.

    Examples:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "a.txt").write_text("first document")
        >>> (root / "more").mkdir()
        >>> _ = (root / "more" / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n')
        >>> _ = (root / "more" / "image.png").write_bytes(b"\x89PNG")  # not a text suffix
        >>> read_texts(root)
        ['first document', 'second', 'third']
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("`paths` is empty: pass at least one text file or directory.")
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Text path {os.fspath(path)!r} does not exist. Check the path, or use "
                "default_corpus() for the built-in Python documentation corpus."
            )
    files = _collect_files(paths)
    documents: list[str] = []
    for file in files:
        with open(file, "rb") as handle:
            text = _decode(file, handle.read())
        if file.lower().endswith(".jsonl"):
            documents.extend(_read_jsonl(file, text))
        else:
            documents.append(text)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        shown = ", ".join(repr(os.fspath(p)) for p in paths)
        raise ValueError(
            f"No text found in {shown}: {len(files)} file(s) read, all empty or whitespace. "
            f"Point `paths` at files with text (directories are searched for "
            f"{', '.join(TEXT_SUFFIXES)} files)."
        )
    return documents


def _encode_all(texts: Sequence[str], tokenizer: _Tokenizer) -> list[np.ndarray]:
    return [
        _as_ids(tokenizer.encode(text), f"tokenizer.encode(texts[{i}])")
        for i, text in enumerate(texts)
    ]


def tokenize(texts: Sequence[str], tokenizer: _Tokenizer) -> list[list[int]]:
    """Encodes each document with ``tokenizer.encode``.

    Args:
        texts: the documents.
        tokenizer: an object with ``encode(str) -> list[int]`` and an int ``eos_id``.

    Returns:
        One list of token ids per document (no end-of-text token added; :func:`pack`
        adds it).

    Examples:
        >>> class Bytes:
        ...     eos_id = 256
        ...     def encode(self, text):
        ...         return list(text.encode())
        >>> tokenize(["hi", "é"], Bytes())
        [[104, 105], [195, 169]]
    """
    texts = _check_texts(texts)
    _check_tokenizer(tokenizer)
    return [ids.tolist() for ids in _encode_all(texts, tokenizer)]


# ----------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PackedDataset:
    """Fixed-length training rows cut from a token stream.

    Row ``i`` is one example: the model reads ``tokens[i, :-1]`` and predicts
    ``tokens[i, 1:]``. The array is stored as read-only, C-contiguous int32.

    Attributes:
        tokens: int32 array of shape ``(rows, seq_len + 1)``.

    Examples:
        >>> import numpy as np
        >>> data = PackedDataset(np.arange(12).reshape(3, 4))
        >>> len(data), data.seq_len, data.num_tokens
        (3, 3, 12)
    """

    tokens: Int[np.ndarray, "rows seq_len_plus_1"]

    def __post_init__(self):
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(
                "`tokens` must have shape (rows, seq_len + 1) with seq_len >= 1, got shape "
                f"{tokens.shape}."
            )
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"`tokens` must hold integer token ids, got dtype {tokens.dtype}.")
        if tokens.size and (tokens.min() < 0 or tokens.max() > _INT32_MAX):
            raise ValueError("`tokens` must hold token ids in [0, 2**31).")
        tokens = np.array(tokens, dtype=np.int32, order="C", copy=True)
        tokens.flags.writeable = False
        object.__setattr__(self, "tokens", tokens)

    @property
    def seq_len(self) -> int:
        """Tokens the model reads per row (each row stores ``seq_len + 1``)."""
        return int(self.tokens.shape[1]) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens stored, ``rows * (seq_len + 1)``; an epoch predicts ``rows * seq_len``."""
        return int(self.tokens.size)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"PackedDataset(rows={len(self)}, seq_len={self.seq_len})"


def _stream(documents: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    eos = np.array([eos_id], np.int32)
    parts = [part for doc in documents for part in (doc, eos)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _windows(stream: np.ndarray, seq_len: int) -> PackedDataset:
    width = seq_len + 1
    rows = stream.shape[0] // width
    return PackedDataset(stream[: rows * width].reshape(rows, width))


def pack(documents: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> PackedDataset:
    """Concatenates documents, each followed by ``eos_id``, and cuts rows of ``seq_len + 1``.

    Rows are consecutive and do not overlap: row ``i`` is ``stream[i * (seq_len + 1) :
    (i + 1) * (seq_len + 1)]``. The tail shorter than a row is dropped, so the result may
    have no rows.

    Args:
        documents: token ids per document.
        seq_len: tokens the model reads per example; rows hold ``seq_len + 1``.
        eos_id: the end-of-text token appended after every document.

    Returns:
        The packed rows.

    Examples:
        >>> pack([[1, 2, 3], [4, 5]], seq_len=2, eos_id=0).tokens
        array([[1, 2, 3],
               [0, 4, 5]], dtype=int32)
    """
    seq_len = _check_seq_len(seq_len)
    eos_id = _check_eos(eos_id)
    if isinstance(documents, str | bytes):
        raise TypeError("`documents` must be token id sequences; tokenise text first.")
    arrays = [_as_ids(doc, f"documents[{i}]") for i, doc in enumerate(documents)]
    return _windows(_stream(arrays, eos_id), seq_len)


# ----------------------------------------------------------------------------- split


def _split_point(lengths: np.ndarray, target: int, minimum: int) -> int | None:
    """Number of leading documents for eval: the prefix closest to ``target`` tokens.

    Returns None when no prefix leaves both sides at least ``minimum`` tokens.
    """
    total = int(lengths.sum())
    prefix = np.cumsum(lengths)
    k = int(np.searchsorted(prefix, target)) + 1  # smallest count with prefix >= target
    candidates = [c for c in (k - 1, k) if 1 <= c < len(lengths)]
    valid = [c for c in candidates if prefix[c - 1] >= minimum and total - prefix[c - 1] >= minimum]
    if not valid:
        return None
    return min(valid, key=lambda c: (abs(int(prefix[c - 1]) - target), c))


def make_datasets(
    texts: Sequence[str],
    tokenizer: _Tokenizer,
    *,
    seq_len: int,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[PackedDataset, PackedDataset]:
    """Tokenises documents, splits them into train and eval, and packs each set.

    The split is by document, so no row mixes train and eval text: the documents are
    shuffled with ``numpy.random.default_rng(seed)``, and the eval set takes documents in
    that order until it holds about ``eval_fraction`` of the tokens (counting one
    end-of-text token per document; the stopping point is the one closest to the target
    that leaves both sets at least one row). Each set is then packed, its documents in their
    original order. With one document, or when no document split leaves both sets a row
    (a few very unequal documents), the token stream of the shuffled documents is split
    instead: the eval set takes its tail.

    Args:
        texts: the documents.
        tokenizer: an object with ``encode(str) -> list[int]`` and an int ``eos_id``.
        seq_len: tokens the model reads per example; rows hold ``seq_len + 1``.
        eval_fraction: the share of tokens held out for evaluation, in (0, 1).
        seed: the seed of the document shuffle.

    Returns:
        ``(train, eval)`` datasets, each with at least one row.

    Raises:
        ValueError: bad ``seq_len``, ``eval_fraction`` or ``seed``; or too little text for
            one train and one eval row of ``seq_len + 1`` tokens (checked after tokenising,
            before packing).

    Examples:
        >>> class Bytes:
        ...     eos_id = 256
        ...     def encode(self, text):
        ...         return list(text.encode())
        >>> train, evals = make_datasets(["a" * 99, "b" * 99, "c" * 99], Bytes(), seq_len=9,
        ...                              eval_fraction=0.3)
        >>> len(train), len(evals)
        (20, 10)
        >>> sorted({chr(t) for t in evals.tokens.ravel() if t != 256})  # one whole document
        ['c']
    """
    seq_len = _check_seq_len(seq_len)
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float | np.floating):
        raise ValueError(f"`eval_fraction` must be a float in (0, 1), got {eval_fraction!r}.")
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ValueError(f"`eval_fraction` must be a float in (0, 1), got {eval_fraction!r}.")
    seed = _check_seed(seed)
    texts = _check_texts(texts)
    eos_id = _check_tokenizer(tokenizer)

    documents = _encode_all(texts, tokenizer)
    lengths = np.array([doc.shape[0] + 1 for doc in documents], np.int64)
    total = int(lengths.sum())
    width = seq_len + 1
    if total < 2 * width:
        raise ValueError(
            f"Too little text: {len(texts)} document(s) give {total} tokens (one end-of-text "
            f"token per document included), but seq_len={seq_len} needs at least "
            f"{2 * width} for one training and one eval sequence of {width} tokens. Use a "
            f"smaller `seq_len` (at most {total // 2 - 1}) or more text."
        )
    target = max(width, round(float(eval_fraction) * total))
    order = np.random.default_rng(seed).permutation(len(documents))
    count = _split_point(lengths[order], target, width) if len(documents) > 1 else None
    if count is not None:
        eval_ids = np.sort(order[:count])
        train_ids = np.sort(order[count:])
        train = _windows(_stream([documents[i] for i in train_ids], eos_id), seq_len)
        evals = _windows(_stream([documents[i] for i in eval_ids], eos_id), seq_len)
    else:
        stream = _stream([documents[i] for i in order], eos_id)
        cut = total - min(target, total - width)
        train, evals = _windows(stream[:cut], seq_len), _windows(stream[cut:], seq_len)
    return train, evals


# ----------------------------------------------------------------------------- batches


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

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
    >>> from lorajax.data import BatchIterator, make_datasets
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
import operator
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from jaxtyping import Int

__all__ = ["tokenize", "PackedDataset", "pack", "make_datasets"]

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

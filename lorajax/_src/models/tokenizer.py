"""A thin text <-> token id wrapper around a Hugging Face ``tokenizers.Tokenizer``."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from lorajax._src.models.errors import ModelFileError

__all__ = ["Tokenizer", "byte_to_unicode"]

_FILE_NAME = "tokenizer.json"
_BYTE_LEVEL_EOS = "<|endoftext|>"


def byte_to_unicode() -> dict[int, str]:
    r"""The reversible byte -> printable character table of byte-level BPE (GPT-2).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes
    (controls, space, ...) are mapped in order to the code points 256, 257, ... so that
    every token string is printable and whitespace-free.

    Returns:
        A dict from each of the 256 byte values to a one-character string.

    Examples:
        >>> from lorajax._src.models.tokenizer import byte_to_unicode
        >>> table = byte_to_unicode()
        >>> table[ord("a")], table[ord(" ")], table[ord("\n")]
        ('a', 'Ġ', 'Ċ')
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_id(name: str, value: Any, vocab_size: int, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        allowed = "None or an int" if optional else "an int"
        raise ValueError(
            f"`{name}` must be {allowed} in [0, {vocab_size}) (the vocabulary size), got {value!r}."
        )


class Tokenizer:
    """Encodes text to token ids and back, and knows the end-of-sequence id.

    It wraps a Hugging Face :class:`tokenizers.Tokenizer` (available as :attr:`inner`) and
    adds what training and generation need: the end-of-sequence id, an optional
    beginning-of-sequence id and whether :meth:`encode` prepends it. Special tokens written
    in the text (such as ``<|im_end|>``) encode to their ids, and :meth:`decode` writes
    them back, so ``decode(encode(text)) == text`` for byte-level tokenizers.

    Args:
        inner: The wrapped tokenizer.
        eos_id: The end-of-sequence token id.
        bos_id: The beginning-of-sequence token id, if the model has one.
        add_bos: Whether :meth:`encode` prepends ``bos_id``.

    Raises:
        TypeError: ``inner`` is not a ``tokenizers.Tokenizer``.
        ValueError: an id is outside the vocabulary, or ``add_bos`` without a ``bos_id``.

    Examples:
        >>> from lorajax._src.models.tokenizer import Tokenizer
        >>> tok = Tokenizer.byte_level()
        >>> ids = tok.encode("héllo")
        >>> ids
        [104, 195, 169, 108, 108, 111]
        >>> tok.decode(ids + [tok.eos_id])
        'héllo<|endoftext|>'
    """

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        add_bos: bool = False,
    ) -> None:
        if not isinstance(inner, tokenizers.Tokenizer):
            raise TypeError(
                f"`inner` must be a tokenizers.Tokenizer, got {type(inner).__name__}; build one "
                "with the `tokenizers` package or use Tokenizer.from_file."
            )
        vocab_size = inner.get_vocab_size(with_added_tokens=True)
        _check_id("eos_id", eos_id, vocab_size, optional=False)
        _check_id("bos_id", bos_id, vocab_size, optional=True)
        if not isinstance(add_bos, bool):
            raise ValueError(f"`add_bos` must be a bool, got {add_bos!r}.")
        if add_bos and bos_id is None:
            raise ValueError("`add_bos=True` needs a `bos_id`; pass one or set add_bos=False.")
        self.inner = inner
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        """The number of token ids, added special tokens included."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id}, add_bos={self.add_bos})"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` in front when :attr:`add_bos` is set.

        Args:
            text: Any string; special tokens written in it map to their ids.

        Returns:
            The token ids.

        Raises:
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
        ids = self.inner.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens are written out, not dropped.

        Args:
            ids: Token ids in ``[0, vocab_size)``.

        Returns:
            The decoded string. Byte sequences that are not valid UTF-8 (say, a multi-byte
            character cut in half) decode to U+FFFD.

        Raises:
            ValueError: an id is outside the vocabulary.
        """
        ids = [int(i) for i in ids]
        vocab_size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(
                f"`ids` must lie in [0, {vocab_size}) (the vocabulary size), got {bad[:5]!r}."
            )
        return self.inner.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``directory/tokenizer.json`` (created if needed), atomically.

        The file is the Hugging Face ``tokenizers`` format, readable by
        :meth:`from_file` and by ``transformers``. The special ids are not part of it: they
        live in the model's config.

        Args:
            directory: The directory to write into; its other files are left alone.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_FILE_NAME}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.inner.to_str())
            os.replace(tmp, directory / _FILE_NAME)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        eos_id: int,
        bos_id: int | None = None,
        add_bos: bool = False,
    ) -> Tokenizer:
        """Reads a ``tokenizer.json`` (or a directory holding one).

        Args:
            path: The ``tokenizer.json`` file, or its directory.
            eos_id: The end-of-sequence token id.
            bos_id: The beginning-of-sequence token id, if any.
            add_bos: Whether :meth:`encode` prepends ``bos_id``.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: the file does not exist.
            ModelFileError: the file is not a valid ``tokenizer.json``.

        Examples:
            >>> import tempfile
            >>> from lorajax._src.models.tokenizer import Tokenizer
            >>> with tempfile.TemporaryDirectory() as d:
            ...     Tokenizer.byte_level().save(d)
            ...     tok = Tokenizer.from_file(d, eos_id=256)
            >>> tok.decode(tok.encode("round trip"))
            'round trip'
        """
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / _FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer file at {str(path)!r}; pass the path of a tokenizer.json."
            )
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ModelFileError(
                f"{str(path)!r} is not a valid tokenizer.json ({e}); write it with "
                "Tokenizer.save or the `tokenizers` package."
            ) from None
        return cls(inner, eos_id=eos_id, bos_id=bos_id, add_bos=add_bos)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A self-contained byte tokenizer for tests and tiny models.

        Token ``b`` is the byte ``b`` (0-255) and token 256 is ``<|endoftext|>``, the
        end-of-sequence token: 257 ids, no merges. Any text round-trips exactly.

        Returns:
            The tokenizer, with ``eos_id=256`` and no ``bos_id``.

        Examples:
            >>> from lorajax._src.models.tokenizer import Tokenizer
            >>> tok = Tokenizer.byte_level()
            >>> tok.vocab_size, tok.eos_id, tok.encode("A b")
            (257, 256, [65, 32, 98])
        """
        vocab = {char: b for b, char in byte_to_unicode().items()}
        inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        inner.decoder = decoders.ByteLevel()
        inner.add_special_tokens([tokenizers.AddedToken(_BYTE_LEVEL_EOS, special=True)])
        return cls(inner, eos_id=inner.token_to_id(_BYTE_LEVEL_EOS))

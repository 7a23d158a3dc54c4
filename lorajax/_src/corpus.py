"""Documents for the data pipeline: the embedded corpus and the user's text files.

Examples:
    >>> from lorajax.data import default_corpus
    >>> docs = default_corpus()
    >>> len(docs) > 50 and all(isinstance(d, str) for d in docs)
    True
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence

__all__ = ["TEXT_SUFFIXES", "default_corpus", "read_texts"]

#: File suffixes that :func:`read_texts` collects when it walks a directory (compared
#: case-insensitively). A ``.jsonl`` file holds one JSON object per line with a ``"text"``
#: field; every other file is one document.
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md", ".markdown", ".rst", ".py", ".jsonl")


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

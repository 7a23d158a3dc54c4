"""Writing a set of files so that a failure never leaves a partial one."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable

__all__ = ["write_atomic"]


def write_atomic(directory: pathlib.Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Writes every file under a temporary name in ``directory``, then renames them all.

    Each ``writers[name](tmp_path)`` writes one file; only when all have succeeded are they
    renamed into place (``os.replace``, atomic on one file system). Temporaries are removed
    whatever happens.

    Args:
        directory: An existing directory.
        writers: File name -> a function that writes that file's content to a path.

    Raises:
        IsADirectoryError: If a directory stands where one of the files would go.

    Examples:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomic(d, {"a.txt": lambda p: pathlib.Path(p).write_text("hi")})
        >>> sorted(x.name for x in d.iterdir()), (d / "a.txt").read_text()
        (['a.txt'], 'hi')
    """
    for name in writers:
        if (directory / name).is_dir():
            raise IsADirectoryError(
                f"{directory / name}: is a directory, so the file cannot be written there; "
                "remove it or pick another output directory."
            )
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            temps[name] = tmp
            write(tmp)
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temps.values():
            pathlib.Path(tmp).unlink(missing_ok=True)

"""Small file helpers shared by the CLI and the tools."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["check_writable", "write_atomic"]


def check_writable(path: str | os.PathLike) -> Path:
    """The folder *path* will be written into; an :class:`OSError` naming *path* if that folder does not exist.

    Commands call it before long work, so that a mistyped ``-o`` fails at once rather than after the work.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path}: {folder} is not a directory")
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: directory {folder} does not exist")
    return folder


def write_atomic(path: str | os.PathLike, data) -> None:
    """Write *data* to *path* atomically: a temp file in the same folder, then :func:`os.replace`.

    *data* is bytes, a str (UTF-8) or a list of bytes-like pieces written in order (large files need not be
    joined in memory first). A reader sees either the old file or the complete new one, never a partial write.
    """
    if isinstance(data, str):
        data = data.encode()
    pieces = data if isinstance(data, list) else [data]
    path = Path(path)
    folder = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

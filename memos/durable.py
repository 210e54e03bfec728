"""Making a file, or a rename inside a folder, durable: the one place the core calls fsync on a path."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries (a rename or a new name in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

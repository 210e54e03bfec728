"""Audit archive files: records moved out of the store by ``audit_archive``, read back by ``audit_verify``.

A file is a msgpack stream: a header map, then each record exactly as the
store held it (a map in the form the chain hashes), oldest first. Written
once (never over an existing file) and fsync'd before its records leave the
store.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from . import codec
from .durable import fsync_path
from .errors import IntegrityError, InvalidRequest

FORMAT = "memos-audit-archive-v1"


def new_path(to: str) -> Path:
    """Where a new archive may be written: an absolute path to no existing file, in an existing folder."""
    path = Path(to)
    if not path.is_absolute():
        raise InvalidRequest("to must be an absolute path", field="to")
    if path.exists() or path.is_symlink():
        raise InvalidRequest(f"{path} exists already; an archive is never written over a file", field="to")
    if not path.parent.is_dir():
        raise InvalidRequest(f"{path.parent} is not a folder", field="to")
    return path


def write(path: Path, header: dict[str, Any], records: list[bytes]) -> str:
    """Write the archive, fsync it and its folder; its sha256. Nothing is left behind on failure."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (codec.pack_unsorted({"format": FORMAT, **header}), *records):
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(path.parent)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def read(paths: list[str]) -> Iterator[tuple[int, Any]]:
    """(seq, record) of every record of the archives, in the order given.

    A file that cannot be opened is a bad request; one that does not decode is an integrity error.
    """
    for name in paths:
        path = Path(name)
        if not path.is_absolute():
            raise InvalidRequest(f"archive {name} must be an absolute path", field="archives")
        try:
            f = path.open("rb")
        except OSError as exc:
            raise InvalidRequest(f"cannot read archive {name}: {exc.strerror}", field="archives") from None
        with f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=True)
            try:
                header = next(unpacker, None)
                if not isinstance(header, dict) or header.get("format") != FORMAT:
                    raise IntegrityError(f"{name} is not an audit archive")
                for record in unpacker:
                    seq = record.get("seq") if isinstance(record, dict) else None
                    if not isinstance(seq, int):
                        raise IntegrityError(f"archive {name} holds something that is not an audit record")
                    yield seq, record
            except (msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                raise IntegrityError(f"archive {name} cannot be decoded: {exc}") from None

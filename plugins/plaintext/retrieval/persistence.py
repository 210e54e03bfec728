"""The saved form of an index: a folder of versions, each checksummed, switched atomically.

``path/v-N/`` holds ``arrays.npz``, ``strings.json``, ``ann.usearch`` (when
the index has a graph) and ``meta.json`` (format, dimension, size, config,
a CRC32 of every file). A new version is written and fsynced beside the old
one, then the pointer ``path/CURRENT`` is replaced (``os.replace``), then
older versions are deleted: a crash at any point leaves a readable version.

These functions know the folder, not the index: :class:`~.index.HybridIndex`
gathers the arrays and strings of its parts and restores them from what
:func:`read` returns (see docs/retrieval.md, Persistence).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .config import IndexCorruptError, RetrievalConfig

FORMAT_VERSION = 1

# What reading a damaged folder can raise; each becomes an IndexCorruptError.
_LOAD_ERRORS = (OSError, KeyError, TypeError, ValueError, IndexError, RuntimeError, zlib.error)


@dataclass
class Saved:
    """One version of a saved index, its checksums verified."""

    dim: int
    n: int
    sum_dl: float
    config: RetrievalConfig
    arrays: dict[str, np.ndarray]
    strings: dict[str, Any]
    ann_file: str | None  # the saved graph, if the index had one


def write(path: str | os.PathLike, *, dim: int, n: int, sum_dl: float, config: RetrievalConfig,
          arrays: Mapping[str, np.ndarray], strings: Mapping[str, Any],
          save_ann: Callable[[str], None] | None) -> None:
    """Write a new version into folder ``path`` and make it current; ``save_ann(file)`` writes the graph."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=path)
    try:
        with open(os.path.join(tmp, "arrays.npz"), "wb") as f:
            np.savez(f, **arrays)
        with open(os.path.join(tmp, "strings.json"), "w", encoding="utf-8") as f:
            json.dump(dict(strings), f, ensure_ascii=False)
        if save_ann is not None:
            save_ann(os.path.join(tmp, "ann.usearch"))
        files = {name: _file_crc(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        meta = dict(format=FORMAT_VERSION, dim=dim, n=n, sum_dl=sum_dl, config=_config_to_json(config), files=files)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        for name in os.listdir(tmp):
            _fsync_file(os.path.join(tmp, name))
        version = _next_version(path)
        os.rename(tmp, os.path.join(path, version))
        _fsync_dir(path)
        ptr = os.path.join(path, ".CURRENT.tmp")
        with open(ptr, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptr, os.path.join(path, "CURRENT"))
        _fsync_dir(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in os.listdir(path):
        if (name.startswith("v-") and name != version) or name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def read(path: str | os.PathLike) -> Saved:
    """The current version in folder ``path``; IndexCorruptError if missing, corrupt or of another format."""
    path = os.fspath(path)
    with corrupt_on_error(path):
        with open(os.path.join(path, "CURRENT"), encoding="utf-8") as f:
            version = f.read().strip()
        if not re.fullmatch(r"v-\d+", version):
            raise IndexCorruptError(f"{path}: bad CURRENT pointer {version!r}")
        folder = os.path.join(path, version)
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise IndexCorruptError(f"{path}: unknown index format {found!r}")
        for name, crc in meta["files"].items():
            if _file_crc(os.path.join(folder, name)) != crc:
                raise IndexCorruptError(f"{path}: checksum mismatch in {name}")
        with np.load(os.path.join(folder, "arrays.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        with open(os.path.join(folder, "strings.json"), encoding="utf-8") as f:
            strings = json.load(f)
        ann = os.path.join(folder, "ann.usearch") if "ann.usearch" in meta["files"] else None
        return Saved(dim=int(meta["dim"]), n=int(meta["n"]), sum_dl=float(meta["sum_dl"]),
                     config=_config_from_json(meta["config"]), arrays=arrays, strings=strings, ann_file=ann)


@contextlib.contextmanager
def corrupt_on_error(path: str) -> Iterator[None]:
    """Turn whatever a damaged saved index makes the reader raise into IndexCorruptError."""
    try:
        yield
    except IndexCorruptError:
        raise
    except _LOAD_ERRORS as e:
        raise IndexCorruptError(f"{path}: cannot load index: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------- helpers

def _config_to_json(cfg: RetrievalConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["window"] = list(cfg.window)
    return d


def _config_from_json(d: Mapping[str, Any]) -> RetrievalConfig:
    names = {f.name for f in fields(RetrievalConfig)}
    return RetrievalConfig(**{k: (tuple(v) if k == "window" else v) for k, v in d.items() if k in names})


def _file_crc(p: str) -> int:
    crc = 0
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return crc
            crc = zlib.crc32(b, crc)


def _fsync_file(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: str) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _next_version(path: str) -> str:
    nums = [int(x[2:]) for x in os.listdir(path) if re.fullmatch(r"v-\d+", x)]
    return f"v-{max(nums, default=0) + 1}"

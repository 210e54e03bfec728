"""The operations on the store file as a whole, declared once (``catalog.core_operations`` lists them).

Like :mod:`memos.catalog`, this module imports no storage or transport: the client library reads it
without loading either.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from typing_extensions import TypedDict

from .operations import Args, NoArgs, Operation


class CompactArgs(Args):
    # The folder the caller means to compact. The daemon stops serving for a moment to do it, so the
    # request names the store it takes offline, and one meant for another daemon is refused.
    data_dir: str = Field(max_length=4096)


class StoreStats(TypedDict):
    path: str  # the data folder, or the PostgreSQL URL without its password
    backend: str  # "lmdb" or "postgresql"
    file_bytes: int  # data.mdb on disk; PostgreSQL: its tables' bytes, indexes and TOAST included
    map_size: int | None  # LMDB's alone, as are page_size and pages
    page_size: int | None
    pages: dict[str, int] | None  # total (last page + 1), used (meta, branch, leaf and overflow pages), free
    databases: dict[str, dict[str, int]]  # sub-database -> entries, pages (LMDB) or bytes (PostgreSQL)
    cubes: dict[str, dict[str, int]]  # cube -> version, commits, version_records, head_bytes, version_bytes
    types: dict[str, dict[str, int]]  # memory type -> state_bytes, blobs, blob_bytes
    blobs: dict[str, int]  # count, bytes, references (version records referring to one)
    last_compaction: dict[str, Any] | None  # what the last store_compact did (see below)


class CompactRequested(TypedDict):
    id: str  # last_compaction in store_stats names it once the file is rewritten
    path: str
    bytes_before: int  # the file's size when asked
    restart: bool  # memosd restarts in place to rewrite the file; the embedded API, when next opened


STORE_OPERATIONS = (
    Operation("store_stats", NoArgs, StoreStats, "worker",
              "Where the store's bytes go: by cube, by memory type, blobs, pages used and free (admin).",
              "store_stats"),
    Operation("store_compact", CompactArgs, CompactRequested, "writer",
              "Give the free pages of the file back to the disk: memosd restarts in place and rewrites "
              "the file as a compacting copy (admin; docs/storage.md).", "write_store_compact", ("data_dir",)),
)

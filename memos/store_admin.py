"""Where the store's bytes go (``store_stats``), and giving freed pages back to the disk (``store_compact``).

LMDB reuses the pages a transaction frees but never shrinks its file. ``store_compact`` marks the
store to be rewritten as a compacting copy of itself (``Store._rewrite_live_pages``, the same
rewrite a migration uses) the next time it is opened, and memosd restarts in place at once to open
it: it drains as on SIGTERM (every accepted write is committed to the old file first), execs the
same command line under the same pid, and the new process copies, flushes and atomically renames
the file before anything else uses it. Nothing writes to the old file once the copy begins, and a
crash at any moment leaves the old file or the new one, with the request still pending in either
until the rewrite is done. What the rewrite did is kept in ``meta`` and audited once, by the first
:class:`StoreAdmin` of the reopened store.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import lmdb

from . import catalog_store, codec
from .access import Actor
from .core import Core
from .errors import InvalidRequest
from .ids import new_id
from .storage import LAST_REWRITE
from .writes import Applied, Write


def _cube_of(key: bytes) -> str:
    return key.split(b"\0", 1)[0].decode(errors="replace")


class StoreAdmin:
    operations = catalog_store.STORE_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core
        self._audit_last_compaction()

    # -- store_stats ------------------------------------------------------

    def store_stats(self, actor: Actor) -> dict[str, Any]:
        """Bytes by cube and memory type, blobs, pages used and free (local administrator).

        Reads every head and version record of one snapshot: work in proportion to the store,
        like a backup, and the administrator's alone.
        """
        self.core.admin_only(actor, "store_stats")
        store = self.core.store
        db = store.db
        with store.read() as txn:
            databases = {name: txn.stat(handle) for name, handle in db.items()}
            space = store.space(databases)
            cubes: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(
                ("version", "commits", "version_records", "head_bytes", "version_bytes"), 0))
            for key, value in txn.cursor(db=db["cubes"]):
                cubes[bytes(key).decode()]["version"] = codec.unpack(value)["version"]
            for key in txn.cursor(db=db["commits"]).iternext(keys=True, values=False):
                cubes[_cube_of(key)]["commits"] += 1
            types: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(
                ("state_bytes", "blobs", "blob_bytes"), 0))
            blob_size: dict[str, int] = {}
            typed_blobs: set[tuple[str, str]] = set()
            for name, field in (("heads", "head_bytes"), ("versions", "version_bytes")):
                for key, value in txn.cursor(db=db[name]):
                    cube = cubes[_cube_of(key)]
                    if name == "heads":
                        value = value[8:]  # u64 version, then the state
                    else:
                        cube["version_records"] += 1
                    cube[field] += len(value)
                    if not value:  # absent from this version on
                        continue
                    state = codec.unpack(value)
                    kind = str(state.get("type"))
                    types[kind]["state_bytes"] += len(value)
                    blob = state.get("blob")
                    if isinstance(blob, dict) and (kind, blob["sha256"]) not in typed_blobs:
                        typed_blobs.add((kind, blob["sha256"]))
                        blob_size[blob["sha256"]] = int(blob["size"])
                        types[kind]["blobs"] += 1
                        types[kind]["blob_bytes"] += int(blob["size"])
            references = sum(codec.from_u64(v) for v in txn.cursor(db=db["blob_refs"]).iternext(keys=False))
            last = txn.get(LAST_REWRITE, db=db["meta"])
        return {
            "path": store.path,
            "backend": store.backend,
            **space,
            "cubes": dict(cubes),
            "types": dict(types),
            "blobs": {"count": databases["blobs"]["entries"], "bytes": sum(blob_size.values()),
                      "references": references},
            "last_compaction": None if last is None else _public(codec.unpack(last)),
        }

    # -- store_compact ----------------------------------------------------

    def write_store_compact(self, actor: Actor, data_dir: str, request_id: str | None = None) -> Write:
        """Rewrite the file without its free pages when the store is next opened (local administrator);
        memosd reopens it at once by restarting in place (``daemon/main.py``)."""
        self.core.admin_only(actor, "store_compact")
        store = self.core.store
        if store.backend != "lmdb":
            raise self.core.refused(actor, "store_compact", None, InvalidRequest(
                "a PostgreSQL store gives space back through VACUUM (autovacuum, or VACUUM FULL by its "
                "administrator); there is no file to rewrite"))
        if not isinstance(data_dir, str) or os.path.realpath(data_dir) != os.path.realpath(store.path):
            raise self.core.refused(actor, "store_compact", None, InvalidRequest(
                f"this daemon serves the store in {store.path}, not {data_dir!r}", field="data_dir"))
        request = {"id": new_id(), "requested_by": actor.name, "request_id": request_id}

        def fn(txn: lmdb.Transaction) -> Applied:
            before = os.stat(os.path.join(store.path, "data.mdb")).st_size
            store.request_rewrite(txn, {**request, "requested_at": time.time()})
            return Applied({"id": request["id"], "path": store.path, "bytes_before": before, "restart": True},
                           detail={"compaction": request["id"], "bytes_before": before})

        return Write(actor, "store_compact", None, fn, request_id)

    def _audit_last_compaction(self) -> None:
        """Audit a rewrite done when the store was opened: the record follows the swap, in the new file.
        A crash before it commits leaves the rewrite unaudited, so the next opening audits it."""
        store = self.core.store
        with store.read() as txn:
            raw = txn.get(LAST_REWRITE, db=store.db["meta"])
        if raw is None or codec.unpack(raw).get("audited", True):
            return

        def fn(txn: lmdb.Transaction) -> None:
            record = codec.unpack(txn.get(LAST_REWRITE, db=store.db["meta"]))
            record["audited"] = True
            record["offline_s"] = round(record["done_at"] - record["requested_at"], 6)
            self.core.audit.append(txn, actor="memosd", op="store_compacted", outcome="ok",
                                   detail={"compaction": record["id"], **_figures(record)})
            txn.put(LAST_REWRITE, codec.pack_unsorted(record), db=store.db["meta"])

        store.write(fn)


def _figures(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("bytes_before", "bytes_after", "copy_s", "offline_s") if k in record}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """What store_stats shows of the last compaction: who asked, when, and what it did."""
    keys = ("id", "requested_by", "requested_at", "done_at", "bytes_before", "bytes_after", "copy_s", "offline_s")
    return {k: record.get(k) for k in keys}

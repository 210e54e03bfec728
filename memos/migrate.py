"""``memosctl migrate --to postgresql://...``: an LMDB store, its whole history, into PostgreSQL.

Offline: the data folder's lock is taken first, so no memosd serves the store
meanwhile (and none can start). The LMDB store is opened as memosd would open it
(upgraded to this schema first), then every sub-database is copied, in one
PostgreSQL transaction, into a database whose memos tables hold nothing yet.
Before that transaction commits, each sub-database's rows are read back and must
hash the same as the source's: a copy that differs is rolled back whole. Then the
audit chain must verify on both sides.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from .access import LOCAL_ADMIN
from .api import Memos
from .backends import is_postgresql
from .errors import ConfigError, Conflict, IntegrityError, InvalidRequest

_TARGET_OWN = {b"schema_version", b"writer"}  # rows a new PostgreSQL store writes for itself


def migrate(data_dir: str | os.PathLike[str], url: str) -> dict[str, Any]:
    if not is_postgresql(url):
        raise InvalidRequest(f"migrate --to takes a postgresql:// URL, not {url!r}", field="to")
    began = time.monotonic()
    lock = _take_lock(Path(data_dir))
    try:
        with Memos(data_dir) as source, Memos(data_dir, storage=url) as target:
            copied = _copy(source, target)
            audits = [_audit(m) for m in (source, target)]
    finally:
        os.close(lock)
    if audits[0]["ok"] and not audits[1]["ok"]:
        raise IntegrityError(f"the audit chain does not verify in {target.store.path}", audit=audits[1])
    return {"from": str(data_dir), "to": target.store.path, "rows": sum(copied.values()), "databases": copied,
            "audit": audits[1], "source_audit_ok": audits[0]["ok"], "seconds": round(time.monotonic() - began, 3)}


def _take_lock(data_dir: Path) -> int:
    if not (data_dir / "data.mdb").is_file():
        raise ConfigError(f"no LMDB store in {data_dir}")
    fd = os.open(data_dir / "memosd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"memosd is running on {data_dir}: stop it before migrating its store") from None
    return fd


def _copy(source: Memos, target: Memos) -> dict[str, int]:
    src, dst = source.store, target.store
    with dst.read() as txn:
        held = [name for name, db in dst.db.items()
                if any(k not in _TARGET_OWN for k in txn.cursor(db=db).iternext(values=False))]
    if held:
        raise Conflict(f"{dst.path} already holds a memos store (in {held}); migrate into an empty database",
                       databases=held)
    counts: dict[str, int] = {}

    def load(txn: Any) -> None:
        with src.read() as snapshot:
            expected = _digests(src, snapshot)
            for name, db in dst.db.items():
                rows = snapshot.cursor(db=src.db[name]).iternext()
                if name == "meta":  # the target's own rows are there already: overwritten, not appended
                    counts[name] = 0
                    for key, value in rows:
                        txn.put(key, value, db=db)
                        counts[name] += 1
                else:
                    counts[name] = txn.load(db, rows)
        got = _digests(dst, txn)  # read back before the commit: a copy that differs never lands
        differ = [name for name, digest in expected.items() if got[name] != digest]
        if differ:
            raise IntegrityError(f"the copy differs from the source in {differ}; nothing was copied",
                                 databases=differ)

    dst.write(load)
    return counts


def _digests(store: Any, txn: Any) -> dict[str, str]:
    """A hash of each sub-database's rows in key order (the target's own lock row left out)."""
    digests: dict[str, str] = {}
    for name, db in store.db.items():
        h = hashlib.sha256()
        for key, value in txn.cursor(db=db):
            if name == "meta" and key == b"writer":
                continue
            h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(8, "big") + value)
        digests[name] = h.hexdigest()
    return digests


def _audit(m: Memos) -> dict[str, Any]:
    report = m.audit_verify(LOCAL_ADMIN)
    return {"ok": report.ok, "records": report.records, "head": report.head.head}

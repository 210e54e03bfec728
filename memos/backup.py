"""Whole-store backups while memosd serves, and restoring one into a fresh data folder.

``store_backup`` writes LMDB's compacting copy of the environment: it reads one
snapshot (a read transaction), so writers go on and the copy is the store as of
one commit, every cube, version, blob and audit record. Beside it goes
``manifest.json``: the schema, the audit head of that snapshot, the copy's
size and sha256. ``restore`` (offline, ``memosctl restore``) checks the
manifest, copies the file into a data folder that holds no store, and verifies
the audit chain against the manifest's head before it says the restore is good.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import catalog, clock
from .access import Actor
from .core import Core
from .durable import fsync_path
from .errors import Conflict, IntegrityError, InvalidRequest, StorageError
from .models import Checkpoint
from .storage import SCHEMA_VERSION

MANIFEST, DATA = "manifest.json", "data.mdb"
FORMAT = "memos-backup"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


class Backups:
    operations = catalog.BACKUP_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core

    def store_backup(self, actor: Actor, path: str) -> dict[str, Any]:
        """A consistent copy of the whole store in the new folder ``path`` (local administrator)."""
        self.core.admin_only(actor, "store_backup")
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise self.core.refused(actor, "store_backup", None,
                                    InvalidRequest("path must be an absolute path", field="path"))
        if self.core.store.backend != "lmdb":
            raise self.core.refused(actor, "store_backup", None, InvalidRequest(
                "a PostgreSQL store is backed up by PostgreSQL: pg_dump, or base backups with WAL "
                "archiving (docs/storage.md)"))
        folder = Path(path)
        if folder.exists() and any(folder.iterdir()):
            raise self.core.refused(actor, "store_backup", None, Conflict(f"{folder} is not empty", path=path))
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = self.core.store
        with store.read() as txn:  # the audit head of the snapshot the copy will be (no commit in between
            head = self.core.audit.head(txn)  # matters: the copy's own head is checked on restore)
        try:
            store.env.copy(str(folder), compact=True)
        except Exception as exc:
            raise self.core.refused(actor, "store_backup", None, StorageError(f"backup failed: {exc}")) from None
        data = folder / DATA
        fsync_path(data)
        manifest = {"format": FORMAT, "version": 1, "schema": SCHEMA_VERSION, "time": clock.now(),
                    "audit_at_least": head.model_dump(), "bytes": data.stat().st_size, "sha256": _sha256(data)}
        tmp = folder / f".{MANIFEST}"
        tmp.write_text(json.dumps(manifest, indent=2))
        fsync_path(tmp)
        os.replace(tmp, folder / MANIFEST)
        fsync_path(folder)
        return {"path": str(folder), **manifest}


def restore(backup: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy a backup into ``data_dir`` (which must hold no store) and check it; the report."""
    from .api import Memos  # the whole core: only the command that restores needs it

    source, target = Path(backup), Path(data_dir)
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{source} is not a memos backup: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise InvalidRequest(f"{source} is not a memos backup")
    if _sha256(source / DATA) != manifest["sha256"]:
        raise IntegrityError(f"{source / DATA} does not match its manifest: the backup was altered or is incomplete")
    if (target / DATA).exists():
        raise Conflict(f"{target} already holds a store; restore into a new folder", path=str(target))
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target / f".{DATA}.restoring"
    shutil.copyfile(source / DATA, tmp)
    fsync_path(tmp)
    os.replace(tmp, target / DATA)
    fsync_path(target)
    with Memos(target) as m:
        from .access import LOCAL_ADMIN

        report = m.audit_verify(LOCAL_ADMIN, Checkpoint.model_validate(manifest["audit_at_least"]))
        cubes = [{"name": c.name, "version": c.version} for c in m.list_cubes(LOCAL_ADMIN)]
    if not report.ok:
        raise IntegrityError(f"the restored store's audit chain does not verify: {report.reason}")
    return {"data_dir": str(target), "cubes": cubes, "audit": report.model_dump(), "schema": manifest["schema"]}

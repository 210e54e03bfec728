"""The export of signed audit checkpoints: every ``[audit] checkpoint_every_s`` while memosd runs, and at shutdown.

The key and the file come from the settings (:class:`memos.config.AuditSettings`);
a key that is missing is made, one that is unsafe (open to others, inside the
data folder) stops memosd from starting. Each export signs the audit head only
if it moved, and only if the log still continues the last signed checkpoint
(:meth:`memos.auditing.AuditAdmin.export`); a refusal is logged as an error
at every tick, since it means the store was tampered with.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from memos.api import Memos
from memos.checkpoints import CheckpointLog
from memos.config import Settings
from memos.errors import MemosError

log = logging.getLogger("memosd.audit")


class CheckpointExport:
    def __init__(self, memos: Memos, every_s: float) -> None:
        self.admin = memos.audit_admin
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memosd-checkpoints", daemon=True)

    @classmethod
    def start(cls, settings: Settings, data_dir: Path, memos: Memos) -> CheckpointExport:
        """Load (or make) the signing key, give it to the audit log and start the schedule."""
        audit = settings.audit
        memos.audit_admin.checkpoints = CheckpointLog.open(audit.key_path(), audit.checkpoint_path(), data_dir)
        export = cls(memos, audit.checkpoint_every_s)
        export._thread.start()
        return export

    def stop(self) -> None:
        """End the schedule and sign the final head (call once no more writes can come)."""
        self._stop.set()
        self._thread.join()
        self._export()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._export()

    def _export(self) -> None:
        try:
            made = self.admin.export()
        except MemosError as exc:
            log.error("audit checkpoint not signed: %s", exc.message, extra={"code": exc.code})
        except OSError as exc:  # the checkpoint file's disk
            log.error("audit checkpoint not written: %s", exc, extra={"code": "storage_error"})
        else:
            if made is not None:
                log.debug("audit checkpoint signed", extra={"seq": made.seq, "head": made.head})

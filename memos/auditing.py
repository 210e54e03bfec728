"""Administration of the audit log: verify the chain, read its tail, export its head, sign it, archive its start.

Signing needs a :class:`~memos.checkpoints.CheckpointLog` (key and file): the
daemon gives one from its ``[audit]`` settings, an embedded user passes one
to :class:`~memos.api.Memos`. Without it, ``audit_sign`` and ``audit_archive``
are refused.
"""

from __future__ import annotations

from typing import Any

from . import audit_archive, catalog, codec
from . import checkpoints as signing
from . import validation as check
from .access import Actor
from .checkpoints import CheckpointLog
from .core import Core
from .errors import ConfigError, Conflict, IntegrityError, InvalidRequest, MemosError
from .models import (
    ArchiveReport,
    AuditRecord,
    Boundary,
    Checkpoint,
    SignedCheckpoint,
    VerifyReport,
)
from .writes import Applied, Write


class AuditAdmin:
    operations = catalog.AUDIT_OPERATIONS

    def __init__(self, core: Core, checkpoints: CheckpointLog | None = None) -> None:
        self.core = core
        self.checkpoints = checkpoints

    def audit_verify(self, actor: Actor, checkpoint: Checkpoint | dict[str, Any] | None = None,
                     signed: list[Any] | None = None, public_key: str | None = None,
                     archives: list[str] | None = None) -> VerifyReport:
        self.core.admin_only(actor, "audit_verify")
        try:
            named: list[tuple[str, Checkpoint]] = []
            if checkpoint is not None:
                named.append(("the checkpoint", _checkpoint(checkpoint)))
            vouched = None
            if signed is not None:
                try:
                    good = signing.verified(signed, self._public_key(public_key))
                except IntegrityError as exc:  # a forged line: the file proves nothing
                    return VerifyReport(ok=False, records=0, reason=exc.message)
                named += [(f"the signed checkpoint on line {i}", c.checkpoint()) for i, c in enumerate(good, 1)]
                vouched = [c.boundary for c in good]
            archived = None if archives is None else audit_archive.read(archives)
            with self.core.store.read() as txn:
                try:
                    return self.core.audit.verify(txn, named, archived, vouched)
                except IntegrityError as exc:  # an archive that does not decode
                    return VerifyReport(ok=False, records=0, reason=exc.message)
        except MemosError as exc:
            raise self.core.refused(actor, "audit_verify", None, exc) from None

    def audit_checkpoint(self, actor: Actor) -> Checkpoint:
        self.core.admin_only(actor, "audit_checkpoint")
        with self.core.store.read() as txn:
            return self.core.audit.head(txn)

    def audit_tail(self, actor: Actor, n: int = 20, after: int | None = None) -> list[AuditRecord]:
        self.core.admin_only(actor, "audit_tail")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000:
            raise InvalidRequest("n must be an integer from 1 to 10000", field="n")
        if after is not None:
            check.version(after, "after")  # a negative or non-int seq cannot be encoded as a key
        with self.core.store.read() as txn:
            return self.core.audit.tail(txn, n, after)

    # -- signing ---------------------------------------------------------

    def audit_sign(self, actor: Actor) -> SignedCheckpoint:
        self.core.admin_only(actor, "audit_sign")
        try:
            signed = self.export(force=True)
        except MemosError as exc:
            raise self.core.refused(actor, "audit_sign", None, exc) from None
        assert signed is not None
        return signed

    def export(self, force: bool = False) -> SignedCheckpoint | None:
        """Sign the audit head and append it to the checkpoint file, when it moved since the last one
        (or ``force``); None when it did not.

        Refused (IntegrityError) when the log no longer continues the last signed
        checkpoint: signing it would vouch for whatever rewrote it.
        """
        log = self._log()
        with log.lock:
            last = log.last()
            with self.core.store.read() as txn:
                head, boundary = self.core.audit.head(txn), self.core.audit.boundary(txn)
                if last is not None:
                    if not force and (head.seq, head.head, boundary) == (last.seq, last.head, last.boundary):
                        return None
                    self._continues(txn, last, boundary)
            return log.append(head.seq, head.head, boundary)

    def _continues(self, txn: Any, last: SignedCheckpoint, boundary: Boundary) -> None:
        if boundary.seq > last.boundary.seq or (boundary.seq == last.boundary.seq and boundary != last.boundary):
            raise IntegrityError(f"the store's audit chain begins at record {boundary.seq}, but the last signed "
                                 f"checkpoint saw it begin at record {last.boundary.seq}: records were removed "
                                 "without `audit archive`; not signing", seq=boundary.seq)
        reason = self.core.audit.extends(txn, last.checkpoint())
        if reason is not None:
            raise IntegrityError(f"the audit log no longer continues the last signed checkpoint (record "
                                 f"{last.seq}): {reason}; not signing", seq=last.seq)

    # -- retention -------------------------------------------------------

    def audit_archive(self, actor: Actor, before: int, to: str) -> ArchiveReport:
        """Move records ``1..before-1`` (those still in the store) to the file ``to``.

        Only records a signed checkpoint covers leave, and only while the chain
        verifies against every signed checkpoint: the archive plus the store then
        still verify from genesis, and the store alone from its new boundary.
        """
        self.core.admin_only(actor, "audit_archive")
        audit = self.core.audit
        try:
            log = self._log()
            if isinstance(before, bool) or not isinstance(before, int) or before < 2:
                raise InvalidRequest("before must be an integer of 2 or more", field="before")
            path = audit_archive.new_path(to)
        except MemosError as exc:
            raise self.core.refused(actor, "audit_archive", None, exc) from None
        with log.lock:
            try:
                signed = log.read()
                with self.core.store.read() as txn:
                    start, head = audit.boundary(txn), audit.head(txn)
                    if before <= start.seq:
                        raise InvalidRequest(f"records before {start.seq} are archived already", field="before")
                    cover = min((c.seq for c in signed if c.seq >= before), default=None)
                    if cover is None or before > head.seq:
                        latest = f"record {signed[-1].seq}" if signed else "none"
                        raise InvalidRequest(f"no signed checkpoint covers record {before} (the latest names "
                                             f"{latest}); sign one first: memosctl audit checkpoint --sign",
                                             field="before")
                    report = audit.verify(txn, [(f"the signed checkpoint of record {c.seq}", c.checkpoint())
                                                for c in signed], vouched=[c.boundary for c in signed])
                    if not report.ok:
                        raise IntegrityError(f"the audit chain does not verify against its signed checkpoints, "
                                             f"so nothing is archived: {report.reason}", first_bad=report.first_bad)
                    records = audit.records(txn, start.seq, before)
                boundary = Boundary(seq=before, prev=codec.unpack(records[-1])["hash"])
                sha256 = audit_archive.write(path, {"first": start.seq, "last": before - 1, "prev": start.prev,
                                                    "checkpoint": cover}, records)
                # Signed before the records leave: a checkpoint naming the new boundary is what
                # tells this archive from records deleted by hand. Should the commit below fail,
                # it only names a boundary the store never reached, which verifies just the same.
                log.append(head.seq, head.head, boundary)
            except MemosError as exc:
                raise self.core.refused(actor, "audit_archive", None, exc) from None
            except OSError as exc:
                raise self.core.refused(actor, "audit_archive", None,
                                        InvalidRequest(f"cannot write {path}: {exc.strerror}", field="to")) from None
            result = ArchiveReport(file=str(path), first=start.seq, last=before - 1, sha256=sha256,
                                   checkpoint=cover, boundary=boundary)

            def cut(txn: Any) -> Applied:
                kept = audit.records(txn, before - 1, before)
                if audit.boundary(txn) != start or not kept or codec.unpack(kept[0])["hash"] != boundary.prev:
                    raise Conflict("the audit log changed while it was being archived; nothing was removed")
                audit.cut(txn, before, boundary.prev)
                return Applied(result, detail={"file": str(path), "first": start.seq, "last": before - 1,
                                               "sha256": sha256, "checkpoint": cover, "prev": boundary.prev})

            try:
                return self.core.run(Write(actor, "audit_archive", None, cut))
            except MemosError:
                path.unlink(missing_ok=True)  # the records stayed: an archive of them would only mislead
                raise

    # -- helpers ---------------------------------------------------------

    def _log(self) -> CheckpointLog:
        if self.checkpoints is None:
            raise ConfigError("no audit signing key is configured (the [audit] settings of memosd)")
        return self.checkpoints

    def _public_key(self, pem: str | None) -> Any:
        if pem is not None:
            return signing.load_public_key(pem)
        if self.checkpoints is None:
            raise InvalidRequest("signed checkpoints need public_key: no signing key is configured here",
                                 field="public_key")
        return self.checkpoints.signer.public


def _checkpoint(value: Checkpoint | dict[str, Any]) -> Checkpoint:
    if isinstance(value, Checkpoint):
        return value
    try:
        return Checkpoint.model_validate(value)
    except ValueError:
        raise InvalidRequest("checkpoint needs seq and head", field="checkpoint") from None

"""Administration of the audit log: verify the chain, read its tail, export its head."""

from __future__ import annotations

from typing import Any

from . import catalog
from . import validation as check
from .access import Actor
from .core import Core
from .errors import InvalidRequest
from .models import AuditRecord, Checkpoint, VerifyReport


class AuditAdmin:
    operations = catalog.AUDIT_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core

    def audit_verify(self, actor: Actor, checkpoint: Checkpoint | dict[str, Any] | None = None) -> VerifyReport:
        self.core.admin_only(actor, "audit_verify")
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            try:
                checkpoint = Checkpoint.model_validate(checkpoint)
            except ValueError:
                raise InvalidRequest("checkpoint needs seq and head", field="checkpoint") from None
        with self.core.store.read() as txn:
            return self.core.audit.verify(txn, checkpoint)

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

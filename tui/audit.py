"""The audit log, newest first, filtered by actor, cube, operation and outcome, with the chain's status."""

from __future__ import annotations

import json
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Label

from memos.errors import MemosError

from .format import short, when

FIELDS = ("actor", "cube", "op", "outcome")


def matches(record: Any, words: list[str]) -> bool:
    """``actor=alice op=rollback``: each key=value must match; a bare word matches any of the fields."""
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key in FIELDS:
            if str(getattr(record, key) or "") != value:
                return False
        elif not any(word in str(getattr(record, f) or "") for f in FIELDS):
            return False
    return True


class AuditPane(Vertical):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: list[Any] = []

    def compose(self) -> ComposeResult:
        yield Label("", id="audit-chain")
        yield Input(placeholder="filter: actor=NAME cube=NAME op=NAME outcome=ok|denied|error, or words",
                    id="audit-filter")
        table: DataTable = DataTable(id="audit-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("seq", "when", "outcome", "actor", "op", "cube", "detail")
        yield table

    async def reload(self) -> None:
        client: Any = self.app.client  # type: ignore[attr-defined]
        chain = self.query_one("#audit-chain", Label)
        table = self.query_one(DataTable)
        try:
            records = await client.audit_tail(1000)
            report = await client.audit_verify()
        except MemosError as exc:  # an agent's token: the audit is the administrator's
            chain.update(f"[red]{getattr(exc, 'message', exc)}[/]")
            table.clear()
            return
        chain.update(f"[green]chain verified: {report.records} records, head {report.head.seq}[/]" if report.ok
                     else f"[red]CHAIN BROKEN at record {report.first_bad}: {report.reason}[/]")
        self.records = records
        self.show()

    def show(self) -> None:
        words = self.query_one(Input).value.split()
        table = self.query_one(DataTable)
        table.clear()
        for r in reversed(self.records):
            if matches(r, words):
                table.add_row(r.seq, when(r.time), r.outcome, r.actor, r.op, r.cube or "-",
                              short(json.dumps(r.detail, default=str), 60), key=str(r.seq))

    def on_input_changed(self, event: Input.Changed) -> None:
        self.show()

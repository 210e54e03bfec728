"""The cubes: memory counts by type, version, owner, size; enter selects one."""

from __future__ import annotations

from collections import Counter
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from memos.paging import every_async

from .format import size

TYPES = ("plaintext", "activation", "parameter")


class CubesPane(Vertical):
    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="cubes-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("cube", "version", "owner", *TYPES, "other", "size")  # of active memories
        yield table

    async def reload(self) -> None:
        client: Any = self.app.client  # type: ignore[attr-defined]
        table = self.query_one(DataTable)
        rows = []
        for cube in await every_async(lambda n, after: client.cube_list(limit=n, after=after), lambda c: c.name):
            counts: Counter[str] = Counter()
            total = 0
            for m in await every_async(lambda n, after, name=cube.name: client.list(name, limit=n, after=after),
                                       lambda m: m.id):
                counts[m.type] += 1
                total += len((m.text or "").encode()) + (m.blob.size if m.blob else 0)
            other = sum(n for t, n in counts.items() if t not in TYPES)
            rows.append((cube.name, cube.version, cube.owner, *(counts[t] for t in TYPES), other, size(total)))
        keep = table.cursor_row
        table.clear()
        for row in rows:
            table.add_row(*row, key=row[0])
        if rows:
            table.move_cursor(row=min(keep, len(rows) - 1))

    async def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        await self.app.select_cube(str(event.row_key.value))  # type: ignore[attr-defined]

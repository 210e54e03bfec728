"""A cube's memories: filtered by type, status, tag and text, or found by the daemon's search;
the highlighted one's content, provenance, usage and (activation, parameter) model details."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Select, Static

from memos.paging import every_async

from .format import body, short, size, when

TYPE_CHOICES = [("any type", "all"), ("plaintext", "plaintext"), ("activation", "activation"),
                ("parameter", "parameter")]
STATUS_CHOICES = [("active", "active"), ("archived", "archived"), ("deleted", "deleted"), ("any status", "all")]


class MemoriesPane(Vertical):
    BINDINGS = [Binding("slash", "focus_search", "Search"), Binding("escape", "clear_search", "Clear", show=False)]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memories: dict[str, Any] = {}
        self.details: dict[str, dict[str, Any]] = {}  # activation and parameter info by memory id
        self.query_text: str | None = None  # a search shown instead of the filtered list

    def compose(self) -> ComposeResult:
        with Horizontal(classes="filters"):
            yield Select(TYPE_CHOICES, value="all", allow_blank=False, id="mem-type")
            yield Select(STATUS_CHOICES, value="active", allow_blank=False, id="mem-status")
            yield Input(placeholder="tag", id="mem-tag")
            yield Input(placeholder="text filter", id="mem-text")
        yield Input(placeholder="search the cube (enter); / to come here, esc to clear", id="mem-search")
        table: DataTable = DataTable(id="mem-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "type", "v", "status", "memory", "tags")
        yield table
        yield Static("", id="mem-detail")

    async def reload(self) -> None:
        client: Any = self.app.client  # type: ignore[attr-defined]
        cube = self.app.cube  # type: ignore[attr-defined]
        table = self.query_one(DataTable)
        if cube is None:
            table.clear()
            self.query_one("#mem-detail", Static).update("Select a cube (tab 1, enter).")
            return
        kind = self.query_one("#mem-type", Select).value
        status = self.query_one("#mem-status", Select).value
        tag = self.query_one("#mem-tag", Input).value.strip() or None
        text = self.query_one("#mem-text", Input).value.strip().lower()
        if self.query_text:
            found = [h.memory for h in await client.search(cube, self.query_text, k=50,
                                                           status="all" if status == "deleted" else status)]
        else:
            found = await every_async(lambda n, after: client.list(cube, status=status, tag=tag, usage=True, limit=n,
                                                                   after=after), lambda m: m.id)
        shown = [m for m in found if (kind == "all" or m.type == kind) and text in (m.text or "").lower()
                 and (tag is None or tag in m.tags) and status in ("all", m.status.value)]
        self.details = {}
        if any(m.type == "activation" for m in shown):
            self.details.update({a["memory_id"]: a for a in await client.activations(cube)})
        if any(m.type == "parameter" for m in shown):
            self.details.update({a["memory_id"]: a for a in await client.adapters(cube)})
        self.memories = {m.id: m for m in shown}
        keep = table.cursor_row
        table.clear()
        for m in shown:
            table.add_row(m.id, m.type, m.version, m.status.value, short(body(m), 48), ", ".join(m.tags), key=m.id)
        if shown:
            table.move_cursor(row=min(keep, len(shown) - 1))
        title = f"search {self.query_text!r}" if self.query_text else f"{len(shown)} memories"
        self.border_title = f"{cube}: {title}"
        if not shown:
            self.query_one("#mem-detail", Static).update("(no memories)")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        m = self.memories.get(str(event.row_key.value)) if event.row_key is not None else None
        if m is not None:
            self.query_one("#mem-detail", Static).update(self.describe(m))

    def describe(self, m: Any) -> str:
        p = m.provenance
        # What fits at 80x24 comes first: the body, possibly long, last.
        lines = [f"[b]{m.id}[/b]  {m.type}  v{m.version}  {m.status.value}  created {when(m.created_at)}"]
        info = self.details.get(m.id)
        if info is not None and m.type == "activation":
            lines.append(f"model {info['model_name']}  {info['tokens']} tokens  {info['dtype']}  {size(info['size'])}"
                         f"  {'STALE: ' + ', '.join(info['stale_sources']) if info['stale'] else 'fresh'}")
        elif info is not None and m.type == "parameter":
            lines.append(f"model {info['model_name']}  rank {info['rank']}  {size(info['size'])}  "
                         f"{len(info['facts'])} facts  {'STALE' if info['stale'] else 'fresh'}"
                         f"{'  fused' if info['fused'] else ''}")
        sources = ", ".join(f"{s.memory_id}@v{s.version}" for s in p.sources) or "none"
        lines.append(f"by {p.actor}{' (policy ' + p.policy + ')' if p.policy else ''} at {when(p.time)}; "
                     f"sources: {sources}")
        if m.usage is not None:
            lines.append(f"read {m.usage.reads} times, last {when(m.usage.last_read)}")
        lines.append(short(body(m), 400))
        return "\n".join(lines)

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "mem-search":
            self.query_text = event.value.strip() or None
        await self.app.reload_pane(self)  # type: ignore[attr-defined]
        self.query_one(DataTable).focus()

    async def on_select_changed(self, event: Select.Changed) -> None:
        await self.app.reload_pane(self)  # type: ignore[attr-defined]

    def action_focus_search(self) -> None:
        self.query_one("#mem-search", Input).focus()

    async def action_clear_search(self) -> None:
        """Leave the filters for the table (and drop a search, if one is shown)."""
        self.query_one(DataTable).focus()
        if self.query_text is not None:
            self.query_text = None
            self.query_one("#mem-search", Input).value = ""
            await self.app.reload_pane(self)  # type: ignore[attr-defined]

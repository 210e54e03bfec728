"""A cube's history: commits (mark two with space and press d for their diff, v for the cube as of
one, b to roll back to one behind a confirmation), and the rollback proposals waiting for a decision."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Label

from memos.errors import MemosError
from memos.paging import every_async

from .dialogs import ConfirmRollback, TextScreen, diff_lines
from .format import body, short, when


class ProposalsTable(DataTable):
    """Pending proposals; approving or rejecting needs this table's focus (tab to it), not the commits'."""

    BINDINGS = [Binding("y", "decide(True)", "Approve"), Binding("n", "decide(False)", "Reject")]

    async def action_decide(self, approve: bool) -> None:
        pane = next(a for a in self.ancestors if isinstance(a, HistoryPane))
        await pane.decide(approve)


class HistoryPane(Vertical):
    BINDINGS = [
        Binding("space", "mark", "Mark"), Binding("d", "diff", "Diff"), Binding("v", "as_of", "As of"),
        Binding("b", "rollback", "Roll back"),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marked: list[int] = []

    def compose(self) -> ComposeResult:
        commits: DataTable = DataTable(id="commits", cursor_type="row", zebra_stripes=True)
        commits.add_columns("", "version", "op", "actor", "when", "changes")
        yield commits
        yield Label("Rollback proposals (tab here, then y approve, n reject)", classes="subtitle")
        proposals = ProposalsTable(id="proposals", cursor_type="row", zebra_stripes=True)
        proposals.add_columns("proposal", "cube", "to", "by", "changes", "expires", "state", "reason")
        yield proposals

    @property
    def client(self) -> Any:
        return self.app.client  # type: ignore[attr-defined]

    async def reload(self) -> None:
        cube = self.app.cube  # type: ignore[attr-defined]
        history = await self.client.history(cube, limit=500) if cube is not None else []
        pending = await every_async(lambda n, before: self.client.rollback_proposals(limit=n, before=before),
                                    lambda p: p.id)
        commits = self.query_one("#commits", DataTable)
        keep = commits.cursor_row
        commits.clear()
        for c in history:
            mark = "*" if c.version in self.marked else ""
            commits.add_row(mark, c.version, c.op, c.actor, when(c.time), len(c.changes), key=str(c.version))
        if history:
            commits.move_cursor(row=max(0, min(keep, commits.row_count - 1)))
        proposals = self.query_one("#proposals", DataTable)
        proposals.clear()
        for p in pending:
            state = "STALE" if p.stale else "expired" if p.expired else p.status
            proposals.add_row(p.id, p.cube, f"v{p.to_version}", p.proposer, len(p.plan), when(p.expires_at),
                              state, short(p.reason, 30), key=p.id)

    async def _diff(self, cube: str, v1: int, v2: int) -> list[Any]:
        """The whole diff, a page at a time."""
        return await every_async(lambda n, after: self.client.diff(cube, v1, v2, limit=n, after=after),
                                 lambda e: e.memory_id)

    def _version(self) -> int | None:
        commits = self.query_one("#commits", DataTable)
        if commits.row_count == 0:
            return None
        return int(commits.coordinate_to_cell_key(commits.cursor_coordinate).row_key.value)

    async def action_mark(self) -> None:
        version = self._version()
        if version is None:
            return
        self.marked = [v for v in self.marked if v != version] if version in self.marked else [*self.marked, version][-2:]
        await self.app.reload_pane(self)  # type: ignore[attr-defined]

    async def action_diff(self) -> None:
        cube = self.app.cube  # type: ignore[attr-defined]
        version = self._version()
        if cube is None or version is None:
            return
        v1, v2 = self.marked if len(self.marked) == 2 else (max(version - 1, 0), version)
        try:
            entries = await self._diff(cube, v1, v2)
        except MemosError as exc:  # shown, not raised: a TUI keeps running
            self.app.fail(exc)  # type: ignore[attr-defined]
            return
        self.app.push_screen(TextScreen(f"{cube}: v{min(v1, v2)} -> v{max(v1, v2)}", diff_lines(entries)))

    async def action_as_of(self) -> None:
        cube = self.app.cube  # type: ignore[attr-defined]
        version = self._version()
        if cube is None or version is None:
            return
        try:
            mems = await every_async(lambda n, after: self.client.list(cube, at=version, status="all", limit=n,
                                                                       after=after), lambda m: m.id)
        except MemosError as exc:
            self.app.fail(exc)  # type: ignore[attr-defined]
            return
        lines = [f"{m.id}  {m.type:<10} {m.status.value:<8} {short(body(m), 60)}" for m in mems]
        self.app.push_screen(TextScreen(f"{cube} as of v{version}", lines or ["(empty)"]))

    async def action_rollback(self) -> None:
        cube = self.app.cube  # type: ignore[attr-defined]
        version = self._version()
        if cube is None or version is None:
            return
        try:
            head = (await self.client.cube_get(cube)).version
            lines = diff_lines(await self._diff(cube, head, version)) if version < head else ["(no differences)"]
        except MemosError as exc:
            self.app.fail(exc)  # type: ignore[attr-defined]
            return

        async def chosen(choice: str | None) -> None:
            if choice is None:
                return
            try:
                if choice == "direct":
                    commit = await self.client.rollback(cube, version)
                    self.app.notify(f"{cube} rolled back to v{version} as v{commit.version}")
                else:
                    proposal = await self.client.rollback_propose(cube, version, reason="proposed from memos-tui")
                    self.app.notify(f"proposal {proposal.id} made: another admin of {cube} approves it")
            except MemosError as exc:
                self.app.fail(exc)  # type: ignore[attr-defined]
            await self.app.reload_all()  # type: ignore[attr-defined]

        self.app.push_screen(ConfirmRollback(cube, version, lines), chosen)

    def _proposal(self) -> str | None:
        table = self.query_one("#proposals", DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    async def decide(self, approve: bool) -> None:
        proposal = self._proposal()
        if proposal is None:
            return
        try:
            if approve:
                commit = await self.client.rollback_approve(proposal)
                self.app.notify(f"proposal {proposal} applied as v{commit.version} of {commit.cube}")
            else:
                await self.client.rollback_reject(proposal, "rejected from memos-tui")
                self.app.notify(f"proposal {proposal} rejected")
        except MemosError as exc:
            self.app.fail(exc)  # type: ignore[attr-defined]
        await self.app.reload_all()  # type: ignore[attr-defined]

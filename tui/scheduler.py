"""The scheduler's policies (schedule, next and last run, what the last run did; ``x`` runs one now,
``t`` as a dry run) and the background jobs with their progress, updated from the daemon's job events."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Label, ProgressBar, Static

from memos.errors import MemosError

from .format import short, when


def run_lines(run: Any) -> str:
    head = (f"[b]{run.policy}[/b] {'dry run' if run.dry_run else run.trigger} at {when(run.started)} "
            f"by {run.requested_by}: {len(run.actions)} action(s)" + (f"  [red]{run.error}[/]" if run.error else ""))
    lines = [head, "looked at: " + ", ".join(f"{k} {v}" for k, v in run.looked_at.items())]
    for a in run.actions[:20]:
        error = f" [red]{a.error['code']}: {a.error['message']}[/]" if a.error else ""
        lines.append(f"  {a.outcome:<7} {a.op} {short(str(a.args), 50)} -- {a.reason}{error}")
    return "\n".join(lines)


class JobRow(Horizontal):
    """One job: what it is, and its progress."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(classes="job", id=f"job-{job['id']}")
        self.job = job

    def compose(self) -> ComposeResult:
        yield Label("", classes="job-label")
        yield ProgressBar(total=100, show_eta=False, classes="job-bar")

    def on_mount(self) -> None:
        self.show(self.job)

    def show(self, job: dict[str, Any]) -> None:
        self.job = job
        labels, bars = self.query(Label), self.query(ProgressBar)
        if not labels or not bars:
            return  # not composed yet: on_mount shows the latest
        stage = job.get("detail", {}).get("stage", "")
        labels.first().update(f"{job['kind']:<12} {job.get('cube') or '-':<12} {job['state']:<9} {stage}")
        # A job that failed or was cancelled keeps the progress it made; one that is done is full.
        total = max(job["total"], 1)
        bars.first().update(total=total, progress=total if job["state"] == "done" else min(job["done"], total))


class SchedulerPane(Vertical):
    BINDINGS = [Binding("x", "run(False)", "Run now"), Binding("t", "run(True)", "Dry run")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policies: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="policies", cursor_type="row", zebra_stripes=True)
        table.add_columns("policy", "schedule", "next run", "last run", "")
        yield table
        yield Static("", id="policy-detail")
        yield Label("Jobs", classes="subtitle")
        yield VerticalScroll(id="jobs")

    async def reload(self) -> None:
        client: Any = self.app.client  # type: ignore[attr-defined]
        table = self.query_one("#policies", DataTable)
        try:
            policies = await client.policy_list()
        except MemosError as exc:  # an agent's token: policies are the administrator's
            policies = []
            self.query_one("#policy-detail", Static).update(f"[red]{getattr(exc, 'message', exc)}[/]")
        self.policies = {p.name: p for p in policies}
        keep = table.cursor_row
        table.clear()
        for p in policies:
            last = p.last_run
            summary = f"{when(last.started)} {len(last.actions)} action(s)" if last else "never"
            table.add_row(p.name, p.schedule, when(p.next_run), summary, "RUNNING" if p.running else "", key=p.name)
        if policies:
            table.move_cursor(row=min(keep, len(policies) - 1))
        for job in await client.jobs():
            self.job(job)

    def job(self, job: dict[str, Any]) -> None:
        """Show a job as the daemon announced (or listed) it."""
        rows = self.query(f"#job-{job['id']}")
        if rows:
            rows.first(JobRow).show(job)
        else:
            self.query_one("#jobs", VerticalScroll).mount(JobRow(job), before=0)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        p = self.policies.get(str(event.row_key.value)) if event.row_key is not None else None
        if p is not None:
            self.query_one("#policy-detail", Static).update(
                f"{p.description}\n" + (run_lines(p.last_run) if p.last_run else "never ran"))

    async def action_run(self, dry_run: bool) -> None:
        table = self.query_one("#policies", DataTable)
        if table.row_count == 0:
            return
        name = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        client: Any = self.app.client  # type: ignore[attr-defined]
        try:
            run = await client.policy_run(name, dry_run=dry_run)
        except MemosError as exc:
            self.app.fail(exc)  # type: ignore[attr-defined]
            return
        self.query_one("#policy-detail", Static).update(run_lines(run))
        self.app.notify(f"{name}: {'dry run, ' if dry_run else ''}{len(run.actions)} action(s)")
        if not dry_run:
            await self.app.reload_all()  # type: ignore[attr-defined]

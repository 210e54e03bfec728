"""memos-tui: inspect and govern cubes. It talks to memosd only through the client library, as an agent
would, and follows the daemon's events, so what it shows changes as the daemon's state does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Static, TabbedContent, TabPane

from memos.client import AsyncClient, default_socket
from memos.errors import Denied, MemosError, Unavailable

from .audit import AuditPane
from .cubes import CubesPane
from .history import HistoryPane
from .memories import MemoriesPane
from .scheduler import SchedulerPane

CSS = """
TabbedContent { height: 1fr; }
#status { height: 1; background: $panel; padding: 0 1; }
#status.down { background: $error; color: $text; }
.filters { height: 3; }
.filters Select { width: 20; }
.filters Input { width: 1fr; }
DataTable { height: 1fr; }
#mem-detail { height: 6; border-top: solid $primary; padding: 0 1; }
#proposals { height: 6; }
.subtitle { height: 1; text-style: bold; padding: 0 1; }
#policies { height: 8; }
#policy-detail { height: 6; border-top: solid $primary; padding: 0 1; }
#jobs { height: 1fr; }
.job { height: 1; }
.job-label { width: 1fr; }
.job-bar { width: 34; }
#audit-chain { height: 1; padding: 0 1; }
ModalScreen { align: center middle; }
.dialog { width: 90%; height: 85%; border: thick $accent; background: $surface; padding: 0 1; }
.dialog-title { height: auto; text-style: bold; }
.dialog RichLog { height: 1fr; }
.buttons { height: 3; }
"""

PANES = {"cubes": CubesPane, "memories": MemoriesPane, "history": HistoryPane, "audit": AuditPane,
         "scheduler": SchedulerPane}
TITLES = {"cubes": "1 Cubes", "memories": "2 Memories", "history": "3 History", "audit": "4 Audit",
          "scheduler": "5 Scheduler"}


class MemosApp(App[None]):
    TITLE = "memos"
    CSS = CSS
    BINDINGS = [
        *(Binding(title[0], f"tab('{name}')", title[2:]) for name, title in TITLES.items()),
        Binding("r", "reload", "Reload"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, socket: str | Path | None = None, token: str | None = None, *,
                 timeout: float = 5.0, retry_s: float = 2.0) -> None:
        super().__init__()
        self.socket_path = Path(socket) if socket is not None else default_socket()
        self.client = AsyncClient(self.socket_path, token=token, timeout=timeout, retries=0)
        self.retry_s = retry_s
        self.cube: str | None = None
        self.connected = False
        self.identity = ""
        self._due: set[str] = set()  # panes to reload once the current burst of events has passed
        self._locks: dict[str, asyncio.Lock] = {}
        self._stale: set[str] = set()  # tabs changed while hidden: reloaded when shown
        self._pid: int | None = None  # the daemon's, to notice a restart

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="cubes", id="tabs"):
            for name, pane in PANES.items():
                with TabPane(TITLES[name], id=name):
                    yield pane(id=f"{name}-pane")
        yield Static("connecting…", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.watch_connection()
        self.query_one("#cubes-table").focus()

    async def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """Keys go to the tab just opened: its first table. A tab that changed while hidden reloads."""
        name = str(event.pane.id)
        tables = self.pane(name).query("DataTable")
        if tables:
            tables.first().focus()
        if name in self._stale:
            self._stale.discard(name)
            self.run_worker(self.reload_pane(self.pane(name)), group=f"reload-{name}")

    def pane(self, name: str) -> Any:
        return self.query_one(f"#{name}-pane")

    # -- the connection --------------------------------------------------

    @work(exclusive=True, group="connection")
    async def watch_connection(self) -> None:
        """Check the daemon every ``retry_s``; on (re)connection, reload everything and follow events."""
        while True:
            problem = None
            if not self.socket_path.exists():
                problem = f"memosd is not running at {self.socket_path}: start it with `memosd`"
            else:
                try:
                    pid = (await self.client.ping())["pid"]
                    who = await self.client.whoami()
                    self.identity = f"{who['agent']}{' (administrator)' if who['admin'] else ''}"
                except Denied as exc:
                    problem = f"the token was refused: {exc.message}"
                except Unavailable as exc:  # a stale socket: the client library says what to do
                    problem = exc.message
                except MemosError as exc:
                    problem = f"memosd at {self.socket_path} does not answer ({exc.code}); retrying"
                else:
                    if pid != self._pid:  # a daemon restarted between two checks is a new one too
                        self.connected, self._pid = False, pid
            if problem is None and not self.connected:
                self.connected = True
                self.show_status()
                self.follow_events()
                await self.reload_all()
            elif problem is not None:
                self.connected = False
                self.show_status(problem)
            await asyncio.sleep(self.retry_s)

    def show_status(self, problem: str | None = None) -> None:
        status = self.query_one("#status", Static)
        status.set_class(problem is not None, "down")
        if problem is not None:
            status.update(f"○ {problem}")
        else:
            cube = f"  cube {self.cube}" if self.cube else ""
            status.update(f"● connected to {self.socket_path} as {self.identity}{cube}  (live)")

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        try:
            async for event in self.client.events():
                self._note(event)
        except MemosError:  # the daemon went away, or refused the watch
            pass
        self.connected = False  # the stream is over: the connection check follows events again

    def _note(self, event: Any) -> None:
        if event.op == "job" and event.job is not None:
            self.pane("scheduler").job(event.job)
            return
        due = {"cubes", "audit"} | ({"memories", "history"} if event.cube == self.cube else set())
        if event.op.startswith("rollback_"):
            due.add("history")
        if event.actor.startswith("policy:"):
            due.add("scheduler")
        if not self._due:
            self.set_timer(0.2, self._reload_due)
        self._due |= due

    async def _reload_due(self) -> None:
        """Reload the tab on screen; the others when they are next shown (counting every cube's
        memories or verifying the audit chain on each event would not keep up with a busy daemon)."""
        due, self._due = self._due, set()
        shown = self.query_one(TabbedContent).active
        self._stale |= due - {shown}
        if shown in due:
            await self.reload_pane(self.pane(shown))

    # -- reloading and errors -------------------------------------------

    async def reload_pane(self, pane: Any) -> None:
        """Reload one tab; one reload of a tab at a time (events, keys and reconnection all ask)."""
        if not self.connected:
            self.notify("not connected to memosd", severity="warning")
            return
        lock = self._locks.setdefault(pane.id, asyncio.Lock())
        async with lock:
            try:
                await pane.reload()
            except MemosError as exc:
                self.fail(exc)

    async def reload_all(self) -> None:
        for name in PANES:
            await self.reload_pane(self.pane(name))

    def fail(self, exc: Exception) -> None:
        if isinstance(exc, MemosError):
            self.notify(f"{exc.code}: {exc.message}", severity="error", timeout=8)
        else:
            self.notify(f"{type(exc).__name__}: {exc}", severity="error", timeout=8)

    # -- actions ----------------------------------------------------------

    async def select_cube(self, name: str) -> None:
        self.cube = name
        self.pane("history").marked = []  # versions of another cube
        self.show_status()
        self.query_one(TabbedContent).active = "memories"
        for pane in ("memories", "history"):
            await self.reload_pane(self.pane(pane))

    def action_tab(self, name: str) -> None:
        self.query_one(TabbedContent).active = name

    def action_reload(self) -> None:
        self.run_worker(self.reload_all(), group="reload", exclusive=True)  # keys stay live meanwhile

    async def on_unmount(self) -> None:
        await self.client.close()

"""memos-tui driven headless (``App.run_test``) against a real memosd: navigate, filter, diff, roll back
through the confirmation, see the audit record appear, approve a proposal as another agent, watch a
job's progress, and say plainly when the daemon is down or the token refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon_fixtures import Daemon
from memos.tui.app import MemosApp
from memos.tui.dialogs import ConfirmRollback, TextScreen
from test_activation import _env, tiny_models  # noqa: F401 (the fixture)

GOVERNANCE = """
[[rule]]
cubes = ["shared"]
agents = ["planner"]
rollback = "propose"
[[rule]]
rollback = "direct"
"""


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory):
    governance = tmp_path_factory.mktemp("gov") / "governance.toml"
    governance.write_text(GOVERNANCE)
    d = Daemon(env={**_env(tiny_models), "MEMOS_DAEMON__GOVERNANCE": str(governance)}).start()
    try:
        yield d
        d.stop()
    finally:
        d.cleanup()


async def until(pilot, check: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await pilot.pause(0.05)


def rows(app, selector: str) -> list[list[str]]:
    table = app.query_one(selector)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def run(coro) -> None:
    asyncio.run(coro)


def test_navigate_filter_diff_roll_back_and_see_the_audit(daemon):
    admin = daemon.client()
    admin.cube_create("notes")
    tea = admin.add("notes", "Ada drinks green tea", tags=["drinks"])
    admin.add("notes", "Bo cycles to work", tags=["travel"])
    admin.update("notes", tea.id, "Ada drinks coffee now")

    async def scenario() -> None:
        app = MemosApp(daemon.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.connected and any(r[0] == "notes" for r in rows(app, "#cubes-table")),
                        what="the cube list")
            table = app.query_one("#cubes-table")
            table.move_cursor(row=[r[0] for r in rows(app, "#cubes-table")].index("notes"))
            table.focus()
            await pilot.press("enter")
            await until(pilot, lambda: app.cube == "notes" and len(rows(app, "#mem-table")) == 2, what="memories")
            assert app.query_one("TabbedContent").active == "memories"

            app.query_one("#mem-tag").focus()
            await pilot.press(*"drinks", "enter")
            await until(pilot, lambda: len(rows(app, "#mem-table")) == 1, what="the tag filter")
            assert "coffee" in rows(app, "#mem-table")[0][4]
            detail = str(app.query_one("#mem-detail").render())
            assert "by admin" in detail and "read" in detail
            # Live: what another client writes shows up from the daemon's events (nothing polls).
            admin.add("notes", "Ada drinks it with oat milk", tags=["drinks"])
            await until(pilot, lambda: len(rows(app, "#mem-table")) == 2, what="the new memory, live")

            await pilot.press("escape")
            app.set_focus(None)
            await pilot.press("3")
            await until(pilot, lambda: len(rows(app, "#commits")) == 5, what="the commits")
            commits = app.query_one("#commits")
            commits.focus()
            commits.move_cursor(row=1)  # v3, the update
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, TextScreen), what="the diff")
            assert any("coffee" in str(line) for line in app.screen.lines)
            await pilot.press("escape")

            commits.move_cursor(row=2)  # v2: before the update
            await pilot.press("b")
            await until(pilot, lambda: isinstance(app.screen, ConfirmRollback), what="the confirmation")
            assert any("green tea" in line for line in app.screen.lines)  # the diff, shown before anything
            await pilot.click("#cancel")  # the mouse works too: cancelled, nothing happens
            await until(pilot, lambda: not isinstance(app.screen, ConfirmRollback), what="the cancel")
            assert admin.cube_get("notes").version == 4
            await pilot.press("b")
            await until(pilot, lambda: isinstance(app.screen, ConfirmRollback), what="the confirmation again")
            await pilot.press("y")
            await until(pilot, lambda: admin.cube_get("notes").version == 5, what="the rollback")
            assert admin.get("notes", tea.id).text == "Ada drinks green tea"

            app.set_focus(None)
            await pilot.press("4")
            await until(pilot, lambda: rows(app, "#audit-table") and rows(app, "#audit-table")[0][4] == "rollback",
                        what="the audit record")
            assert rows(app, "#audit-table")[0][3] == "admin"
            assert "chain verified" in str(app.query_one("#audit-chain").render())
            app.query_one("#audit-filter").focus()
            await pilot.press(*"op=update")
            await until(pilot, lambda: {r[4] for r in rows(app, "#audit-table")} == {"update"}, what="the filter")

    run(scenario())


def test_a_proposal_is_approved_by_another_agent_in_the_tui(daemon):
    admin = daemon.client()
    planner = daemon.client(token=admin.agent_add("planner")["token"])
    reviewer_token = admin.agent_add("reviewer")["token"]
    planner.cube_create("shared")
    admin.cube_grant("shared", "reviewer", "admin")
    mem = planner.add("shared", "The gate code is 4711")
    planner.update("shared", mem.id, "The gate code is 0000")
    proposal = planner.rollback_propose("shared", 1, reason="wrong code")

    async def scenario() -> None:
        app = MemosApp(daemon.socket, token=reviewer_token)
        async with app.run_test(size=(160, 48)) as pilot:
            await until(pilot, lambda: app.connected and app.identity == "reviewer", what="connection")
            await app.select_cube("shared")
            app.set_focus(None)
            await pilot.press("3")
            await until(pilot, lambda: any(r[0] == proposal.id for r in rows(app, "#proposals")), what="proposal")
            table = app.query_one("#proposals")
            table.focus()
            table.move_cursor(row=[r[0] for r in rows(app, "#proposals")].index(proposal.id))
            await pilot.press("y")
            await until(pilot, lambda: planner.get("shared", mem.id).text == "The gate code is 4711", what="applied")
            await until(pilot, lambda: not any(r[0] == proposal.id for r in rows(app, "#proposals")),
                        what="the proposal leaving the pending list")
            # The audit is the administrator's: an agent's TUI says so instead of failing.
            assert "administrator" in str(app.query_one("#audit-chain").render())
        assert admin.history("shared", limit=1)[0].info["proposal"] == proposal.id

    run(scenario())


def test_a_jobs_progress_is_shown_live(daemon):
    admin = daemon.client()
    admin.cube_create("facts")
    admin.add_many("facts", [f"Q: What is fact {i}?\nA: It is number {i}." for i in range(6)])

    async def scenario() -> None:
        app = MemosApp(daemon.socket)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.connected, what="connection")
            await pilot.press("5")
            job = admin.distill("facts", recipe={"steps": 400, "learning_rate": 0.001, "batch_size": 2,
                                                 "kl_weight": 0.0, "stop_loss": 0.0})
            row = f"#job-{job['id']}"
            await until(pilot, lambda: app.query(row), what="the job's row")
            bar = app.query_one(row).query_one("ProgressBar")
            await until(pilot, lambda: 0 < (bar.progress or 0) < bar.total, timeout=60, what="progress")
            seen = bar.progress
            await until(pilot, lambda: bar.progress > seen, timeout=60, what="more progress")
            admin.job_cancel(job["id"])
            await until(pilot, lambda: "cancelled" in str(app.query_one(row).query_one("Label").render()),
                        timeout=60, what="the cancellation")

    run(scenario())


def test_a_daemon_that_is_not_running_or_a_refused_token_is_said_plainly(daemon, tmp_path):
    async def scenario(app: MemosApp, expected: str) -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: expected in str(app.query_one("#status").render()), what=expected)
            assert not app.connected

    run(scenario(MemosApp(tmp_path / "nowhere.sock", retry_s=0.2), "memosd is not running at"))
    run(scenario(MemosApp(daemon.socket, token="not-a-token", retry_s=0.2), "the token was refused"))


def test_the_tui_reconnects_when_the_daemon_restarts(tiny_models):
    d = Daemon().start()
    try:
        d.client().cube_create("before")

        async def scenario() -> None:
            app = MemosApp(d.socket, retry_s=0.2, timeout=1.0)
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: app.connected, what="connection")
                d.stop()
                await until(pilot, lambda: not app.connected, what="noticing the daemon is gone")
                assert "not running" in str(app.query_one("#status").render())
                d.start()
                d.client().cube_create("after")
                await until(pilot, lambda: app.connected and any(r[0] == "after" for r in rows(app, "#cubes-table")),
                            what="reconnection")

        run(scenario())
        d.stop()
    finally:
        d.cleanup()


def test_screens_fit_80x24_and_160x48(daemon, tmp_path):
    """Every tab renders at both sizes (tests/tui_screenshots.py saves them for docs/)."""

    async def scenario(size: tuple[int, int]) -> None:
        app = MemosApp(daemon.socket)
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.connected, what="connection")
            # The status line is on screen, just above the key bindings.
            assert app.screen.get_widget_at(2, size[1] - 2)[0] is app.query_one("#status")
            for key in "12345":
                await pilot.press(key)
                await pilot.pause(0.2)
                assert Path(app.save_screenshot(path=str(tmp_path), filename=f"{size[0]}-{key}.svg")).stat().st_size

    run(scenario((80, 24)))
    run(scenario((160, 48)))

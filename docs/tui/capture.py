"""Try memos-tui as a person would and keep what it showed: ``python docs/tui/capture.py``.

Starts a memosd in a temporary folder and fills it (two cubes, edits, a proposal waiting for
approval, a policy run, an archived memory), then

* runs ``memos-tui`` in a real terminal (tmux) at 80x24 and 160x48, sends it keys (each tab,
  a cube selected, a filter typed, a diff opened) and captures the screen as text:
  ``docs/tui/tmux-<size>-<step>.txt``;
* renders each tab headless at both sizes as SVG: ``docs/tui/<tab>-<size>.svg`` (the README
  shows them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "bench"))

from memosd import spawn  # noqa: E402

from memos.client import Client  # noqa: E402
from memos.tui.app import MemosApp  # noqa: E402

SIZES = ((80, 24), (160, 48))
TABS = {"1": "cubes", "2": "memories", "3": "history", "4": "audit", "5": "scheduler"}
GOVERNANCE = '[[rule]]\ncubes = ["team"]\nagents = ["planner"]\nrollback = "propose"\n[[rule]]\nrollback = "direct"\n'


def fill(socket: str) -> None:
    admin = Client(socket)
    planner = Client(socket, token=admin.agent_add("planner")["token"])
    planner.cube_create("team")
    facts = planner.add_many("team", [
        {"text": "The weekly meeting is on Tuesdays at 10:00 in room Orion.", "tags": ["meetings"]},
        {"text": "Ada's desk is on the third floor, next to the window.", "tags": ["people"]},
        {"text": "Bo is allergic to peanuts.", "tags": ["people", "health"]},
        {"text": "Bo is allergic to peanuts!", "tags": ["health"]},
        {"text": "The spare key to room Orion is in Dara's top drawer.", "tags": ["keys"]},
    ])
    planner.update("team", facts[0].id, "The weekly meeting moved to Wednesdays at 10:00.")
    for _ in range(3):
        planner.search("team", "when is the meeting?")
    planner.rollback_propose("team", 1, [facts[0].id], reason="the move was cancelled")
    admin.cube_create("notes")
    note = admin.add("notes", "Remember to rotate the deploy key on Fridays.", tags=["ops"])
    admin.update("notes", note.id, status="archived")
    admin.policy_run("fuse")
    admin.policy_run("decay", dry_run=True)


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def in_terminal(socket: str, width: int, height: int) -> None:
    session = f"memos-tui-{width}"
    env = f"MEMOS_SOCKET={socket} PATH={Path(sys.executable).parent}:{os.environ['PATH']}"
    tmux("new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), f"env {env} memos-tui")
    steps = [("start", []), ("cube-selected", ["Down", "Enter"]),
             ("searched", ["/", *"peanuts", "Enter"]), ("history", ["Escape", "3"]), ("diff", ["Down", "d"]),
             ("rollback-confirmation", ["Escape", "b"]), ("audit", ["Escape", "4"]), ("scheduler", ["5"])]
    try:
        time.sleep(3)
        for name, keys in steps:
            for key in keys:
                tmux("send-keys", "-t", session, key)
                time.sleep(0.3)
            time.sleep(1.5)
            (OUT / f"tmux-{width}x{height}-{name}.txt").write_text(tmux("capture-pane", "-p", "-t", session))
        tmux("send-keys", "-t", session, "Escape")
        tmux("send-keys", "-t", session, "q")
        time.sleep(1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)


async def screenshots(socket: str, width: int, height: int) -> None:
    app = MemosApp(socket)
    async with app.run_test(size=(width, height)) as pilot:
        while not app.connected:
            await pilot.pause(0.1)
        await pilot.pause(1.0)
        await app.select_cube("team")
        for key, tab in TABS.items():
            app.set_focus(None)
            await pilot.press(key)
            await pilot.pause(0.8)
            app.save_screenshot(path=str(OUT), filename=f"{tab}-{width}x{height}.svg")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="memos-tui-capture-"))
    (root / "governance.toml").write_text(GOVERNANCE)
    socket = str(root / "memosd.sock")
    proc = spawn(root / "data", socket, env={"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_ACTIVATION__MODELS": "{}",
                                             "MEMOS_DAEMON__GOVERNANCE": str(root / "governance.toml")})
    try:
        fill(socket)
        for width, height in SIZES:
            in_terminal(socket, width, height)
            asyncio.run(screenshots(socket, width, height))
            print(f"{width}x{height}: captured")
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

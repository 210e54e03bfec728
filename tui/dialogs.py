"""Modal screens: a diff, a cube as of a version, and the confirmation before a rollback."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, RichLog

from .format import body, short


def diff_lines(entries: list[Any]) -> list[str]:
    """A diff (DiffEntry models) as lines: what each memory was and becomes."""
    out = []
    for e in entries:
        before = short(body(e.before), 70) if e.before else ""
        after = short(body(e.after), 70) if e.after else ""
        if e.change == "added":
            out.append(f"[green]+ {e.memory_id}[/]  {after}")
        elif e.change == "removed":
            out.append(f"[red]- {e.memory_id}[/]  {before}")
        else:
            status = ""
            if e.before.status != e.after.status:
                status = f"  ({e.before.status.value} -> {e.after.status.value})"
            out.append(f"[yellow]~ {e.memory_id}[/]{status}")
            if before != after:
                out += [f"    [red]- {before}[/]", f"    [green]+ {after}[/]"]
    return out or ["(no differences)"]


class TextScreen(ModalScreen[None]):
    """A title and lines, scrollable; escape closes it."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, lines: list[str]) -> None:
        super().__init__()
        self.title_text, self.lines = title, lines

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield RichLog(markup=True, wrap=True, id="text")
            yield Button("Close", id="close")

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        for line in self.lines:
            log.write(line)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()


class ConfirmRollback(ModalScreen[str | None]):
    """The diff a rollback would make, then: roll back now, propose it, or cancel."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel"), Binding("y", "choose('direct')", "Roll back"),
                Binding("p", "choose('propose')", "Propose")]

    def __init__(self, cube: str, version: int, lines: list[str]) -> None:
        super().__init__()
        self.cube, self.version, self.lines = cube, version, lines

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Roll cube {self.cube} back to v{self.version}? These memories change:",
                        classes="dialog-title")
            yield RichLog(markup=True, wrap=True, id="text")
            with Horizontal(classes="buttons"):
                yield Button("Roll back (y)", variant="error", id="direct")
                yield Button("Propose (p)", variant="primary", id="propose")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        for line in self.lines:
            log.write(line)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

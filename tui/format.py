"""How the TUI writes times, sizes and memories in a cell."""

from __future__ import annotations

import time
from typing import Any

from memos.cli_format import short  # noqa: F401  (one way to cut a text to a cell)


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def body(memory: Any) -> str:
    """A memory's text, or what its blob is."""
    if memory.text is not None:
        return memory.text
    return f"<{memory.type} blob, {size(memory.blob.size)}>" if memory.blob else f"<{memory.type}>"

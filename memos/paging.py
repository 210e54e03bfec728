"""Every item of a paged listing (``list``, ``history``, ``diff``, ``rollback_proposals``), a page at a time.

A listing answers at most ``[limits] max_page`` items, and refuses to answer
more without a ``limit`` (docs/protocol.md, Bounds). Clients that want them
all (memosctl, the TUI) ask a page at a time and go on from the last item of
each. The daemon's page size is configurable: a first page refused for its
size names the largest one (``details.limit``), which is then used.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import TooLarge

T = TypeVar("T")

PAGE = 1000  # the daemon's default largest page


def every(fetch: Callable[[int, Any], list[T]], cursor: Callable[[T], Any]) -> list[T]:
    """``fetch(limit, cursor)`` page after page, ``cursor(last item)`` leading to the next."""
    out: list[T] = []
    size, at = PAGE, None
    while True:
        try:
            page = fetch(size, at)
        except TooLarge as exc:
            size = _smaller(exc, size)
            continue
        out += page
        if len(page) < size:
            return out
        at = cursor(page[-1])


async def every_async(fetch: Callable[[int, Any], Awaitable[list[T]]], cursor: Callable[[T], Any]) -> list[T]:
    """:func:`every` for an asynchronous client."""
    out: list[T] = []
    size, at = PAGE, None
    while True:
        try:
            page = await fetch(size, at)
        except TooLarge as exc:
            size = _smaller(exc, size)
            continue
        out += page
        if len(page) < size:
            return out
        at = cursor(page[-1])


def _smaller(exc: TooLarge, size: int) -> int:
    """The daemon's largest page, when ``exc`` refused a page of ``size`` for its size; else ``exc`` again."""
    largest = exc.details.get("limit")
    if exc.details.get("field") != "limit" or not isinstance(largest, int) or not 0 < largest < size:
        raise exc
    return largest

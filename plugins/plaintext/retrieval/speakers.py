"""Speaker codes of an index's rows and the single known speaker a query names (the speaker prior).

A collaborator of :class:`~.index.HybridIndex`: the index numbers the rows and
calls :meth:`Speakers.assign` / :meth:`Speakers.release` as docs come and go;
this object keeps the per-row code array and the first-name lookup that the
prior needs, so the index's search only asks :meth:`Speakers.named`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import IndexCorruptError
from .text import _WORD


def _first_name(speaker: str) -> str | None:
    words = _WORD.findall(speaker.lower())
    return words[0] if words else None


class Speakers:
    """Per-row speaker codes (-1: none) and, per first name, the codes of speakers with live docs."""

    def __init__(self) -> None:
        self.codes = np.full(16, -1, np.int32)  # per row
        self.names: list[str] = []              # code -> speaker
        self._code: dict[str, int] = {}         # speaker -> code
        self._count: list[int] = []             # code -> live rows
        self._first: dict[str, set[int]] = {}   # first-name token -> speaker codes with live docs

    def ensure_capacity(self, cap: int) -> None:
        if cap > len(self.codes):
            new = np.full(cap, -1, np.int32)
            new[: len(self.codes)] = self.codes
            self.codes = new

    # ------------------------------------------------------------------ rows
    def assign(self, row: int, speaker: str | None) -> None:
        """Give ``row`` the code of ``speaker`` (a new code for a new speaker)."""
        self.codes[row] = self._acquire(speaker)

    def release(self, row: int) -> None:
        """The doc in ``row`` no longer counts for its speaker (replaced or removed)."""
        c = int(self.codes[row])
        if c < 0:
            return
        self._count[c] -= 1
        if self._count[c] == 0:
            first = _first_name(self.names[c])
            if first:
                s = self._first.get(first)
                if s is not None:
                    s.discard(c)
                    if not s:
                        del self._first[first]

    def move(self, src: int, dst: int) -> None:
        self.codes[dst] = self.codes[src]

    def _acquire(self, speaker: str | None) -> int:
        if not speaker:
            return -1
        c = self._code.get(speaker)
        if c is None:
            c = self._code[speaker] = len(self.names)
            self.names.append(speaker)
            self._count.append(0)
        if self._count[c] == 0:
            first = _first_name(speaker)
            if first:
                self._first.setdefault(first, set()).add(c)
        self._count[c] += 1
        return c

    # ------------------------------------------------------------------ queries
    def named(self, query: str) -> int:
        """Code of the single known speaker the query names by first name, else -1."""
        hits: set[int] = set()
        for w in set(_WORD.findall(query.lower())):
            hits |= self._first.get(w, set())
        return next(iter(hits)) if len(hits) == 1 else -1

    # ------------------------------------------------------------------ saved form
    def state(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"spk": self.codes[:n]}, {"speakers": self.names}

    def restore(self, n: int, arrays: dict[str, np.ndarray], strings: dict[str, Any]) -> None:
        self.ensure_capacity(max(n, 16))
        self.codes[:n] = arrays["spk"]
        self.names = list(strings["speakers"])
        self._code = {x: i for i, x in enumerate(self.names)}
        self._count = [0] * len(self.names)
        for c in self.codes[:n].tolist():
            if c >= len(self.names):
                raise IndexCorruptError("inconsistent saved index (speakers)")
            if c >= 0:
                self._count[c] += 1
        self._first = {}
        for c, x in enumerate(self.names):
            first = _first_name(x)
            if self._count[c] and first:
                self._first.setdefault(first, set()).add(c)

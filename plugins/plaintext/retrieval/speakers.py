"""Speaker codes of an index and the single known speaker a query names (the speaker prior)."""
from __future__ import annotations

from memos.retrieval.text import _WORD


class _Speakers:
    """HybridIndex methods that keep speaker codes and the first-name lookup."""

    # ------------------------------------------------------------------ speakers
    def _speaker_code(self, speaker: str | None) -> int:
        if not speaker:
            return -1
        c = self._spk_code.get(speaker)
        if c is None:
            c = self._spk_code[speaker] = len(self._speakers)
            self._speakers.append(speaker)
            self._spk_count.append(0)
        if self._spk_count[c] == 0:
            first = _WORD.findall(speaker.lower())
            if first:
                self._first.setdefault(first[0], set()).add(c)
        self._spk_count[c] += 1
        return c

    def _speaker_release(self, c: int) -> None:
        if c < 0:
            return
        self._spk_count[c] -= 1
        if self._spk_count[c] == 0:
            first = _WORD.findall(self._speakers[c].lower())
            if first:
                s = self._first.get(first[0])
                if s is not None:
                    s.discard(c)
                    if not s:
                        del self._first[first[0]]

    def _named_speaker(self, query: str) -> int:
        """Code of the single known speaker the query names by first name, else -1."""
        hits: set[int] = set()
        for w in set(_WORD.findall(query.lower())):
            hits |= self._first.get(w, set())
        return next(iter(hits)) if len(hits) == 1 else -1

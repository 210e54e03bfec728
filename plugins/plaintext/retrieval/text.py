"""Text side of retrieval: tokenizer (stopwords, light stemming), key text, and the Doc an index holds."""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

# Small English stopword list (function words + chat filler). Content words are kept.
_STOP = frozenset("""a an the and or but if of to in on at by for with from about as into through over after
before between is am are was were be been being do does did doing have has had having i me my mine we us our
you your yours he him his she her hers it its they them their theirs this that these those what which who whom
whose when where why how will would can could should shall may might must not no so than too very just also
there here then up down out off s t don didn doesn isn wasn aren weren haven hasn hadn won wouldn couldn
shouldn let lets oh yeah yes hey hi wow really like get got go going gone went any some all each other more
most much many such only own same again ever im ive youre thats dont""".split())

_SUFFIXES = (("ies", "y"), ("sses", "ss"), ("ness", ""), ("ments", "ment"), ("ing", ""), ("edly", ""),
             ("ed", ""), ("ly", ""), ("es", ""), ("s", ""))
_WORD = re.compile(r"[a-z0-9]+")


@functools.lru_cache(maxsize=1 << 16)
def _stem(w: str) -> str:
    """Very light suffix stripping (first matching rule, keep >= 3 chars): paint/painting/painted."""
    for suf, rep in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: len(w) - len(suf)] + rep
    return w


def tokenize(text: str) -> list[str]:
    """Lowercase, drop apostrophes, alphanumeric runs, stopwords removed, light stemming."""
    words = _WORD.findall(text.lower().replace("'", "").replace("\u2019", ""))
    return [_stem(w) for w in words if w not in _STOP]


def key_text(text: str, metadata: Mapping[str, Any]) -> str:
    """'(date) speaker: text [image: caption]' from metadata keys speaker, date, caption (each optional)."""
    s = str(text)
    speaker = metadata.get("speaker")
    if speaker:
        s = f"{speaker}: {s}"
    caption = metadata.get("caption")
    if caption:
        s += f" [image: {caption}]"
    date = metadata.get("date")
    if date:
        s = f"({date}) {s}"
    return s


@dataclass(frozen=True)
class Doc:
    id: str                 # memory id (26-char sortable id; sorts by creation time)
    key: str                # text both retrievers see, built by key_text()
    group: str | None       # neighbours = docs of the same group, ordered by position; None = no neighbours
    position: float         # order within the group
    speaker: str | None


def doc_for(memory_id: str, text: str, metadata: Mapping[str, Any], created_at: float) -> Doc:
    """group = metadata 'session' (or 'thread'/'conversation') if present else None;
    position = metadata 'position' if numeric else created_at; speaker = metadata 'speaker'."""
    group = None
    for name in ("session", "thread", "conversation"):
        v = metadata.get(name)
        if v is not None and v != "":
            group = str(v)
            break
    pos = metadata.get("position")
    if isinstance(pos, (int, float)) and not isinstance(pos, bool) and math.isfinite(pos):
        position = float(pos)
    else:
        position = float(created_at)
    speaker = metadata.get("speaker")
    speaker = str(speaker) if speaker else None
    return Doc(id=memory_id, key=key_text(text, metadata), group=group, position=position, speaker=speaker)

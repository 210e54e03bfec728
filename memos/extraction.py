"""Turning conversations into memories without a language model.

The default, and the one measured on LoCoMo: one memory per message, keeping
who said it, when, in which session and where in it. Search uses these
fields: the speaker and date go into the search key, and messages of one
session lend each other context (see docs/retrieval.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidRequest

_SPEAKER_KEYS = ("speaker", "role", "name", "author")
_TEXT_KEYS = ("text", "content", "message")
_TIME_KEYS = ("date", "time", "timestamp", "created_at")


def _first(message: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if message.get(key) not in (None, ""):
            return message[key]
    return None


def messages_to_memories(
    messages: Iterable[Mapping[str, Any]], *, session: str | None = None, date: str | None = None,
    tags: Iterable[str] = (), start: int = 0,
) -> list[dict[str, Any]]:
    """One ``add_many`` item per message, with speaker, date, session and position metadata.

    A message is a map with its text under ``text``/``content``/``message``, and
    optionally its speaker under ``speaker``/``role``/``name``/``author``, its time under
    ``date``/``time``/``timestamp``, an image description under ``caption`` and an ``id``.
    ``date`` applies to messages without a time of their own (e.g. a session's date).
    """
    items = []
    for position, message in enumerate(messages, start):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"message {position} is not a map")
        text = _first(message, _TEXT_KEYS)
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"message {position} has no text")
        metadata: dict[str, Any] = {"position": position}
        speaker = _first(message, _SPEAKER_KEYS)
        if speaker is not None:
            metadata["speaker"] = str(speaker)
        when = _first(message, _TIME_KEYS) or date
        if when is not None:
            metadata["date"] = when if isinstance(when, (int, float)) else str(when)
        if session is not None:
            metadata["session"] = session
        if message.get("caption"):
            metadata["caption"] = str(message["caption"])
        if message.get("id") is not None:
            metadata["message_id"] = str(message["id"])
        items.append({"text": text, "metadata": metadata, "tags": list(tags)})
    return items

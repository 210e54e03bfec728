"""Input checks shared by the in-process API and the wire protocol.

Every check raises :class:`InvalidRequest` (or :class:`TooLarge`) naming the
field, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from . import codec
from .errors import InvalidRequest, TooLarge
from .ids import is_id
from .models import NAME_PATTERN, TAG_PATTERN, Role, Status


class Limits(BaseModel):
    """Size limits; requests over them are refused, never truncated."""

    max_text_bytes: int = Field(64 * 1024, description="UTF-8 bytes of one memory's text.")
    max_tags: int = Field(64, description="Tags on one memory.")
    max_metadata_bytes: int = Field(64 * 1024, description="Encoded size of one memory's metadata.")
    max_blob_bytes: int = Field(4 << 30, description="One KV cache or adapter blob.")
    max_batch: int = Field(10_000, description="Memories in one add_many request.")
    max_sources: int = Field(1_000, description="Source memories named by one memory.")
    max_page: int = Field(1_000, ge=1, description="Items one listing returns (list, history, diff, "
                          "rollback_proposals); page past it with after/before.")
    max_past_search_memories: int = Field(50_000, ge=0, description="Searchable memories a cube may hold "
                                          "at a past version for search at= to index it.")
    past_search_builds: int = Field(2, ge=1, description="Indexes of past versions built at once; "
                                    "more such searches get unavailable.")
    refusal_records_per_s: int = Field(100, ge=1, description="Refusals of one agent audited one by one "
                                       "each second; past that they are counted, one record per op and code.")


def name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, not {type(value).__name__}", field=what)
    size = len(value.encode(errors="surrogatepass"))  # a lone surrogate is invalid, not a crash
    if size > 64 or not NAME_PATTERN.match(value):
        if size > 64:
            raise TooLarge(f"{what} is longer than 64 bytes", field=what, size=size)
        raise InvalidRequest(
            f"{what} {value[:80]!r} is invalid: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit", field=what,
        )
    return value


def memory_id(value: Any) -> str:
    if not is_id(value):
        raise InvalidRequest(f"memory id {str(value)[:80]!r} is not a valid id", field="id")
    return value


def version(value: Any, what: str = "version") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 63:
        raise InvalidRequest(f"{what} must be a non-negative integer", field=what)
    return value


def text(value: Any, limits: Limits) -> str | None:
    """A memory's text (optional here: its type says whether it needs one)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"text must be a string, not {type(value).__name__}", field="text")
    try:
        size = len(value.encode())
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"text is not valid unicode: {exc.reason}", field="text") from None
    if size > limits.max_text_bytes:
        raise TooLarge(
            f"text of {size} bytes exceeds the limit of {limits.max_text_bytes}",
            field="text", size=size, limit=limits.max_text_bytes,
        )
    return value


def tags(value: Any, limits: Limits) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidRequest("tags must be a list of strings", field="tags")
    out: dict[str, None] = {}  # ordered and deduplicated in one pass
    for tag in value:
        if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
            raise InvalidRequest(
                f"tag {str(tag)[:80]!r} is invalid: 1-64 characters, no control characters", field="tags"
            )
        out[tag] = None
        if len(out) > limits.max_tags:  # refused at once: a huge list costs no more than the limit
            raise TooLarge(f"more than {limits.max_tags} tags exceed the limit of {limits.max_tags}",
                           field="tags", limit=limits.max_tags)
    return list(out)


def page(limit: Any, limits: Limits, field: str = "limit", least: int = 0) -> int | None:
    """A listing's ``limit``: at most ``max_page``; None (not given) stays None, for :func:`bounded`."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < least:
        raise InvalidRequest(f"{field} must be an integer of at least {least}", field=field)
    if limit > limits.max_page:
        raise TooLarge(f"{field} {limit} exceeds the largest page, {limits.max_page}: "
                       f"ask for at most {limits.max_page} and page on", field=field, limit=limits.max_page)
    return limit


def room(limit: int | None, limits: Limits) -> int:
    """How many items a listing may gather: its limit, or one past the largest page when none was given
    (so that :func:`bounded` can tell a listing that does not fit)."""
    return limits.max_page + 1 if limit is None else limit


def bounded(items: list[Any], limit: int | None, limits: Limits, what: str, cursor: str) -> list[Any]:
    """``items`` gathered up to :func:`room`; refused when no limit was given and they did not fit in a page."""
    if limit is None and len(items) > limits.max_page:
        raise TooLarge(f"more than {limits.max_page} {what}: pass limit (at most {limits.max_page}) and "
                       f"page with {cursor}", field="limit", limit=limits.max_page)
    return items


def ids(value: Any, limits: Limits, field: str = "ids") -> list[Any]:
    """A list of memory ids named by one request: at most ``max_batch`` (each id is checked where used)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidRequest(f"{field} must be a list of ids", field=field)
    out: list[Any] = []
    for item in value:
        out.append(item)
        if len(out) > limits.max_batch:
            raise TooLarge(f"more than {limits.max_batch} ids in {field} exceed the batch limit of "
                           f"{limits.max_batch}", field=field, limit=limits.max_batch)
    return out


def metadata(value: Any, limits: Limits) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidRequest("metadata must be a map with string keys", field="metadata")
    _check_plain(value)
    size = len(codec.pack(value))
    if size > limits.max_metadata_bytes:
        raise TooLarge(
            f"metadata of {size} bytes exceeds the limit of {limits.max_metadata_bytes}",
            field="metadata", size=size,
        )
    return value


def _check_plain(value: Any, depth: int = 0) -> None:
    if depth > 16:
        raise InvalidRequest("metadata is nested too deeply", field="metadata")
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
            raise InvalidRequest("metadata integer out of range", field="metadata")
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidRequest("metadata keys must be strings", field="metadata")
            _check_plain(v, depth + 1)
        return
    raise InvalidRequest(f"metadata values must be plain data, not {type(value).__name__}", field="metadata")


def status(value: Any) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise InvalidRequest(f"status must be one of {[s.value for s in Status]}", field="status") from None


def role(value: Any) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidRequest(f"role must be one of {[r.value for r in Role]}", field="role") from None


def blob(value: Any, limits: Limits) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidRequest("blob must be bytes", field="blob")
    if len(value) > limits.max_blob_bytes:
        raise TooLarge(f"blob of {len(value)} bytes exceeds the limit of {limits.max_blob_bytes}", field="blob")
    return bytes(value)

"""The memos wire protocol, written down in one place.

Transport: ZeroMQ. The daemon binds a ROUTER on ``ipc://<runtime_dir>/memosd.sock``;
a client connects a DEALER and sends **one frame per request**. The daemon
answers with one frame on the same connection. Replies may arrive out of order:
match them by ``id``. Change events come as partial replies to a ``watch``
request, which stays open (see below).

Every frame is one msgpack map (no ext types; binary fields are msgpack bin).

Request::

    {"v": 1,                 # protocol version (PROTOCOL_VERSION)
     "id": "01J...",         # request id, 1-64 chars; a write resent with the same
                             #   id by the same agent is applied once and answered
                             #   with the first reply (idempotent retry)
     "op": "add",            # operation: one declared in memos.catalog or by a memory type
     "args": {...},          # the operation's arguments, validated by its Operation.args
     "token": "name.secret"} # agent token from `memosctl agent add`; omitted by the
                             #   daemon's own user acting as local administrator
                             #   (unless the daemon requires tokens from everyone)

Reply::

    {"v": 1, "id": "01J...", "ok": true,  "result": ...}
    {"v": 1, "id": "01J...", "ok": false, "error": {"code": "not_found",
                                                     "message": "...", "details": {...}}}

A streaming operation (``Operation.streams``, e.g. generated tokens) first
sends any number of partial replies, then its one reply as above::

    {"v": 1, "id": "01J...", "ok": true, "partial": ...}

Error codes are those of :mod:`memos.errors` (``invalid_request``, ``too_large``,
``unknown_operation``, ``not_found``, ``denied``, ``unauthenticated``,
``conflict``, ``storage_error``, ``unavailable``, ``internal``...). A frame
that cannot be decoded still gets a reply with ``id`` null.

Event, a :class:`memos.models.Event`, the ``partial`` of a ``watch`` reply (the
first one, of op ``watch``, acknowledges the subscription)::

    {"op": "add", "cube": "<cube>", "version": 7, "actor": "agent-a",
     "memories": ["01J..."], "time": 1764159000.1}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
from pydantic import Field, ValidationError

from . import catalog
from .errors import InvalidRequest, MemosError, TooLarge, UnknownOperation
from .operations import Args, Route

PROTOCOL_VERSION = catalog.PROTOCOL_VERSION


class Envelope(Args):
    v: int
    id: str = Field(min_length=1, max_length=64)
    op: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    token: str | None = Field(None, max_length=256)


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes, max_bytes: int) -> dict[str, Any]:
    """Decode one untrusted frame into a map, or raise a typed error."""
    if len(frame) > max_bytes:
        raise TooLarge(f"message of {len(frame)} bytes exceeds {max_bytes}", size=len(frame), limit=max_bytes)
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            UnicodeDecodeError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"frame is not a msgpack map: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"frame must be a msgpack map, not {type(value).__name__}")
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code} is not accepted")


def parse_request(message: dict[str, Any], routes: Mapping[str, Route]) -> tuple[Envelope, Route, Args]:
    """Validate the envelope, find the operation in ``routes`` and validate its arguments."""
    envelope = _validate(Envelope, message, "request")
    if envelope.v != PROTOCOL_VERSION:
        raise InvalidRequest(f"protocol version {envelope.v} is not supported (use {PROTOCOL_VERSION})",
                             supported=PROTOCOL_VERSION)
    route = routes.get(envelope.op)
    if route is None:
        raise UnknownOperation(f"unknown operation {envelope.op[:64]!r}", op=envelope.op[:64])
    return envelope, route, _validate(route.op.args, envelope.args, envelope.op)


def _validate(model: type[Args], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)[:10]
        ]
        first = errors[0] if errors else {"field": "", "problem": "invalid"}
        raise InvalidRequest(f"{what}: {first['field'] or 'value'}: {first['problem']}", errors=errors) from None


def ok_reply(request_id: str | None, result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def partial_reply(request_id: str | None, part: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "partial": part}


def error_reply(request_id: str | None, error: MemosError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()}


def request_id_of(message: Any) -> str | None:
    """Best-effort id of a request that failed validation, so the client can match it."""
    if isinstance(message, dict):
        rid = message.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= 64:
            return rid
    return None

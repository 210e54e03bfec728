"""Byte encodings: canonical msgpack for what is hashed, plain msgpack for other records.

Canonical means maps are written with sorted keys, so equal values always give
equal bytes; content hashes and the audit chain depend on that. Records that
nothing hashes (cubes, commits, stored replies) skip the sorting.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

from .errors import IntegrityError, InvalidRequest

_LEAVES = frozenset({str, int, float, bool, type(None), bytes})


def _canonical(value: Any) -> Any:
    # Exact type checks: this runs for every field of every record written.
    kind = type(value)
    if kind in _LEAVES:
        return value
    if isinstance(value, dict):
        return {k: v if type(v) in _LEAVES else _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [v if type(v) in _LEAVES else _canonical(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    """Encode a plain value (dicts, lists, scalars, bytes) canonically."""
    try:
        return msgpack.packb(_canonical(value), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"value cannot be encoded: {exc}") from exc


def pack_unsorted(value: Any) -> bytes:
    """Encode plain data as given, for stored records that nothing hashes (cheaper than ``pack``)."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"value cannot be encoded: {exc}") from exc


def unpack(data: bytes | memoryview) -> Any:
    """Decode bytes this process wrote; damage is an integrity error."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise IntegrityError(f"stored record cannot be decoded: {exc}") from exc


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


_U64 = struct.Struct(">Q")


def u64(n: int) -> bytes:
    """Big-endian 8 bytes: sorts numerically as bytes."""
    return _U64.pack(n)


def from_u64(b: bytes | memoryview) -> int:
    return _U64.unpack(bytes(b))[0]

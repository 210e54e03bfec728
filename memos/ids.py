"""Sortable unique ids (ULID layout: 48-bit millisecond time + 80 random bits).

Ids sort by creation time as plain strings, so LMDB keys built from them keep
memories in insertion order without a separate index.
"""

from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
ID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}\Z")  # \Z: "$" accepts a trailing newline

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id() -> str:
    """Return a new id, strictly increasing within this process."""
    global _last_ms, _last_rand
    with _lock:
        ms = int(time.time() * 1000)
        if ms <= _last_ms:
            # Same millisecond (or clock stepped back): bump the random part so
            # ids stay monotonic instead of trusting the clock.
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
        _last_ms, _last_rand = ms, rand
    return _encode(ms, 10) + _encode(rand, 16)


def is_id(value: object) -> bool:
    return isinstance(value, str) and bool(ID_PATTERN.match(value))

"""Agent tokens: made, hashed and checked here only.

A token is ``<agent>.<secret>``: the name finds the agent's record, the secret
is checked against the record's salted hash with a constant-time compare. The
secret itself is never stored, logged or kept for retries: only
``sha256(salt || sha256(secret))`` is. Secrets are 256 random bits, so a fast
hash (no slow KDF) is enough; the per-agent salt means two stores, or two
generations of one agent, never share a hash. The inner ``sha256(secret)``
lets a store whose records held a plain ``sha256(secret)`` be upgraded without
the secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_SALT_BYTES = 16


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_salt() -> str:
    return secrets.token_hex(_SALT_BYTES)


def salted_hash(salt: str, secret: str) -> str:
    return salted_from_plain(salt, hashlib.sha256(secret.encode()).hexdigest())


def salted_from_plain(salt: str, plain_sha256: str) -> str:
    """The salted hash from an unsalted ``sha256(secret)`` (what older stores kept)."""
    return hashlib.sha256(bytes.fromhex(salt) + bytes.fromhex(plain_sha256)).hexdigest()


def matches(record: dict, secret: str) -> bool:
    return hmac.compare_digest(record["token_hash"], salted_hash(record["salt"], secret))


def split(token: str) -> tuple[str, str] | None:
    """(agent name, secret) of a well-formed token, else None."""
    name, sep, secret = token.partition(".")
    if not name or not sep or not secret or len(name.encode()) > 64:
        return None
    return name, secret

"""One error hierarchy for the whole system.

Every error carries a stable wire ``code`` (what clients match on) and a human
message. The daemon turns them into error replies; the client turns replies
back into the same classes with :func:`from_wire`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MemosError(Exception):
    """Base of every error memos raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(MemosError, ValueError):
    """The request is malformed: wrong types, bad names, missing fields."""

    code = "invalid_request"


class TooLarge(InvalidRequest):
    """A text, key, payload or message exceeds a configured limit."""

    code = "too_large"


class UnknownOperation(InvalidRequest):
    """The operation named in a request does not exist."""

    code = "unknown_operation"


class NotFound(MemosError, LookupError):
    """A cube, memory, version, blob or agent does not exist."""

    code = "not_found"


class VersionCompacted(NotFound):
    """A version that compaction dropped: ``oldest_kept`` and ``kept`` (the kept versions nearest
    the one asked for) say what can still be read or restored."""

    code = "compacted"


class Denied(MemosError, PermissionError):
    """The actor lacks the role the operation needs."""

    code = "denied"


class Unauthenticated(Denied):
    """The peer did not prove who it is (bad token, foreign uid)."""

    code = "unauthenticated"


class Conflict(MemosError):
    """The target changed or already exists (optimistic-concurrency failure)."""

    code = "conflict"


class Expired(Conflict):
    """A rollback proposal past its expiry: it can no longer be approved."""

    code = "expired"


class ModelMismatch(MemosError):
    """A KV cache or adapter is loaded into a model it was not built for."""

    code = "model_mismatch"


class StorageError(MemosError):
    """The store failed or is in a state this version cannot use."""

    code = "storage_error"


class ConfigError(MemosError):
    """The daemon cannot start as configured (bad file, unsafe folder, already running)."""

    code = "config_error"


class IntegrityError(StorageError):
    """Stored data failed a hash or chain check."""

    code = "integrity_error"


class Unavailable(MemosError):
    """The daemon is not reachable, shutting down, or overloaded."""

    code = "unavailable"


class Timeout(Unavailable, TimeoutError):
    """No reply arrived in time."""

    code = "timeout"


class Cancelled(MemosError):
    """A job was cancelled before it finished."""

    code = "cancelled"


class InternalError(MemosError):
    """A bug: something failed that should not have."""

    code = "internal"


def _all_subclasses(cls: type[MemosError]) -> list[type[MemosError]]:
    out: list[type[MemosError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[MemosError]] = {c.code: c for c in _all_subclasses(MemosError)}
ERRORS_BY_CODE["internal"] = InternalError


def from_wire(code: str, message: str, details: dict[str, Any] | None = None) -> MemosError:
    """Rebuild the exception a server raised from its wire code."""
    cls = ERRORS_BY_CODE.get(code, MemosError)
    err = cls(message, **(details or {}))
    if cls is MemosError:
        err.code = code  # keep an unknown code visible rather than masking it
    return err

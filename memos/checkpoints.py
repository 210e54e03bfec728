"""Signed audit checkpoints: an Ed25519 key kept outside the data folder, and the append-only file of checkpoints.

The audit chain (:mod:`memos.audit`) is hashed without a key, so whoever can
write the store can rewrite records and recompute every later hash. A
checkpoint signed with a key that lives elsewhere pins the chain up to its
record: a rewrite before it no longer matches the signed head, and nobody
without the key can sign a new head. Verifying needs only the public key,
written beside the private one as ``<key>.pub``.

Nothing here opens the store: the audit log's side is in :mod:`memos.auditing`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import ValidationError

from . import clock
from .durable import fsync_path
from .errors import ConfigError, IntegrityError, InvalidRequest
from .models import Boundary, SignedCheckpoint

# Signatures of other kinds (or of a later format) never pass for a checkpoint of this one.
DOMAIN = b"memos-audit-checkpoint-v1\x00"
_NUMBERS = struct.Struct(">QdQ")


def signed_bytes(seq: int, head: str, time: float, boundary: Boundary, key_id: str) -> bytes:
    """What a checkpoint's signature covers: fixed-width fields, so one checkpoint has exactly one
    encoding whatever wrote its JSON line."""
    return (DOMAIN + _NUMBERS.pack(seq, time, boundary.seq) + bytes.fromhex(head)
            + bytes.fromhex(boundary.prev) + key_id.encode("ascii"))


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    try:
        public = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise InvalidRequest("public_key is not a PEM public key", field="public_key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise InvalidRequest("public_key is not an Ed25519 key", field="public_key")
    return public


def problem(checkpoint: SignedCheckpoint, public: Ed25519PublicKey) -> str | None:
    """Why ``checkpoint`` is not signed by ``public``; None when it is."""
    expected = key_id(public)
    if checkpoint.key_id != expected:
        return f"it names key {checkpoint.key_id}, not {expected}"
    try:
        public.verify(bytes.fromhex(checkpoint.signature), signed_bytes(
            checkpoint.seq, checkpoint.head, checkpoint.time, checkpoint.boundary, checkpoint.key_id))
    except InvalidSignature:
        return "its signature does not verify"
    return None


def verified(lines: list[Any], public: Ed25519PublicKey) -> list[SignedCheckpoint]:
    """The checkpoints of a file's lines, each signature checked; IntegrityError names the first bad line."""
    out: list[SignedCheckpoint] = []
    for number, line in enumerate(lines, 1):
        try:
            checkpoint = SignedCheckpoint.model_validate(line)
        except ValidationError as exc:
            raise IntegrityError(f"checkpoint line {number} is not a signed checkpoint: "
                                 f"{exc.errors(include_url=False)[0]['msg']}", line=number) from None
        reason = problem(checkpoint, public)
        if reason is not None:
            raise IntegrityError(f"checkpoint line {number} (record {checkpoint.seq}) is forged: {reason}",
                                 line=number, seq=checkpoint.seq)
        out.append(checkpoint)
    return out


def outside(path: Path, data_dir: Path, what: str) -> None:
    """Refuse a file inside the data folder: whoever can rewrite the store could rewrite it too."""
    if path.resolve().is_relative_to(data_dir.expanduser().resolve()):
        raise ConfigError(f"the {what} {path} lies inside the data folder {data_dir}; keep it elsewhere, "
                          "out of reach of whoever can write the store")


class Signer:
    """The private key that signs checkpoints."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def load(cls, path: Path) -> Signer:
        """The key at ``path``, made (0600, its folder 0700) when there is none yet."""
        folder = path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(folder.stat().st_mode) & 0o022:
            raise ConfigError(f"{folder} is writable by other users: the audit signing key could be replaced")
        if not path.exists():
            _create(path)
        private = serialization.load_pem_private_key(_private_bytes(path), None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        signer = cls(private)
        signer._write_public(public_key_path(path))
        return signer

    def sign(self, seq: int, head: str, boundary: Boundary) -> SignedCheckpoint:
        time = clock.now()
        signature = self.private.sign(signed_bytes(seq, head, time, boundary, self.key_id))
        return SignedCheckpoint(seq=seq, head=head, time=time, boundary=boundary, key_id=self.key_id,
                                signature=signature.hex())

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def _write_public(self, path: Path) -> None:
        pem = self.public_pem()
        if path.exists():
            if path.read_bytes() != pem:
                raise ConfigError(f"{path} is not the public key of the audit signing key beside it; "
                                  "remove it to have it written again")
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def _create(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another memosd made meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    fsync_path(path.parent)


def _private_bytes(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise ConfigError(f"the audit signing key {path} belongs to uid {info.st_uid}, not to this user")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(f"the audit signing key {path} is readable by other users (mode {mode:o}); "
                              f"make it 0600 (chmod 600 {path})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


class CheckpointLog:
    """A signer and the file its checkpoints are appended to.

    ``lock`` is held while a checkpoint is decided and appended (by the schedule,
    ``audit_sign`` or ``audit_archive``), so two never interleave.
    """

    def __init__(self, signer: Signer, path: Path) -> None:
        self.signer = signer
        self.path = path
        self.lock = threading.RLock()
        self._last: SignedCheckpoint | None = None
        self._read_last = False

    @classmethod
    def open(cls, key: Path, path: Path, data_dir: Path | None = None) -> CheckpointLog:
        """The key at ``key`` (made if missing) and the file at ``path``; both must lie outside ``data_dir``."""
        key, path = key.expanduser(), path.expanduser()
        if data_dir is not None:
            outside(key, data_dir, "audit signing key")
            outside(path, data_dir, "audit checkpoint file")
        log = cls(Signer.load(key), path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return log

    def lines(self) -> list[Any]:
        """The file's lines as JSON values (none when there is no file yet)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"cannot read the checkpoint file {self.path}: {exc}") from None
        return parse_lines(text, str(self.path))

    def read(self) -> list[SignedCheckpoint]:
        """Every checkpoint in the file, each checked against this signer's public key."""
        return verified(self.lines(), self.signer.public)

    def last(self) -> SignedCheckpoint | None:
        """The latest checkpoint appended (read from the file the first time)."""
        if not self._read_last:
            found = self.read()
            self._last = found[-1] if found else None
            self._read_last = True
        return self._last

    def append(self, seq: int, head: str, boundary: Boundary) -> SignedCheckpoint:
        """Sign the head and append it as one line: O_APPEND, one write, fsync'd before this returns."""
        checkpoint = self.signer.sign(seq, head, boundary)
        line = (json.dumps(checkpoint.model_dump(mode="json"), separators=(",", ":")) + "\n").encode()
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.path.parent)
        self._last, self._read_last = checkpoint, True
        return checkpoint


def parse_lines(text: str, name: str) -> list[Any]:
    """JSON values, one per non-empty line; IntegrityError names a line that is not JSON."""
    out: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise IntegrityError(f"{name} line {number} is not JSON: {exc}", line=number) from None
    return out

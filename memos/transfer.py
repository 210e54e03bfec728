"""Moving one cube, with its whole history, between stores: ``cube_export`` and ``cube_import``.

The file (format ``memos-cube`` 1, described in docs/storage.md) is a msgpack
stream written from one read snapshot:

1. a header map: ``format``, ``version``, ``cube``, ``schema``, ``head`` (the
   cube's version), ``settings``, ``created_at``, ``owner`` and ``acl`` (by
   name, for information: agents are not moved), ``exported_at``;
2. records, each a list: ``["commit", <Commit bytes>]`` for versions 0..head in
   order, ``["state", memory id, version, <state bytes or b"">]`` for every
   version record, ``["blob", sha256, <bytes>]`` for every blob they use;
3. a trailer map: ``{"end": true, "records": n, "sha256": <of everything before>}``.

An import checks everything before it writes anything: the trailer's hash,
contiguous commits, each state's sha256 against the content hash its commit
recorded (so the history cannot be edited in the file), each blob against its
name. It then writes the cube, its commits, version records and blobs in one
transaction: the same versions and content hashes as in the source. The
importing administrator owns it; grants are not carried (agents are per daemon).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from . import catalog, clock, codec
from .access import Actor
from .core import Core
from .errors import Conflict, IntegrityError, InvalidRequest
from .ledger import ABSENT, cube_prefix
from .models import Commit, Cube, Memory, Role
from .principals import shown
from .storage import SCHEMA_VERSION
from .writes import Applied, Write

FORMAT, FORMAT_VERSION = "memos-cube", 1
_MAX_RECORD = 8 << 30  # one blob may be as large as the store allows


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.f.write(data)


def _path(value: Any, field: str) -> Path:
    if not isinstance(value, str) or not value or "\0" in value or not os.path.isabs(value):
        raise InvalidRequest(f"{field} must be an absolute path", field=field)
    return Path(value)


class Transfers:
    operations = catalog.TRANSFER_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core

    # -- export ---------------------------------------------------------

    def cube_export(self, actor: Actor, cube: str, path: str) -> dict[str, Any]:
        """Write ``cube`` with its whole history to ``path`` (a new file), from one snapshot."""
        self.core.admin_only(actor, "cube_export")
        target = _path(path, "path")
        if target.exists():
            raise self.core.refused(actor, "cube_export", cube, Conflict(f"{target} exists", path=str(target)))
        db = self.core.store.db

        def fn(txn: lmdb.Transaction) -> dict[str, Any]:
            found = self.core.require(txn, actor, cube, Role.admin)
            # The format carries whole histories (the import checks commits 0..head): a compacted
            # cube's would be refused there, so it is refused here, before a file is written.
            if not self.core.ledger.has_commit(txn, found.name, 0) or len(
                    self.core.ledger.commit_times(txn, found.name)) != found.version + 1:
                raise InvalidRequest(f"cube {found.name!r} was compacted: the export format carries whole "
                                     "histories", cube=found.name)
            named = shown(self.core.store, txn, found)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            records, blobs = 0, set()
            try:
                with os.fdopen(fd, "wb") as raw:
                    out = _Hashing(raw)
                    out.write(codec.pack({
                        "format": FORMAT, "version": FORMAT_VERSION, "cube": found.name, "schema": SCHEMA_VERSION,
                        "head": found.version, "settings": found.settings, "created_at": found.created_at,
                        "owner": named.owner, "acl": {k: str(v) for k, v in named.acl.items()},
                        "exported_at": clock.now()}))
                    for commit in self.core.ledger.commits(txn, found.name, 0, found.version, newest_first=False):
                        out.write(codec.pack(["commit", codec.pack_unsorted(commit.model_dump(mode="json"))]))
                        records += 1
                    prefix = cube_prefix(found.name)
                    cur = txn.cursor(db=db["versions"])
                    ok = cur.set_range(prefix)
                    while ok and cur.key().startswith(prefix):
                        key, state = bytes(cur.key()), bytes(cur.value())
                        version, memory_id = codec.from_u64(key[-8:]), key[len(prefix):-8].decode()
                        out.write(codec.pack(["state", memory_id, version, state]))
                        if state != ABSENT and (blob := Memory.from_state_bytes(state, version).blob) is not None:
                            blobs.add(blob.sha256)
                        records += 1
                        ok = cur.next()
                    for sha in sorted(blobs):
                        out.write(codec.pack(["blob", sha, self.core.ledger.get_blob(txn, sha)]))
                        records += 1
                    digest = out.sha.hexdigest()
                    raw.write(codec.pack({"end": True, "records": records, "sha256": digest}))
                    raw.flush()
                    os.fsync(raw.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return {"cube": found.name, "path": str(target), "head": found.version, "records": records,
                    "blobs": len(blobs), "sha256": digest, "bytes": target.stat().st_size}

        return self.core.read(actor, "cube_export", cube, fn)

    # -- import ---------------------------------------------------------

    def write_cube_import(self, actor: Actor, path: str, request_id: str | None = None) -> Write:
        """Add the cube in the file at ``path``, with its history, to this store (admin)."""
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            if not actor.admin:
                raise InvalidRequest("cube_import needs the local administrator")
            header, commits, states, blobs, digest = _read(_path(path, "path"))
            name = header["cube"]
            if core.ledger.has_cube(txn, name):
                raise Conflict(f"cube {name!r} already exists here", cube=name)
            for sha, data in blobs.items():
                core.ledger.put_blob(txn, data)
            for commit in commits:
                core.ledger.put_commit(txn, commit)
            for (memory_id, version), state in sorted(states.items()):
                blob = Memory.from_state_bytes(state, version).blob if state != ABSENT else None
                core.ledger.write_state(txn, name, memory_id, version, state, blob.sha256 if blob else None)
            cube = Cube(name=name, owner=actor.key, acl={actor.key: Role.admin}, settings=header["settings"],
                        version=header["head"], created_at=header["created_at"])
            core.ledger.put_cube(txn, cube)
            ids = sorted({memory_id for memory_id, _ in states})
            return Applied({"cube": name, "head": cube.version, "commits": len(commits), "memories": len(ids),
                            "blobs": len(blobs), "sha256": digest}, cube.version, ids,
                           detail={"path": path, "sha256": digest, "source_owner": header.get("owner")})

        return Write(actor, "cube_import", None, fn, request_id)


def _read(path: Path) -> tuple[dict[str, Any], list[Commit], dict[tuple[str, int], bytes], dict[str, bytes], str]:
    """Everything in an export file, checked; IntegrityError (or InvalidRequest) if anything is off."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    with f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=_MAX_RECORD, max_bin_len=_MAX_RECORD,
                                    strict_map_key=False)
        try:
            header = next(unpacker)
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise InvalidRequest(f"{path} is not a memos cube export", path=str(path))
            if header.get("version") != FORMAT_VERSION:
                raise InvalidRequest(f"export format version {header.get('version')} is not supported")
            commits: list[Commit] = []
            states: dict[tuple[str, int], bytes] = {}
            blobs: dict[str, bytes] = {}
            trailer: dict[str, Any] | None = None
            for record in unpacker:
                if isinstance(record, dict):
                    trailer = record
                    break
                kind = record[0]
                if kind == "commit":
                    commits.append(Commit.model_validate(codec.unpack(record[1])))
                elif kind == "state":
                    states[(record[1], record[2])] = record[3]
                elif kind == "blob":
                    blobs[record[1]] = record[2]
                else:
                    raise IntegrityError(f"unknown record {kind!r} in {path}")
        except (ValueError, TypeError, IndexError, StopIteration, msgpack.UnpackException) as exc:
            raise IntegrityError(f"{path} is not a whole cube export: {type(exc).__name__}", path=str(path)) from None
    # The trailer's hash covers every byte before the trailer; the unpacker read ahead, so hash again.
    digest = _digest_before_trailer(path, trailer)
    _check(header, commits, states, blobs)
    return header, commits, states, blobs, digest


def _digest_before_trailer(path: Path, trailer: dict[str, Any] | None) -> str:
    if trailer is None or not trailer.get("end"):
        raise IntegrityError(f"{path} ends early: no trailer", path=str(path))
    tail = len(codec.pack(trailer))
    size = path.stat().st_size
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        left = size - tail
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            sha.update(chunk)
            left -= len(chunk)
        if f.read() != codec.pack(trailer):
            raise IntegrityError(f"{path} has data after its trailer", path=str(path))
    if sha.hexdigest() != trailer.get("sha256"):
        raise IntegrityError(f"{path} was altered: its content does not match its trailer", path=str(path))
    return sha.hexdigest()


def _check(header: dict[str, Any], commits: list[Commit], states: dict[tuple[str, int], bytes],
           blobs: dict[str, bytes]) -> None:
    name, head = header.get("cube"), header.get("head")
    if [c.version for c in commits] != list(range(head + 1)) or any(c.cube != name for c in commits):
        raise IntegrityError(f"the export's commits of {name!r} are not versions 0..{head}")
    recorded = {(ch.memory_id, c.version): ch.after for c in commits for ch in c.changes}
    if set(recorded) != set(states):
        raise IntegrityError("the export's version records do not match its commits' changes")
    for (memory_id, version), state in states.items():
        expected = recorded[(memory_id, version)]
        actual = None if state == ABSENT else codec.sha256_hex(state)
        if actual != expected:
            raise IntegrityError(f"memory {memory_id} at version {version} differs from what its commit recorded",
                                 memory=memory_id, version=version)
        if state != ABSENT:
            memory = Memory.from_state_bytes(state, version)
            if memory.cube != name:
                raise IntegrityError(f"memory {memory_id} names cube {memory.cube!r}, not {name!r}")
            if memory.blob is not None and memory.blob.sha256 not in blobs:
                raise IntegrityError(f"blob {memory.blob.sha256} of memory {memory_id} is missing")
    for sha, data in blobs.items():
        if codec.sha256_hex(data) != sha:
            raise IntegrityError(f"blob {sha} was altered", blob=sha)

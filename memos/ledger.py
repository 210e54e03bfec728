"""Versioned cube state on top of the store: heads, version records, commits.

Key layout (cube names never contain NUL; memory ids are fixed-length):

* ``heads``     ``cube NUL id``            -> u64 version + state bytes
* ``versions``  ``cube NUL id u64(v)``     -> state bytes, or b"" for absent
* ``commits``   ``cube NUL u64(v)``        -> Commit

Reading a memory at version V is one cursor seek: the last version record of
that memory at or below V. Every function here takes an open transaction and
leaves access control and auditing to the caller.
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from . import codec
from .errors import IntegrityError, InvalidRequest, NotFound, VersionCompacted
from .models import Commit, Cube
from .storage import Store, check_key

ABSENT = b""


def cube_prefix(cube: str) -> bytes:
    return cube.encode() + b"\0"


def memory_key(cube: str, memory_id: str) -> bytes:
    return check_key(cube_prefix(cube) + memory_id.encode())


def version_key(cube: str, memory_id: str, version: int) -> bytes:
    return check_key(memory_key(cube, memory_id) + codec.u64(version))


def commit_key(cube: str, version: int) -> bytes:
    return check_key(cube_prefix(cube) + codec.u64(version))


def _seek_last_at_or_below(cur: lmdb.Cursor, mem_prefix: bytes, version: int) -> bool:
    """Put the cursor on the greatest key <= mem_prefix + u64(version)."""
    if cur.set_range(mem_prefix + codec.u64(version + 1)):
        return cur.prev()
    return cur.last()


class Ledger:
    """Reads and writes of versioned cube state inside a caller's transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        # Decoded cube records by their exact bytes: every read checks its
        # cube's ACL, and validating the record each time cost more than the read.
        self._shared_cubes: dict[bytes, Cube] = {}

    # -- cubes ----------------------------------------------------------

    def cube(self, txn: lmdb.Transaction, name: str) -> Cube:
        raw = txn.get(check_key(name.encode()), db=self.db["cubes"])
        if raw is None:
            raise NotFound(f"no cube named {name!r}", cube=name)
        return Cube.model_validate(codec.unpack(raw))

    def shared_cube(self, txn: lmdb.Transaction, name: str) -> Cube:
        """The cube as stored, shared by all readers of those bytes: never modify it."""
        raw = txn.get(check_key(name.encode()), db=self.db["cubes"])
        if raw is None:
            raise NotFound(f"no cube named {name!r}", cube=name)
        cube = self._shared_cubes.get(raw)
        if cube is None:
            cube = Cube.model_validate(codec.unpack(raw))
            if len(self._shared_cubes) >= 1024:  # old records of changed cubes pile up
                self._shared_cubes.clear()
            self._shared_cubes[raw] = cube
        return cube

    def has_cube(self, txn: lmdb.Transaction, name: str) -> bool:
        return txn.get(check_key(name.encode()), db=self.db["cubes"]) is not None

    def put_cube(self, txn: lmdb.Transaction, cube: Cube) -> None:
        txn.put(cube.name.encode(), codec.pack_unsorted(cube.model_dump(mode="json")), db=self.db["cubes"])

    def cubes(self, txn: lmdb.Transaction, after: str | None = None) -> Iterator[Cube]:
        """Every cube by name; with ``after``, those named after it."""
        cur = txn.cursor(db=self.db["cubes"])
        if after is not None:
            key = after.encode()
            if not cur.set_range(key) or (cur.key() == key and not cur.next()):
                return
        elif not cur.first():
            return
        for _, raw in cur:
            yield Cube.model_validate(codec.unpack(raw))

    # -- memory state ---------------------------------------------------

    def head(self, txn: lmdb.Transaction, cube: str, memory_id: str) -> tuple[int, bytes] | None:
        raw = txn.get(memory_key(cube, memory_id), db=self.db["heads"])
        if raw is None:
            return None
        return codec.from_u64(raw[:8]), bytes(raw[8:])

    def state_at(
        self, txn: lmdb.Transaction, cube: str, memory_id: str, version: int
    ) -> tuple[int, bytes] | None:
        """The (version, state) of a memory as of cube version ``version``; None if absent."""
        prefix = memory_key(cube, memory_id)
        cur = txn.cursor(db=self.db["versions"])
        if not _seek_last_at_or_below(cur, prefix, version):
            return None
        key = cur.key()
        if not key.startswith(prefix) or len(key) != len(prefix) + 8:
            return None
        value = cur.value()
        if value == ABSENT:
            return None
        return codec.from_u64(key[-8:]), bytes(value)

    def memory_versions(self, txn: lmdb.Transaction, cube: str, memory_id: str) -> list[int]:
        prefix = memory_key(cube, memory_id)
        cur = txn.cursor(db=self.db["versions"])
        out = []
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if not key.startswith(prefix):
                    break
                out.append(codec.from_u64(key[-8:]))
        return out

    def iter_heads(self, txn: lmdb.Transaction, cube: str, after: str | None = None) -> Iterator[tuple[str, int, bytes]]:
        prefix = cube_prefix(cube)
        cur = txn.cursor(db=self.db["heads"])
        start = prefix + (after.encode() + b"\xff" if after else b"")
        if not cur.set_range(start):
            return
        for key, raw in cur:
            if not key.startswith(prefix):
                return
            yield key[len(prefix):].decode(), codec.from_u64(raw[:8]), bytes(raw[8:])

    def iter_state_at(
        self, txn: lmdb.Transaction, cube: str, version: int, after: str | None = None
    ) -> Iterator[tuple[str, int, bytes]]:
        """Every memory present at ``version``, in id order, by one seek per memory."""
        prefix = cube_prefix(cube)
        cur = txn.cursor(db=self.db["versions"])
        start = prefix + (after.encode() + b"\xff" * 9 if after else b"")
        positioned = cur.set_range(start)
        while positioned:
            key = cur.key()
            if not key.startswith(prefix):
                return
            mem_prefix = key[:-8]
            memory_id = mem_prefix[len(prefix):].decode()
            if _seek_last_at_or_below(cur, mem_prefix, version):
                found = cur.key()
                if found.startswith(mem_prefix) and len(found) == len(mem_prefix) + 8:
                    value = cur.value()
                    if value != ABSENT:
                        yield memory_id, codec.from_u64(found[-8:]), bytes(value)
            # Jump past every record of this memory.
            positioned = cur.set_range(mem_prefix + b"\xff" * 9)

    def write_state(
        self, txn: lmdb.Transaction, cube: str, memory_id: str, version: int,
        state: bytes, blob_sha: str | None = None,
    ) -> None:
        """Record a memory's state at ``version`` (``ABSENT`` removes it from the head)."""
        txn.put(version_key(cube, memory_id, version), state, db=self.db["versions"])
        if state == ABSENT:
            txn.delete(memory_key(cube, memory_id), db=self.db["heads"])
        else:
            txn.put(memory_key(cube, memory_id), codec.u64(version) + state, db=self.db["heads"])
        if blob_sha is not None:
            self.add_blob_ref(txn, blob_sha, cube)

    # -- blobs ----------------------------------------------------------

    def put_blob(self, txn: lmdb.Transaction, data: bytes) -> str:
        sha = codec.sha256_hex(data)
        key = sha.encode()
        if txn.get(key, db=self.db["blobs"]) is None:
            txn.put(key, data, db=self.db["blobs"])
        return sha

    def get_blob(self, txn: lmdb.Transaction, sha: str, cube: str | None = None) -> bytes:
        """A blob's bytes; with ``cube``, only if a memory of that cube refers to it."""
        # Blobs are shared between cubes by content; without this check a reader
        # of one cube could fetch another cube's blob by its hash.
        if cube is not None and txn.get(check_key(cube_prefix(cube) + sha.encode()),
                                        db=self.db["cube_blobs"]) is None:
            raise NotFound(f"no blob {sha} in cube {cube!r}", blob=sha, cube=cube)
        raw = txn.get(check_key(sha.encode()), db=self.db["blobs"])
        if raw is None:
            raise NotFound(f"no blob {sha}", blob=sha)
        return bytes(raw)

    def add_blob_ref(self, txn: lmdb.Transaction, sha: str, cube: str) -> None:
        key = sha.encode()
        if txn.get(key, db=self.db["blobs"]) is None:
            raise NotFound(f"no blob {sha}", blob=sha)
        for db, ref_key in ((self.db["blob_refs"], key), (self.db["cube_blobs"], cube_prefix(cube) + key)):
            raw = txn.get(ref_key, db=db)
            count = codec.from_u64(raw) if raw is not None else 0
            txn.put(ref_key, codec.u64(count + 1), db=db)

    def drop_blob_refs(self, txn: lmdb.Transaction, sha: str, cube: str, n: int,
                       dry_run: bool = False) -> int | None:
        """Take ``n`` removed version records of ``cube`` off a blob's counts (a count at 0 goes),
        and delete the blob if no record of any cube refers to it any more: then its size, else None."""
        key = sha.encode()
        left = []
        for db, ref_key in ((self.db["blob_refs"], key), (self.db["cube_blobs"], cube_prefix(cube) + key)):
            raw = txn.get(ref_key, db=db)
            count = codec.from_u64(raw) if raw is not None else 0
            if count < n:
                raise IntegrityError(f"blob {sha} is counted {count} times, fewer than the {n} records removed",
                                     blob=sha, cube=cube)
            left.append(count - n)
            if not dry_run:
                if count > n:
                    txn.put(ref_key, codec.u64(count - n), db=db)
                else:
                    txn.delete(ref_key, db=db)
        if left[0]:  # other records, of this cube or another, still use it
            return None
        raw = txn.get(key, db=self.db["blobs"])
        if raw is None:
            return None
        size = len(raw)
        if not dry_run:
            txn.delete(key, db=self.db["blobs"])
        return size

    def blob_refs(self, txn: lmdb.Transaction, sha: str) -> int:
        raw = txn.get(sha.encode(), db=self.db["blob_refs"])
        return codec.from_u64(raw) if raw is not None else 0

    def unreferenced_blobs(self, txn: lmdb.Transaction) -> list[str]:
        return [
            key.decode() for key in txn.cursor(db=self.db["blobs"]).iternext(values=False)
            if txn.get(key, db=self.db["blob_refs"]) is None
        ]

    # -- commits --------------------------------------------------------

    def put_commit(self, txn: lmdb.Transaction, commit: Commit) -> None:
        key = commit_key(commit.cube, commit.version)
        if not txn.put(key, codec.pack_unsorted(commit.model_dump(mode="json")), db=self.db["commits"], overwrite=False):
            raise InvalidRequest(f"commit {commit.version} of {commit.cube} already exists")

    def commit(self, txn: lmdb.Transaction, cube: str, version: int) -> Commit:
        raw = txn.get(commit_key(cube, version), db=self.db["commits"])
        if raw is None:
            raise NotFound(f"cube {cube!r} has no version {version}", cube=cube, version=version)
        return Commit.model_validate(codec.unpack(raw))

    def commits(
        self, txn: lmdb.Transaction, cube: str, lo: int = 0, hi: int | None = None, newest_first: bool = False
    ) -> Iterator[Commit]:
        """Commits with lo <= version <= hi."""
        prefix = cube_prefix(cube)
        cur = txn.cursor(db=self.db["commits"])
        if newest_first:
            top = prefix + codec.u64(hi + 1) if hi is not None else prefix + b"\xff" * 9
            if cur.set_range(top):
                ok = cur.prev()
            else:
                ok = cur.last()
            while ok:
                key = cur.key()
                if not key.startswith(prefix) or codec.from_u64(key[-8:]) < lo:
                    return
                yield Commit.model_validate(codec.unpack(cur.value()))
                ok = cur.prev()
        else:
            if not cur.set_range(prefix + codec.u64(lo)):
                return
            for key, raw in cur:
                if not key.startswith(prefix) or (hi is not None and codec.from_u64(key[-8:]) > hi):
                    return
                yield Commit.model_validate(codec.unpack(raw))

    def touched_between(self, txn: lmdb.Transaction, cube: str, lo: int, hi: int) -> list[str]:
        """Memory ids changed by commits lo < version <= hi, in first-touched order."""
        seen: dict[str, None] = {}
        n = 0
        for commit in self.commits(txn, cube, lo + 1, hi):
            n += 1
            for change in commit.changes:
                seen.setdefault(change.memory_id, None)
        if n == hi - lo:
            return list(seen)
        # Compaction dropped commits in between, and their change lists with them. Every memory
        # whose state differs between two kept versions still has a record in between (the one the
        # later version reads), so the records say what the commits no longer can.
        return self.recorded_between(txn, cube, lo, hi)

    def recorded_between(self, txn: lmdb.Transaction, cube: str, lo: int, hi: int) -> list[str]:
        """Memory ids with a version record lo < version <= hi, by their first such version."""
        prefix = cube_prefix(cube)
        cur = txn.cursor(db=self.db["versions"])
        found: list[tuple[int, str]] = []
        positioned = cur.set_range(prefix)
        while positioned:
            key = cur.key()
            if not key.startswith(prefix):
                break
            mem_prefix = key[:-8]
            if cur.set_range(mem_prefix + codec.u64(lo + 1)):
                key = cur.key()
                if key.startswith(mem_prefix) and len(key) == len(mem_prefix) + 8:
                    version = codec.from_u64(key[-8:])
                    if version <= hi:
                        found.append((version, mem_prefix[len(prefix):].decode()))
            positioned = cur.set_range(mem_prefix + b"\xff" * 9)
        return [memory_id for _, memory_id in sorted(found)]

    # -- retention ------------------------------------------------------

    def has_commit(self, txn: lmdb.Transaction, cube: str, version: int) -> bool:
        return txn.get(commit_key(cube, version), db=self.db["commits"]) is not None

    def commit_times(self, txn: lmdb.Transaction, cube: str) -> list[tuple[int, float]]:
        """(version, time) of every commit the cube keeps, oldest first."""
        prefix = cube_prefix(cube)
        cur = txn.cursor(db=self.db["commits"])
        out = []
        if cur.set_range(prefix):
            for key, raw in cur:
                if not key.startswith(prefix):
                    break
                out.append((codec.from_u64(key[-8:]), float(codec.unpack(raw)["time"])))
        return out

    def require_kept(self, txn: lmdb.Transaction, cube: Cube, version: int) -> int:
        """``version`` if compaction kept it (its commit is there), else VersionCompacted naming
        the oldest version kept and the kept ones nearest it."""
        if version >= cube.version or self.has_commit(txn, cube.name, version):
            return version
        prefix = cube_prefix(cube.name)
        cur = txn.cursor(db=self.db["commits"])
        oldest = codec.from_u64(cur.key()[-8:]) if cur.set_range(prefix) else cube.version
        near = []
        if cur.set_range(commit_key(cube.name, version)) and cur.key().startswith(prefix):
            after = codec.from_u64(cur.key()[-8:])
            if cur.prev() and cur.key().startswith(prefix):
                near.append(codec.from_u64(cur.key()[-8:]))
            near.append(after)
        raise VersionCompacted(
            f"version {version} of cube {cube.name!r} was compacted away; the oldest kept is {oldest}",
            cube=cube.name, version=version, oldest_kept=oldest, kept=near)

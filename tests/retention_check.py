"""Checks of a compacted store shared by the retention tests: what each kept version reads, and
that every blob count is exactly the number of version records using the blob."""

from __future__ import annotations

from collections import Counter

from memos import codec
from memos.api import LOCAL_ADMIN, Memos
from memos.ledger import ABSENT


def kept(m: Memos, cube: str) -> list[int]:
    with m.store.read() as txn:
        return [v for v, _ in m.ledger.commit_times(txn, cube)]


def snapshot_kept(m: Memos, cube: str, only: dict | None = None) -> dict:
    """Each kept version (of ``only``'s, if given): its exact state bytes, and its diff to the head
    (content hashes by memory, order aside)."""
    head = m.get_cube(LOCAL_ADMIN, cube).version
    out = {}
    for v in kept(m, cube):
        if only is not None and v not in only:
            continue
        diff = sorted((d.memory_id, d.change, d.before and d.before.content_hash, d.after and d.after.content_hash)
                      for d in m.diff(LOCAL_ADMIN, cube, v, head))
        out[v] = (m.state(LOCAL_ADMIN, cube, at=v), diff)
    if only is not None:
        # Nothing a kept version read has changed; the head and the pins are among them.
        assert head in out and set(m.get_cube(LOCAL_ADMIN, cube).pins.values()) <= set(out)
    return out


def check_store(m: Memos) -> None:
    """Every blob count equals the version records using the blob; every used blob exists; no other does."""
    db = m.store.db
    refs: Counter[str] = Counter()
    cube_refs: Counter[bytes] = Counter()
    with m.store.read() as txn:
        for key, state in txn.cursor(db=db["versions"]):
            if bytes(state) == ABSENT:
                continue
            blob = codec.unpack(bytes(state)).get("blob")
            if blob is not None:
                refs[blob["sha256"]] += 1
                cube_refs[bytes(key[:key.index(b"\0") + 1]) + blob["sha256"].encode()] += 1
        stored_refs = {bytes(k).decode(): codec.from_u64(bytes(v)) for k, v in txn.cursor(db=db["blob_refs"])}
        stored_cube = {bytes(k): codec.from_u64(bytes(v)) for k, v in txn.cursor(db=db["cube_blobs"])}
        blobs = {bytes(k).decode() for k, _ in txn.cursor(db=db["blobs"])}
    assert stored_refs == dict(refs)
    assert stored_cube == dict(cube_refs)
    assert blobs == set(refs), "a used blob is missing, or an unused one is left"


def check_minimal(m: Memos, cube: str) -> None:
    """Every version record left is read by a kept version, and no memory's first record is absent."""
    versions = kept(m, cube)
    prefix = cube.encode() + b"\0"
    records: dict[bytes, list[tuple[int, bool]]] = {}
    with m.store.read() as txn:
        cur = txn.cursor(db=m.store.db["versions"])
        if cur.set_range(prefix):
            for key, state in cur:
                if not key.startswith(prefix):
                    break
                records.setdefault(bytes(key[:-8]), []).append((codec.from_u64(bytes(key[-8:])), bytes(state) == ABSENT))
    for memory, rows in records.items():
        assert not rows[0][1], f"{memory!r} starts with an absent record"
        for i, (v, _) in enumerate(rows):
            nxt = rows[i + 1][0] if i + 1 < len(rows) else None
            assert any(v <= k and (nxt is None or k < nxt) for k in versions), f"{memory!r} v{v} is read by no kept version"

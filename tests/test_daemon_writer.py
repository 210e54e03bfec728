"""The writer's housekeeping: stored replies kept for retries and forgotten after the
retention period, and read counts written when no write carries them.

The writer runs in process against a real store; time is moved by patching
``time.time``, so expiry needs no waiting.
"""

from __future__ import annotations

import time

import pytest

from conftest import ALICE
from memos.daemon import writer as writer_module
from memos.daemon.writer import Job, Writer

RETENTION_S = 3600.0


@pytest.fixture
def writer(memos, cube):
    return Writer(memos, max_group=64, retention_s=RETENTION_S, publish=lambda cube, event: None)


def _add(writer: Writer, cube: str, rid: str, text: str) -> dict:
    """Run one add through the writer's commit path; its reply."""
    replies: list[dict] = []
    write = writer.memos.write_add(ALICE, cube, text, request_id=rid)
    writer._commit([Job(ALICE, rid, write, replies.append)])
    assert len(replies) == 1
    return replies[0]


def _stored(writer: Writer) -> tuple[set[bytes], list[bytes]]:
    """Keys of stored replies, and the time index's keys (without their time) in index order."""
    with writer.memos.store.read() as txn:
        replies = {bytes(k) for k, _ in txn.cursor(db=writer.db)}
        index = [bytes(k)[8:] for k, _ in txn.cursor(db=writer.times)]
    return replies, index


def _key(rid: str) -> bytes:
    """Where a reply to alice is stored: under her id, not her name (a later alice must not replay it)."""
    return f"{ALICE.key}\0{rid}".encode()


def test_expired_replies_are_forgotten_oldest_first_in_batches(writer, cube, monkeypatch):
    now = time.time()
    clock = [now - 2 * RETENTION_S]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    for i in range(5):  # expired: two retention periods ago, a second apart
        clock[0] += 1
        _add(writer, cube, f"old-{i}", f"old memory {i}")
    clock[0] = now - RETENTION_S / 2
    for i in range(3):  # still within the retention period
        _add(writer, cube, f"new-{i}", f"new memory {i}")
    clock[0] = now
    replies, index = _stored(writer)
    assert replies == set(index) and len(index) == 8
    assert index[:5] == [_key(f"old-{i}") for i in range(5)]

    monkeypatch.setattr(writer_module, "_PRUNE_BATCH", 2)
    assert writer._prune_some() is True  # a batch, more are due
    assert _stored(writer)[1] == [_key(r) for r in ("old-2", "old-3", "old-4", "new-0", "new-1", "new-2")]
    assert writer._prune_some() is True
    assert writer._prune_some() is False  # the last expired one, then the cutoff
    replies, index = _stored(writer)
    assert replies == set(index) == {_key(f"new-{i}") for i in range(3)}
    assert writer._prune_some() is False  # nothing expired: nothing changes
    assert _stored(writer)[1] == [_key(f"new-{i}") for i in range(3)]


def test_a_retry_within_retention_replays_and_after_it_applies_again(writer, cube, monkeypatch):
    now = time.time()
    clock = [now - 2 * RETENTION_S]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    first_old = _add(writer, cube, "old", "old memory")
    clock[0] = now
    first_new = _add(writer, cube, "new", "new memory")
    writer._prune_some()

    assert _add(writer, cube, "new", "new memory") == first_new  # the stored reply, not a second add
    again = _add(writer, cube, "old", "old memory")  # its reply was forgotten: applied anew
    assert again["ok"] and again["result"]["id"] != first_old["result"]["id"]
    texts = [m.text for m in writer.memos.list(ALICE, cube)]
    assert texts.count("old memory") == 2 and texts.count("new memory") == 1


def test_the_writer_thread_prunes_on_its_own(writer, cube, monkeypatch):
    monkeypatch.setattr(writer_module, "_HOUSEKEEPING_EVERY_S", 0.02)
    writer.retention_s = 0.2
    writer.start()
    try:
        done: list[dict] = []
        for i in range(3):
            write = writer.memos.write_add(ALICE, cube, f"memory {i}", request_id=f"r{i}")
            writer.submit(Job(ALICE, f"r{i}", write, done.append))
        deadline = time.monotonic() + 10
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r["ok"] for r in done] == [True] * 3
        while _stored(writer)[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stored(writer) == (set(), [])
    finally:
        writer.stop()
    assert len(writer.memos.list(ALICE, cube)) == 3  # forgetting replies touches no memory


def test_read_counts_reach_the_store_without_a_write(writer, cube, monkeypatch):
    """Reads are counted in memory and written with the next commit, or by housekeeping."""
    memory = writer.memos.add(ALICE, cube, "read me")
    for _ in range(3):
        writer.memos.get(ALICE, cube, memory.id)
    monkeypatch.setattr(writer_module, "_HOUSEKEEPING_EVERY_S", 0.02)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while writer.memos.core.usage.peek(cube, memory.id)[0] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        writer.stop()
    with writer.memos.store.read() as txn:
        assert writer.memos.core.usage.plain(txn, cube, memory.id)["reads"] == 3
    assert writer.memos.core.usage.peek(cube, memory.id) == (0, None)  # all of it from the store


def test_backlog_batches_leave_read_counts_to_the_regular_pass(writer, cube):
    memory = writer.memos.add(ALICE, cube, "read me")
    writer.memos.get(ALICE, cube, memory.id)
    writer._housekeeping(backlog=True)  # working off expired replies: one commit a batch
    assert writer.memos.core.usage.peek(cube, memory.id)[0] == 1
    writer._housekeeping(backlog=False)
    assert writer.memos.core.usage.peek(cube, memory.id) == (0, None)

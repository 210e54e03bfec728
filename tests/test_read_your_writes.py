"""Read-your-writes with the indexer deliberately slow: a search right after a write's commit must
wait for the index to reach that version, not win a race the indexer usually wins.

The daemon's parts are assembled in process (memory types, prepare stages, the writer), so that
the indexer's work can be delayed; everything else is what memosd runs.
"""

from __future__ import annotations

import threading
import time

import pytest

from memos import config
from memos.api import LOCAL_ADMIN
from memos.daemon.types import MemoryTypes
from memos.daemon.writer import Writer, wait_for
from memos.protocol import error_reply

DELAY_S = 0.6


@pytest.fixture
def parts(tmp_path):
    settings = config.load(search={"embedder": "hashing"}, activation={"models": {}})
    types = MemoryTypes(settings, tmp_path)
    writer = Writer(types.memos, max_group=64, retention_s=60, publish=lambda cube, event: None,
                    on_commit=types.after_commit)
    writer.start()
    types.start(commit=writer.submit, fail=lambda job, exc: job.reply(error_reply(job.request_id, exc)))
    yield types, writer
    types.stop()
    writer.stop()
    types.close()
    types.memos.close()


def test_a_search_waits_for_the_delayed_indexer_to_reach_the_write(parts, monkeypatch):
    types, writer = parts
    memos = types.memos
    plaintext = types.types["plaintext"]
    indexes = plaintext._indexes
    applied = threading.Event()
    original = indexes._apply

    def slow_apply(*args, **kwargs):
        time.sleep(DELAY_S)  # the indexer is late: the search below must not run ahead of it
        result = original(*args, **kwargs)
        applied.set()
        return result

    monkeypatch.setattr(indexes, "_apply", slow_apply)
    wait_for(writer.submit, memos.cubes.write_create_cube(LOCAL_ADMIN, "notes"))
    for text in ("Ada keeps bees on the library roof", "Olek services the boiler in May"):
        applied.clear()
        mem = wait_for(writer.submit, memos.memories.write_add(LOCAL_ADMIN, "notes", text))
        assert not applied.is_set()  # the commit is acknowledged before the index has it
        start = time.monotonic()
        hits = plaintext.search(LOCAL_ADMIN, "notes", text, k=1)
        waited = time.monotonic() - start
        assert hits and hits[0]["memory"]["id"] == mem["id"]
        assert applied.is_set() and waited >= DELAY_S / 2, waited  # it found it by waiting, not by luck

    applied.clear()
    wait_for(writer.submit, memos.memories.write_update(LOCAL_ADMIN, "notes", mem["id"], "Olek fixes radiators"))
    hits = plaintext.search(LOCAL_ADMIN, "notes", "radiators", k=1)
    assert hits[0]["memory"]["text"] == "Olek fixes radiators" and applied.is_set()

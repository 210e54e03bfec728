"""Nothing is acknowledged before it is durable: the store the daemon opens flushes every commit.

A SIGKILL keeps the page cache, so crash tests alone cannot tell a durable commit from one the
kernel still holds. What makes a commit durable is LMDB's flush at commit (fdatasync of the data
and of the meta page): the environment memosd opens must have it on, and the writer replies only
once ``commit()`` has returned (daemon/writer.py: the reply is built after ``Core.apply``).
"""

from __future__ import annotations

from memos import config
from memos.api import Memos
from memos.daemon.types import MemoryTypes


def assert_durable(env) -> None:
    flags = env.flags()
    assert flags["sync"] and flags["metasync"], flags  # fdatasync at every commit, meta page included
    assert not flags["map_async"], flags  # with a writable map, an async flush would acknowledge early


def test_the_daemons_store_flushes_every_commit(tmp_path):
    types = MemoryTypes(config.load(search={"embedder": "hashing"}, activation={"models": {}}), tmp_path)
    try:
        assert_durable(types.memos.store.env)
    finally:
        types.memos.close()


def test_an_embedded_store_flushes_every_commit(tmp_path):
    with Memos(tmp_path / "store") as memos:
        assert_durable(memos.store.env)

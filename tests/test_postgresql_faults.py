"""memosd when its PostgreSQL is away: a clear error, typed replies, and reconnection by itself."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from daemon_fixtures import Daemon
from pgserver import PgServer

from memos.errors import StorageError


@pytest.fixture
def own_server():
    """A server of this test alone: it is stopped and started under the daemon."""
    server = PgServer()
    yield server
    server.stop()


def test_memosd_refuses_to_start_without_its_postgresql(tmp_path):
    url = f"postgresql://memos@/memos?host={tmp_path}&connect_timeout=2"  # no server there
    d = Daemon(env={"MEMOS_STORAGE": url})
    try:
        d.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        proc = d.spawn()
        assert proc.wait(timeout=60) != 0
        assert "cannot reach PostgreSQL" in d.log()
    finally:
        d.cleanup()


def test_requests_fail_typed_while_postgresql_is_down_and_succeed_once_it_is_back(own_server):
    d = Daemon(env={"MEMOS_STORAGE": own_server.url(own_server.new_database())})
    try:
        d.start()
        c = d.client(retries=0, timeout=20)
        c.cube_create("outage")
        kept = c.add("outage", "written before the outage")
        own_server.halt()
        with pytest.raises(StorageError):
            c.get("outage", kept.id)
        with pytest.raises(StorageError):
            c.add("outage", "written during the outage")
        own_server.start()
        # every pooled connection died with the server: the next requests succeed at the first try
        assert c.get("outage", kept.id).text == "written before the outage"
        after = c.add("outage", "written after the outage")
        assert [m.id for m in c.list("outage")] == [kept.id, after.id]
        assert [x.version for x in c.history("outage")] == [2, 1, 0]
        assert c.audit_verify().ok
        for _ in range(8):  # several pooled connections, each left broken by a restart nobody saw
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: d.client(retries=0).get("outage", kept.id), range(32)))
            own_server.halt()
            own_server.start()
            assert c.get("outage", kept.id).text == "written before the outage"
            c.add("outage", "written after a restart")
        assert d.alive()
    finally:
        d.cleanup()

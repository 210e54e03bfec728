"""A disk that fails or fills up: writes are refused with a typed error, nothing half-written
stays, the daemon keeps serving reads, and writes succeed again once the disk recovers.

The faults come from ``tests/faults/faults.c`` (LD_PRELOAD): while a file exists, every write to
and flush of LMDB's data file fails with ENOSPC or EIO, as a full or failing disk would.
"""

from __future__ import annotations

import pytest

from daemon_fixtures import Daemon
from memos.errors import StorageError
from test_powerloss import shim  # noqa: F401 (the fixture)


@pytest.mark.parametrize("fault", ["enospc", "eio"])
def test_writes_are_refused_reads_go_on_and_the_daemon_recovers(shim, tmp_path, fault):  # noqa: F811
    trigger = tmp_path / "fault"
    d = Daemon(env={"LD_PRELOAD": str(shim), "MEMOS_FAULT_FILE": str(trigger)}).start()
    try:
        client = d.client(timeout=10)
        client.cube_create("notes")
        before = client.add("notes", "written before the fault")
        version = client.cube_get("notes").version

        trigger.write_text(fault)
        for attempt in range(3):
            with pytest.raises(StorageError) as refused:
                client.add("notes", f"attempt {attempt} during the fault")
            assert refused.value.code == "storage_error"
        assert client.get("notes", before.id).text == "written before the fault"  # reads are served
        assert [m.text for m in client.list("notes")] == ["written before the fault"]
        assert client.cube_get("notes").version == version  # nothing half-applied
        assert d.alive()

        trigger.unlink()  # space is back
        after = client.add("notes", "written after the fault")
        assert client.cube_get("notes").version == version + 1
        assert [m.id for m in client.list("notes")] == [before.id, after.id]
        assert [c.version for c in client.history("notes")] == list(range(version + 1, -1, -1))
        assert client.audit_verify().ok
        d.stop()
    finally:
        d.cleanup()

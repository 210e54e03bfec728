"""Power loss, simulated: what memosd acknowledged is on disk, not only in the page cache.

A SIGKILL leaves the page cache intact, so a killed daemon's unflushed writes survive it and a
crash test passes even with durability off. Here memosd runs with ``tests/faults/faults.c``
preloaded: it keeps, beside the LMDB data file, an image of the file as of its last flush
(fsync/fdatasync, or a write through an O_DSYNC descriptor, as LMDB writes its meta page). After
SIGKILL the image replaces the file, as a power cut would leave it, and every acknowledged write
must be there. With LMDB's flushes turned off (MDB_NOSYNC) this test fails.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from daemon_fixtures import ROOT, Daemon
from memos.errors import MemosError, NotFound
from memos.paging import every

SHIM = ROOT / "tests" / "faults" / "faults.c"


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the power-loss shim")
    out = tmp_path_factory.mktemp("shim") / "faults.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM), "-ldl"], check=True)
    return out


def power_cut(d: Daemon) -> None:
    """SIGKILL, then the data file as the disk holds it: its last flushed image (none: no file)."""
    d.kill()
    image = d.data_dir / "data.mdb.durable"
    (d.data_dir / "data.mdb").unlink()
    if image.is_file():
        image.rename(d.data_dir / "data.mdb")
    (d.data_dir / "lock.mdb").unlink(missing_ok=True)


def test_every_acknowledged_write_survives_a_power_cut(shim):
    d = Daemon(env={"LD_PRELOAD": str(shim)})
    d.start()
    try:
        admin = d.client(timeout=30)
        admin.cube_create("ledger")
        acknowledged: list[str] = []
        lock = threading.Lock()

        def writer(n: int) -> None:
            client = d.client(timeout=30)
            for i in range(40):
                try:
                    mem = client.add("ledger", f"writer {n} note {i}")
                except MemosError:
                    return  # the daemon is gone: this write was never acknowledged
                with lock:
                    acknowledged.append(mem.id)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(acknowledged) == 160
        power_cut(d)
        d.env.pop("LD_PRELOAD")
        d.start()
        admin = d.client(timeout=30)
        try:
            present = {m.id for m in admin.list("ledger")}
        except NotFound:
            present = set()
        assert set(acknowledged) <= present, f"{len(set(acknowledged) - present)} acknowledged writes lost"
        versions = [c.version for c in admin.history("ledger", limit=1000)]
        assert versions == list(range(max(versions), -1, -1))  # contiguous
        assert admin.audit_verify().ok
        d.stop()
    finally:
        d.cleanup()


def test_power_cuts_at_random_moments_while_agents_write(shim):
    """20 cuts, each at a random moment while four agents write: after each, every acknowledged
    write is there, versions are contiguous, the audit chain holds and search finds what was written."""
    import random

    rng = random.Random(7)
    d = Daemon(env={"LD_PRELOAD": str(shim)})
    d.start()
    try:
        d.client(timeout=30).cube_create("ledger")
        acknowledged: dict[str, str] = {}
        for round_ in range(20):
            lock = threading.Lock()
            stop = threading.Event()

            def writer(n: int) -> None:
                client = d.client(timeout=5, retries=0)
                i = 0
                while not stop.is_set():
                    text = f"round {round_} writer {n} note {i} token{round_}x{n}x{i}"
                    try:
                        mem = client.add("ledger", text)
                    except MemosError:
                        return  # the cut came first: never acknowledged
                    with lock:
                        acknowledged[mem.id] = text
                    i += 1

            threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
            for t in threads:
                t.start()
            threading.Event().wait(rng.uniform(0.1, 0.6))
            power_cut(d)
            stop.set()
            for t in threads:
                t.join()
            d.close_clients()
            d.start()
            client = d.client(timeout=30)
            present = {m.id: m.text for m in every(lambda n, after: client.list("ledger", limit=n, after=after),
                                                   lambda m: m.id)}
            lost = set(acknowledged) - set(present)
            assert not lost, f"round {round_}: {len(lost)} acknowledged writes lost"
            assert all(present[k] == v for k, v in acknowledged.items())  # nothing half-applied
            versions = [c.version for c in every(lambda n, before: client.history("ledger", limit=n, before=before),
                                                 lambda c: c.version)]
            assert versions == list(range(max(versions), -1, -1)), f"round {round_}: versions not contiguous"
            assert client.audit_verify().ok
            for memory_id in rng.sample(sorted(acknowledged), 3):  # the rebuilt index agrees with the store
                token = acknowledged[memory_id].split()[-1]
                assert memory_id in [h.memory.id for h in client.search("ledger", token, k=3)]
        assert len(acknowledged) > 100
        print(f"power cuts: 20, acknowledged writes checked after each: {len(acknowledged)} in all, lost: 0")
        d.stop()
    finally:
        d.cleanup()

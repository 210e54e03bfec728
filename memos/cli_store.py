"""``memosctl store``: where the store's bytes go, and compacting its file.

``store compact`` asks memosd to rewrite its file without free pages. memosd answers, restarts in
place and rewrites the file as it opens it; this command waits until memosd serves again and the
rewrite is recorded, then prints the sizes before and after and how long requests waited.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from .client import Client
from .errors import StorageError, Timeout, Unavailable

_WAIT_S = 600.0  # a rewrite copies the whole file: minutes for a very large store


def add_commands(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    store = commands.add_parser("store", help="the store file as a whole").add_subparsers(dest="sub", required=True)
    command("stats", "bytes by cube and by memory type, blobs, pages in use and free", store)
    command("compact", "give the file's free pages back to the disk (memosd pauses and restarts in place)", store)


def calls(client: Client, a: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    return {"store stats": client.store_stats, "store compact": lambda: compact(client)}


def compact(client: Client) -> dict[str, Any]:
    """Request the rewrite, wait for memosd to serve the rewritten file, report what it did."""
    began = time.monotonic()
    old = _socket_id(client.socket_path)
    requested = client.store_compact(client.store_stats()["path"])
    deadline = began + _WAIT_S
    # Short waits: a question the old process takes but never reads before it drains is asked again.
    with Client(client.socket_path, token=client.token, timeout=1.0, retries=0) as asker:
        while time.monotonic() < deadline:
            restarted = _socket_id(client.socket_path) not in (None, old)  # before asking: then it answers
            try:
                last = asker.store_stats()["last_compaction"]
            except Unavailable:  # timeouts included: the restart in place is under way
                time.sleep(0.05)
                continue
            if last is not None and last["id"] == requested["id"]:
                return {**last, "freed": last["bytes_before"] - last["bytes_after"],
                        "paused_s": round(time.monotonic() - began, 3)}
            if restarted:  # the new process opened the store without rewriting it
                raise StorageError(f"memosd restarted but could not rewrite the file (its log says why); "
                                   f"compaction {requested['id']} is tried again when it next starts")
            time.sleep(0.05)  # the old process still answers until it has drained
    raise Timeout(f"memosd did not report compaction {requested['id']} within {_WAIT_S:.0f}s")


def _socket_id(path: Any) -> tuple[int, int] | None:
    """Which socket file memosd listens on: the process that starts again binds a new one."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_ctime_ns


def human(command: str, value: dict[str, Any]) -> str:
    if command == "store compact":
        return (f"compacted {value['bytes_before']} -> {value['bytes_after']} bytes ({value['freed']} freed); "
                f"copy {value['copy_s']:.3f}s, memosd offline {value['offline_s']:.3f}s, "
                f"requests waited at most {value['paused_s']:.3f}s")
    pages = value["pages"]
    where = f"{value['path']}: {value['file_bytes']} bytes on disk"
    if pages is not None:
        where += (f", map {value['map_size']}, pages {pages['used']} used + {pages['free']} free "
                  f"of {pages['total']} ({value['page_size']} bytes)")
    lines = [where,
             f"blobs: {value['blobs']['count']}, {value['blobs']['bytes']} bytes, "
             f"{value['blobs']['references']} references"]
    lines += [f"cube {name}: v{c['version']}, {c['commits']} commits, {c['version_records']} version records, "
              f"{c['head_bytes']} head bytes, {c['version_bytes']} version bytes"
              for name, c in sorted(value["cubes"].items())]
    lines += [f"type {name}: {t['state_bytes']} state bytes, {t['blobs']} blobs of {t['blob_bytes']} bytes"
              for name, t in sorted(value["types"].items())]
    if value.get("last_compaction"):
        last = value["last_compaction"]
        lines.append(f"last compaction {last['id']}: {last['bytes_before']} -> {last['bytes_after']} bytes")
    return "\n".join(lines)

"""Start a private memosd for a benchmark, tied to the benchmark's life."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memos.client import Client

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Linux: the daemon gets SIGTERM when the benchmark dies, however it dies,
    # so an interrupted run never leaves a multi-GB daemon behind.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(data_dir: Path, socket: str, env: dict[str, str] | None = None,
          timeout: float = 60.0) -> subprocess.Popen:
    """memosd on ``data_dir`` and ``socket``, once it answers ``ping``."""
    # The audit signing key and checkpoints of a throwaway store stay beside it, never in ~/.config.
    keys = Path(data_dir).parent
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMOS_DAEMON__LOG_LEVEL": "WARNING",
               "MEMOS_AUDIT__SIGNING_KEY": str(keys / "audit-signing.key"),
               "MEMOS_AUDIT__CHECKPOINT_FILE": str(keys / "audit-checkpoints.jsonl"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "memos.daemon.main", "--data-dir", str(data_dir),
                             "--socket", socket], env=environ, preexec_fn=_die_with_parent)
    probe = Client(socket, timeout=1.0, retries=0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"memosd exited with {proc.returncode}")
            try:
                probe.ping()
                return proc
            except Exception:
                time.sleep(0.1)
    finally:
        probe.close()
    proc.kill()
    raise SystemExit("memosd did not start")

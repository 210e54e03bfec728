"""Running the training process (:mod:`.trainer`) for a job: low priority, progress relayed, killed on cancel."""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memos.errors import Cancelled, InternalError, MemosError, from_wire

log = logging.getLogger("memos.parameter")

_POLL_S = 0.2  # how often a running process is checked for cancellation
_STDERR_TAIL = 2000  # characters of its stderr kept for an error message


def run(request: dict[str, Any], work_dir: Path, nice: int, idle: bool, on_event: Callable[[dict[str, Any]], None],
        should_stop: Callable[[], bool]) -> dict[str, Any]:
    """Run one trainer request; its ``done`` event (raising the error it reported, or Cancelled).

    The process runs in a session of its own at niceness ``nice`` (and under
    SCHED_IDLE if ``idle``), which it takes itself before loading anything;
    when ``should_stop`` says so it is killed (its whole process group) and
    Cancelled is raised. Every event before ``done`` goes to ``on_event``.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    stderr_path = work_dir / "stderr.log"
    with stderr_path.open("wb") as stderr:
        command = [sys.executable, "-m", "memos.plugins.parameter.trainer", "--nice", str(nice)]
        proc = subprocess.Popen([*command, "--idle"] if idle else command, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request).encode())
        proc.stdin.close()
        done: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            buffered = b""
            while True:
                if should_stop():
                    raise Cancelled("the job was cancelled")
                if not sel.select(_POLL_S):
                    continue
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    if event.get("event") == "done":
                        done = event
                    elif event.get("event") == "error":
                        error = event
                    else:
                        on_event(event)
        rc = proc.wait()
        if error is not None:
            raise from_wire(str(error.get("code", "internal")), str(error.get("message", "")),
                            error.get("details") or {})
        if rc != 0 or done is None:
            tail = stderr_path.read_text(errors="replace")[-_STDERR_TAIL:]
            raise InternalError(f"the training process ended with status {rc}: {tail}", status=rc)
        return done
    except MemosError:
        raise
    except (OSError, ValueError) as exc:  # a process that could not start, or wrote what is not JSON
        raise InternalError(f"the training process failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End the process and whatever it started; a no-op once it has exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()

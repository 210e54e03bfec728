"""One agent of the crash harness (tests/test_crash_harness.py), in a process of its own.

Usage: ``python crash_agent.py CONFIG_JSON``. The config names the daemon's socket, the agent's
name and token, the shared cube, the agent's private cube (which it creates), a control folder,
a seed and a log file.

The agent works in rounds. Round r starts when the file ``go-r`` appears in the control folder;
it then adds to the shared cube, and adds to, updates and deletes in its private cube, until a
request fails (the daemon was killed). It logs ``{"down": r}`` and waits for ``go-(r+1)``. A
file ``stop`` ends it.

Every line of the log is written and flushed as it happens, one JSON object a line:
``{"try": [op, cube, id, text]}`` before a request, ``{"ack": [op, cube, id, text, version]}``
once its reply has come (only then is a write acknowledged). With ``early_ack`` (the harness
broken on purpose) the agent only adds, and writes each ack line, without id or version, before
the request is sent.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from memos.client import Client
from memos.errors import MemosError, NotFound


def main() -> None:
    cfg = json.loads(sys.argv[1])
    ctl = Path(cfg["ctl"])
    rng = random.Random(cfg["seed"])
    name, shared, private = cfg["name"], cfg["shared"], cfg["private"]
    parent = os.getppid()
    log = open(cfg["log"], "a", buffering=1)

    def emit(kind: str, *fields: object) -> None:
        log.write(json.dumps({kind: list(fields)}) + "\n")

    def wait_for(path: Path) -> bool:
        """Until ``path`` exists (True), or ``stop`` does or the harness is gone (False)."""
        while not path.exists():
            if (ctl / "stop").exists() or os.getppid() != parent:
                return False
            time.sleep(0.005)
        return not (ctl / "stop").exists()

    mine: list[str] = []  # ids in the private cube, acknowledged and not deleted
    seq = 0
    round_ = 0
    while wait_for(ctl / f"go-{round_}"):
        client = Client(cfg["socket"], token=cfg["token"], timeout=10, retries=0)
        try:
            if round_ == 0:
                client.cube_create(private)
                emit("ready")
            while not (ctl / "stop").exists():
                seq += 1
                # A token of letters and digits only: one term, found by an exact search.
                text = f"{name} round {round_} note {seq} tok{name}x{seq}"
                roll = 0.0 if cfg.get("early_ack") else rng.random()  # broken: adds only
                if roll < 0.5 or not mine:
                    cube, op, target = (shared if roll < 0.35 else private), "add", None
                elif roll < 0.85:
                    cube, op, target = private, "update", rng.choice(mine)
                else:
                    cube, op, target = private, "delete", rng.choice(mine)
                    text = None
                emit("try", op, cube, target, text)
                if cfg.get("early_ack") and op == "add":
                    emit("ack", op, cube, None, text, None)  # broken on purpose: before the reply
                if op == "add":
                    mem = client.add(cube, text)
                elif op == "update":
                    mem = client.update(cube, target, text=text)
                else:
                    mine.remove(target)  # from now on unknown, if the reply never comes
                    mem = client.delete(cube, target)
                if op == "add" and cube == private:
                    mine.append(mem.id)
                emit("ack", op, cube, mem.id, text, mem.version)
        except NotFound as exc:  # a harness bug, not a crash: say so and stop
            emit("error", repr(exc))
            return
        except MemosError:
            pass  # the daemon is gone: the request in flight was never acknowledged
        finally:
            client.close()
        emit("down", round_)
        round_ += 1


if __name__ == "__main__":
    main()

"""Long-running background work (index rebuilds, re-embedding) and its progress."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from memos.ids import new_id

log = logging.getLogger("memosd.jobs")


@dataclass
class Progress:
    """One job: what, on which cube, how far."""

    kind: str
    cube: str | None
    total: int
    id: str = field(default_factory=new_id)
    done: int = 0
    state: str = "running"  # running | done | failed
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def advance(self, n: int = 1) -> None:
        self.done += n

    def finish(self) -> None:
        self.state, self.finished, self.done = "done", time.time(), max(self.done, self.total)
        log.info("job finished", extra={"job": self.id, "kind": self.kind, "cube": self.cube,
                                        "seconds": round(self.finished - self.started, 3)})

    def fail(self, exc: BaseException) -> None:
        self.state, self.finished, self.error = "failed", time.time(), f"{type(exc).__name__}: {exc}"
        log.error("job failed", extra={"job": self.id, "kind": self.kind, "cube": self.cube, "error": self.error})

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


class Jobs:
    """Every job since start-up (finished ones are kept, newest last, up to ``keep``)."""

    def __init__(self, keep: int = 200) -> None:
        self._jobs: list[Progress] = []
        self._lock = threading.Lock()
        self.keep = keep

    def start(self, kind: str, cube: str | None, total: int) -> Progress:
        job = Progress(kind=kind, cube=cube, total=total)
        with self._lock:
            self._jobs.append(job)
            finished = [j for j in self._jobs if j.state != "running"]
            while len(self._jobs) > self.keep and finished:
                self._jobs.remove(finished.pop(0))
        log.info("job started", extra={"job": job.id, "kind": kind, "cube": cube, "total": total})
        return job

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.to_wire() for j in self._jobs]

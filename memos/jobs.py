"""Long-running background work (index rebuilds, re-embedding, model builds): progress and cancellation.

A job is started by whoever owns the work (a memory type, through its
services) and runs on the shared model executor. It reports progress with
:meth:`Progress.advance` and checks :meth:`Progress.check` between steps:
once a client has asked to cancel it, ``check`` raises :class:`Cancelled`
and the job ends in state ``cancelled``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Literal

from typing_extensions import TypedDict

from .errors import Cancelled, NotFound
from .ids import new_id

log = logging.getLogger("memos.jobs")

JobState = Literal["running", "done", "failed", "cancelled"]


class JobInfo(TypedDict):
    """A job as clients see it (``Progress.to_wire``)."""

    id: str
    kind: str
    cube: str | None
    total: int
    done: int
    state: JobState
    error: str | None
    started: float
    finished: float | None
    detail: dict[str, Any]


@dataclass
class Progress:
    """One job: what, on which cube, how far."""

    kind: str
    cube: str | None
    total: int
    id: str = field(default_factory=new_id)
    done: int = 0
    state: JobState = "running"
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # what the job reports besides a count (loss, ...)
    cancel_requested: bool = False
    # The job's thread reports while others read: detail changes and copies are made under it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _notify: Callable[[Progress, bool], None] = field(default=lambda job, final: None, repr=False, compare=False)

    def advance(self, n: int = 1, **detail: Any) -> None:
        with self._lock:
            self.done += n
            self.detail.update(detail)
        self._notify(self, False)

    def check(self) -> None:
        """Raise Cancelled if a client asked to cancel this job: call it between steps."""
        if self.cancel_requested:
            raise Cancelled(f"job {self.id} was cancelled", job=self.id)

    def finish(self) -> None:
        self.state, self.finished, self.done = "done", time.time(), max(self.done, self.total)
        log.info("job finished", extra={"job": self.id, "kind": self.kind, "cube": self.cube,
                                        "seconds": round(self.finished - self.started, 3)})
        self._notify(self, True)

    def fail(self, exc: BaseException) -> None:
        self.finished = time.time()
        if isinstance(exc, Cancelled):
            self.state = "cancelled"
            log.info("job cancelled", extra={"job": self.id, "kind": self.kind, "cube": self.cube})
        else:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("job failed", extra={"job": self.id, "kind": self.kind, "cube": self.cube,
                                           "error": self.error})
        self._notify(self, True)

    def to_wire(self) -> dict[str, Any]:
        with self._lock:
            return {"id": self.id, "kind": self.kind, "cube": self.cube, "total": self.total, "done": self.done,
                    "state": self.state, "error": self.error, "started": self.started, "finished": self.finished,
                    "detail": dict(self.detail)}


class Jobs:
    """Every job since start-up (finished ones are kept, newest last, up to ``keep``).

    Listeners (the daemon's events socket) hear of each job when it starts,
    as it advances (at most once per ``interval`` seconds a job) and when it ends.
    """

    def __init__(self, keep: int = 200, interval: float = 0.5) -> None:
        self._jobs: list[Progress] = []
        self._lock = threading.Lock()
        self.keep = keep
        self.interval = interval
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._told: dict[str, float] = {}  # job id -> when listeners last heard of it

    def listen(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(job.to_wire())`` on the job's own thread as jobs start, advance and end."""
        self._listeners.append(fn)

    def _notify(self, job: Progress, final: bool) -> None:
        if not self._listeners:
            return
        now = time.monotonic()
        with self._lock:
            if not final and now - self._told.get(job.id, -self.interval) < self.interval:
                return
            if final:
                self._told.pop(job.id, None)
            else:
                self._told[job.id] = now
        wire = job.to_wire()
        for fn in self._listeners:
            try:
                fn(wire)
            except Exception:  # a listener's failure must not fail the job
                log.exception("job listener failed", extra={"job": job.id})

    def start(self, kind: str, cube: str | None, total: int, detail: dict[str, Any] | None = None) -> Progress:
        """Record a job that the caller runs itself, reporting through the returned Progress."""
        job = Progress(kind=kind, cube=cube, total=total, detail=dict(detail or {}), _notify=self._notify)
        with self._lock:
            self._jobs.append(job)
            finished = [j for j in self._jobs if j.state != "running"]
            while len(self._jobs) > self.keep and finished:
                self._jobs.remove(finished.pop(0))
        log.info("job started", extra={"job": job.id, "kind": kind, "cube": cube, "total": total})
        self._notify(job, False)
        return job

    def run(self, executor: Executor, kind: str, cube: str | None, total: int,
            work: Callable[[Progress], Any], detail: dict[str, Any] | None = None) -> tuple[Progress, Future]:
        """Start ``work(progress)`` on ``executor`` as a job; it finishes, fails or is cancelled by itself.

        ``detail``: what the job says about itself from the start (set before it runs).
        """
        job = self.start(kind, cube, total, detail)

        def run() -> Any:
            try:
                job.check()  # cancelled while queued
                result = work(job)
            except BaseException as exc:
                job.fail(exc)
                raise
            job.finish()
            return result

        try:
            return job, executor.submit(run)
        except RuntimeError as exc:  # the executor is shut down: the job never runs
            job.fail(exc)
            raise

    def get(self, job_id: str) -> Progress:
        with self._lock:
            for job in self._jobs:
                if job.id == job_id:
                    return job
        raise NotFound(f"no job {job_id}", job=job_id)

    def cancel(self, job_id: str) -> Progress:
        """Ask a running job to stop at its next check; a finished job is left as it is."""
        job = self.get(job_id)
        job.cancel_requested = job.state == "running"
        return job

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.to_wire() for j in self._jobs]


class JobGroup:
    """The jobs one owner (a memory type's builder) starts: all cancelled when the owner stops.

    Work checks :meth:`check` between steps: it raises Cancelled once a
    client cancelled the job or the owner is stopping.
    """

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: list[Progress] = []

    def run(self, executor: Executor, kind: str, cube: str | None, total: int,
            work: Callable[[Progress], Any], detail: dict[str, Any] | None = None) -> Progress:
        job, _ = self.jobs.run(executor, kind, cube, total, work, detail)
        with self._lock:
            self._running = [j for j in self._running if j.state == "running"] + [job]
        return job

    def stopped(self, job: Progress) -> bool:
        return job.cancel_requested or self.stopping.is_set()

    def check(self, job: Progress) -> None:
        job.check()
        if self.stopping.is_set():
            raise Cancelled("the daemon is stopping", job=job.id)

    def stop(self) -> None:
        """Ask every running job of the group to stop (each stops at its next check)."""
        self.stopping.set()
        with self._lock:
            running = [j for j in self._running if j.state == "running"]
        for job in running:
            self.jobs.cancel(job.id)

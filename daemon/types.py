"""The memory types inside memosd: found by entry point, started with their services, stopped in order.

Nothing here knows a type by name: every registered type is loaded,
instantiated, given :class:`memos.services.TypeServices` and driven through
the contract of :mod:`memos.memtypes`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from memos.api import Memos
from memos.config import Settings, type_settings
from memos.errors import MemosError
from memos.governance import Governance
from memos.memtypes import MemoryType, load_types
from memos.services import TypeServices
from memos.storage import StoreOptions
from memos.writes import Write

from .prepare import PrepareStages, Stage
from .writer import Job, wait_for

log = logging.getLogger("memosd.types")


class MemoryTypes:
    """Every registered memory type, the store they share, and the executor for their model work."""

    def __init__(self, settings: Settings, data_dir: Path) -> None:
        classes = load_types()
        self.types: dict[str, MemoryType] = {name: cls() for name, cls in classes.items()}
        self.memos = Memos(data_dir, options=StoreOptions(map_size=settings.store.map_size),
                           limits=settings.limits, types=self.types,
                           governance=Governance.load(settings.daemon.governance),
                           retention=settings.retention, storage=settings.storage)
        # One thread for all model work: two models computing at once on a small
        # machine would only slow each other (and the requests) down.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="memosd-model")
        self.services = {
            name: TypeServices(self.memos, name, type_settings(settings, classes[name]),
                               data_dir / "types" / name, self.memos.jobs, self.executor)
            for name in self.types
        }
        self.stages: PrepareStages | None = None
        self._commits = threading.Lock()

    def start(self, commit: Callable[[Job], None], fail: Callable[[Job, MemosError], None]) -> None:
        """Start each type, then the prepare stages that feed ``commit`` (the writer)."""
        routes = self.memos.routes()
        for services in self.services.values():
            services.attach(self._through(commit), routes)
        for name, memtype in self.types.items():
            memtype.start(self.services[name])
        self.stages = PrepareStages([
            Stage(memtype, self.services[name].rows_in, commit, fail)
            for name, memtype in self.types.items() if memtype.prepares
        ])
        self.stages.start()

    @staticmethod
    def _through(commit: Callable[[Job], None]) -> Callable[[Write], Any]:
        """How a type's thread makes a write durable: through the writer, waiting for its reply."""
        return functools.partial(wait_for, commit)

    def prepares(self, op: str) -> bool:
        return self.stages is not None and self.stages.wants(op)

    def prepare(self, op: str, args: Any, job: Job) -> None:
        assert self.stages is not None
        self.stages.submit(op, args, job)

    def after_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        """Called by the writer after each commit that changed a cube, and by the follower after
        other daemons' commits: one at a time, so that each type sees them in one order."""
        with self._commits:
            self._after_commit(cube, version, memory_ids)

    def _after_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        for memtype in self.types.values():
            try:
                memtype.after_commit(cube, version, memory_ids)
            except Exception:  # one type's derived state must not fail another's, nor the reply
                log.exception("after_commit failed", extra={"type": memtype.name, "cube": cube})

    def stop(self) -> None:
        """Hand writes being prepared to the writer, stop the types' own work, then model work."""
        if self.stages is not None:
            self.stages.stop()
        for memtype in self.types.values():
            try:  # one type's failure must not leave the others running, nor the store open
                memtype.stop()
            except Exception:
                log.exception("stopping memory type failed", extra={"type": memtype.name})
        self.executor.shutdown(wait=True)

    def close(self) -> None:
        """After the writer's last commit: each type saves its derived state."""
        for memtype in self.types.values():
            try:
                memtype.close()
            except Exception:
                log.exception("closing memory type failed", extra={"type": memtype.name})

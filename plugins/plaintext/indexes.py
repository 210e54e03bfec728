"""The search index of every cube: kept up to date after commits, saved, loaded, rebuilt.

LMDB stays the source of truth; each cube's :class:`HybridIndex` is derived.
It is saved at shutdown into ``state_dir/<cube>/`` with a manifest naming the
cube version and embedder it reflects, loaded at start-up when the manifest
still names the cube's version and embedder, and rebuilt from the store
otherwise, as a background job (``build_index``: progress, cancellable).

One **indexer thread** applies every change to the indexes, in commit order:
commits queued by :meth:`Indexes.after_commit` (the writer must not wait for
HNSW insertion), and indexes that a load or a build has finished
(``install``). A build reads the cube at some version V while commits go on;
the indexer keeps the commits it sees meanwhile and, when installing the
built index, applies those after V, so no commit is lost and none is applied
out of order. During a rebuild of a working index (``reindex``) the old one
keeps serving and keeps being updated.

Read-your-writes: a search waits until its cube's index reflects the version
it read (:meth:`Indexes.index_for`); backpressure keeps the indexer
at most ``max_index_lag`` memories behind the writer, so that wait is short.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from memos.errors import Unavailable
from memos.jobs import Progress
from memos.memtypes import Services

from .retrieval import Doc, HybridIndex, IndexCorruptError, RetrievalConfig, doc_for
from .settings import SearchSettings
from .vectors import NAME, Vectors

log = logging.getLogger("memosd.search")

_MANIFEST = "manifest.json"
_BUILD_CHUNK = 4096  # memories upserted into a new index at once


def searchable(mem: Any) -> bool:
    """A live plaintext memory with text (a Memory model or its plain form)."""
    if isinstance(mem, dict):
        return mem.get("type") == NAME and bool(mem.get("text")) and mem.get("status") != "deleted"
    return mem.type == NAME and bool(mem.text) and mem.status != "deleted"


def doc(mem: Any) -> Doc:
    if isinstance(mem, dict):
        return doc_for(mem["id"], mem.get("text") or "", mem.get("metadata") or {}, mem["created_at"])
    return doc_for(mem.id, mem.text or "", mem.metadata, mem.created_at)


@dataclass
class _Cube:
    """What the indexer knows of one cube."""

    index: HybridIndex | None = None  # None: being built for the first time, or its build failed
    version: int = -1  # the cube version ``index`` reflects
    ready: threading.Event = field(default_factory=threading.Event)  # set once there is an index or a failure
    building: bool = False  # a load or build is under way: the indexer keeps commits for it
    pending: list[tuple[int, list[str]]] = field(default_factory=list)
    job: Progress | None = None  # the build under way


def _building(st: _Cube) -> None:
    """A build of this cube starts: keep commits for it; without an index, searches wait for it."""
    st.building, st.pending = True, []
    if st.index is None:
        st.ready.clear()


class Indexes:
    def __init__(self, services: Services, settings: SearchSettings, vectors: Vectors) -> None:
        self.services = services
        self.settings = settings
        self.vectors = vectors
        self._cubes: dict[str, _Cube] = {}
        self._lock = threading.Lock()  # guards _cubes and each _Cube's fields but version
        self._caught_up = threading.Condition()  # guards versions and the lag
        self._lag = 0  # memories committed but not yet through the indexer
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="memosd-indexer", daemon=True)
        self._save_lock = threading.Lock()
        self._stopping = threading.Event()

    def config(self) -> RetrievalConfig:
        return RetrievalConfig(ann_threshold=self.settings.ann_threshold)

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def open_all(self) -> None:
        """Load or build the index of every cube (on the model executor, once the embedder loaded)."""
        for cube in self.services.cubes():
            if self._stopping.is_set():
                return
            if self._claim(cube):
                self._open(cube)

    def stop(self) -> None:
        """Stop loading, and cancel builds under way: what they embedded is stored, the next start resumes."""
        self._stopping.set()
        with self._lock:
            jobs = [st.job for st in self._cubes.values() if st.job is not None]
        for job in jobs:
            try:
                self.services.jobs.cancel(job.id)
            except Exception:  # already gone from the list: nothing to cancel
                pass

    def close(self) -> None:
        """Apply the last commits and save every index (after the writer has stopped)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        with self._lock:
            cubes = [(name, st.index, st.version) for name, st in self._cubes.items() if st.index is not None]
        for name, index, version in cubes:
            self._save(name, index, version)

    # -- commits --------------------------------------------------------

    def after_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        """Queue a commit for the indexer; wait first while the indexer is too far behind."""
        if not self.vectors.enabled:
            return  # search is off: nothing derived to maintain
        if self.vectors.loaded is not None:
            self._track(cube, version)  # so that a search reading this version waits for the right index
        with self._caught_up:
            # Backpressure: a bulk load may not run further ahead of the index than this,
            # so a search never waits long for the writes it must see.
            self._caught_up.wait_for(lambda: self._lag < self.settings.max_index_lag)
            self._lag += len(memory_ids)
        self._queue.put(("commit", cube, version, list(memory_ids)))

    def index_for(self, cube: str, version: int) -> HybridIndex:
        """The index of ``cube`` once it reflects ``version`` (read-your-writes), waiting while it loads or builds.

        The index is taken only once it is current: a rebuilt index may have
        replaced the one there was when the wait began.
        """
        self.vectors.model  # noqa: B018  (Unavailable rather than a build that cannot run)
        with self._lock:
            st = self._cubes.get(cube)
            if st is None and version == 0:  # a new cube: nothing to build
                st = self._cubes[cube] = self._empty()
        if st is None:
            if self._claim(cube):
                self._submit_open(cube)
            st = self._cubes[cube]
        if not st.ready.wait(self.settings.ready_timeout_s):
            raise Unavailable(f"the index of cube {cube!r} is being built; see `memosctl jobs`", cube=cube)
        with self._caught_up:
            if not self._caught_up.wait_for(lambda: st.version >= version or st.index is None,
                                            self.settings.ready_timeout_s):
                raise Unavailable(f"the index of cube {cube!r} is behind; retry shortly", cube=cube)
            index = st.index
        if index is None:
            if not st.ready.is_set():
                raise Unavailable(f"the index of cube {cube!r} is being rebuilt; see `memosctl jobs`", cube=cube)
            raise Unavailable(f"the index of cube {cube!r} failed to build; see `memosctl jobs`", cube=cube)
        return index

    def reindex(self, cube: str) -> Progress:
        """Rebuild the index of ``cube`` from the store in the background; the build's job.

        A working index keeps serving until the new one replaces it; a build
        already under way is returned rather than started twice.
        """
        with self._lock:
            st = self._cubes.get(cube)
            if st is not None and st.building:
                if st.job is None:  # a saved index is being loaded: its commits are kept for it
                    raise Unavailable(f"the index of cube {cube!r} is being loaded; retry shortly", cube=cube)
                return st.job
            if st is None:
                st = self._cubes[cube] = _Cube()
            _building(st)
        job = self._build(cube)
        if job is None:
            raise Unavailable("memosd is shutting down", cube=cube)
        return job

    # -- the indexer thread ---------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, cube, *rest = item
            if kind == "commit":
                version, memory_ids = rest
                try:
                    self._commit(cube, version, memory_ids)
                except Exception:
                    log.exception("index update failed; rebuilding", extra={"cube": cube})
                    self._broken(cube)
                finally:  # the writer may be waiting on the lag: always release it
                    with self._caught_up:
                        self._lag -= len(memory_ids)
                        self._caught_up.notify_all()
            elif kind == "install":
                index, version = rest
                try:
                    self._install(cube, index, version)
                except Exception:
                    log.exception("index update failed; rebuilding", extra={"cube": cube})
                    with self._lock:  # no build is under way any more
                        self._cubes[cube].building, self._cubes[cube].job = False, None
                    self._broken(cube)
            else:
                self._failed(cube)

    def _commit(self, cube: str, version: int, memory_ids: list[str]) -> None:
        if self.vectors.loaded is None:
            return  # no model yet: the index is built from the store once it loads
        st = self._track(cube, version)
        with self._lock:
            if st.building:
                st.pending.append((version, memory_ids))
            index = st.index
        if index is not None:  # also while a rebuild runs: the old index serves meanwhile
            self._apply(cube, st, index, version, memory_ids)

    def _track(self, cube: str, version: int) -> _Cube:
        """The state of ``cube``, which a commit made ``version``: opened if unknown, rebuilt if its build failed.

        Called on the writer thread (after_commit) and again on the indexer's; the first call acts.
        """
        open_it = build_it = False
        with self._lock:
            st = self._cubes.get(cube)
            if st is None:
                if version == 1:  # the first commit of a new cube: its index starts empty
                    st = self._cubes[cube] = self._empty()
                else:  # a cube not opened yet: load or build it, keeping the commits from now on
                    st = self._cubes[cube] = _Cube(building=True)
                    open_it = True
            elif not st.building and st.index is None:  # its last build failed: try again
                _building(st)
                build_it = True
        if open_it:
            self._submit_open(cube)
        if build_it:
            self._build(cube)
        return st

    def _apply(self, cube: str, st: _Cube, index: HybridIndex, version: int, memory_ids: Sequence[str]) -> None:
        if memory_ids:
            with self.services.system_snapshot(cube) as snap:
                mems = snap.get_many(memory_ids)
            keep = [m for m in mems.values() if searchable(m)]
            gone = [m for m in memory_ids if m not in mems or not searchable(mems[m])]
            if keep:
                docs = [doc(m) for m in keep]
                index.upsert(docs, self.vectors.vectors_for([d.key for d in docs], cube=cube))
            if gone:
                index.remove(gone)
        if index is st.index:
            with self._caught_up:
                st.version = max(st.version, version)
                self._caught_up.notify_all()

    def _install(self, cube: str, index: HybridIndex, version: int) -> None:
        """Put a loaded or built index (reflecting ``version``) in place, with the commits made since."""
        with self._lock:
            st = self._cubes[cube]
            pending, st.pending = st.pending, []
        for v, ids in pending:
            if v > version:
                self._apply(cube, st, index, v, ids)
                version = v
        with self._lock:
            st.index, st.building, st.job = index, False, None
        with self._caught_up:
            st.version = version
            self._caught_up.notify_all()
        st.ready.set()

    def _failed(self, cube: str) -> None:
        """A load or build ended without an index: a working index stays, else searches are told."""
        with self._lock:
            st = self._cubes[cube]
            st.building, st.pending, st.job = False, [], None
        st.ready.set()

    def _broken(self, cube: str) -> None:
        """An index missed a change: serve nothing rather than something silently partial, and rebuild."""
        with self._lock:
            st = self._cubes.get(cube)
            if st is None:
                return
            st.index = None
            st.ready.clear()
            rebuild = not st.building  # else a build under way installs a whole index anyway
            if rebuild:
                _building(st)
        with self._caught_up:  # searches waiting for this index to catch up wait for the new one
            self._caught_up.notify_all()
        if rebuild:
            self._build(cube)

    # -- loading and building -------------------------------------------

    def _empty(self) -> _Cube:
        st = _Cube(index=HybridIndex(self.vectors.model.dim, self.config()), version=0)
        st.ready.set()
        return st

    def _claim(self, cube: str) -> bool:
        """Mark ``cube`` as being opened; False if it is known already."""
        with self._lock:
            if cube in self._cubes:
                return False
            self._cubes[cube] = _Cube(building=True)
            return True

    def _submit_open(self, cube: str) -> None:
        try:
            if self._stopping.is_set():
                raise RuntimeError("stopping")
            self.services.executor.submit(self._open, cube)
        except RuntimeError:  # shutting down: the next start opens it
            self._queue.put(("failed", cube))

    def _open(self, cube: str) -> None:
        """Load the saved index of ``cube`` if it is current, else build it (the cube is claimed)."""
        try:
            with self.services.system_snapshot(cube) as snap:
                version = snap.version
            identity = self.vectors.model.identity
        except Exception:
            log.exception("opening an index failed", extra={"cube": cube})
            self._queue.put(("failed", cube))
            return
        if version == 0:  # a cube without commits holds nothing: no job, no files
            self._queue.put(("install", cube, HybridIndex(self.vectors.model.dim, self.config()), 0))
            return
        folder = self.services.state_dir / cube
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
            if manifest == {"version": version, "embedder": identity}:
                index = HybridIndex.load(folder / "index")
                self._queue.put(("install", cube, index, version))
                log.info("index loaded", extra={"cube": cube, "docs": len(index), "version": version})
                return
            log.info("index is stale; rebuilding", extra={"cube": cube, "saved": manifest, "version": version})
        except FileNotFoundError:
            log.info("no saved index; building", extra={"cube": cube})
        except (IndexCorruptError, ValueError, OSError) as exc:
            log.warning("saved index unreadable; rebuilding", extra={"cube": cube, "error": str(exc)})
        self._build(cube)

    def _build(self, cube: str) -> Progress | None:
        """Start the build of ``cube``'s index as a job (the cube is marked building)."""
        def work(job: Progress) -> tuple[HybridIndex, int]:
            with self.services.system_snapshot(cube) as snap:  # one pass, keeping only the small Doc of each memory
                version = snap.version
                docs = [doc(m) for m in snap.memories(type=NAME) if searchable(m)]
            job.total = len(docs)
            index = HybridIndex(self.vectors.model.dim, self.config())
            for start in range(0, len(docs), _BUILD_CHUNK):
                job.check()
                chunk = docs[start:start + _BUILD_CHUNK]
                index.upsert(chunk, self.vectors.vectors_for([d.key for d in chunk], job, cube=cube))
            self._save(cube, index, version)
            return index, version

        def done(future: Future) -> None:
            if not future.cancelled() and future.exception() is None:
                index, version = future.result()
                self._queue.put(("install", cube, index, version))
            else:
                self._queue.put(("failed", cube))

        try:
            if self._stopping.is_set():
                raise RuntimeError("stopping")
            job, future = self.services.jobs.run(self.services.executor, "build_index", cube, 0, work)
        except RuntimeError:  # shutting down: the next start builds it
            self._queue.put(("failed", cube))
            return None
        with self._lock:
            st = self._cubes[cube]
            if st.building and st.job is None:
                st.job = job
        future.add_done_callback(done)
        return job

    def _save(self, cube: str, index: HybridIndex, version: int) -> None:
        model = self.vectors.loaded
        if model is None:
            return
        folder = self.services.state_dir / cube
        with self._save_lock:
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                (folder / _MANIFEST).unlink(missing_ok=True)  # no manifest while files change
                index.save(folder / "index")
                (folder / _MANIFEST).write_text(json.dumps({"version": version, "embedder": model.identity}))
            except OSError:
                log.exception("saving index failed", extra={"cube": cube})
                shutil.rmtree(folder, ignore_errors=True)

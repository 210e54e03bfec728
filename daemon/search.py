"""Plaintext search in memosd: embeddings, per-cube hybrid indexes, filters.

LMDB stays the source of truth. Vectors are stored there too, addressed by
(embedder identity, sha256 of the search key), so a rollback or a re-added
text never needs the model again and two embedders never mix. The in-memory
:class:`~memos.retrieval.HybridIndex` of each cube is derived: saved on
shutdown, loaded on start-up when its manifest names the cube's current
version and embedder, rebuilt (as a background job) otherwise.

Model work never runs on the socket loop: writes that need vectors are
embedded on the model thread before they reach the writer, and the writer
tells this service what each commit changed so searches see every
acknowledged write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from memos.retrieval import Doc, HybridIndex, RetrievalConfig, doc_for, key_text

from memos import protocol as p
from memos.api import LOCAL_ADMIN, Actor, Memos, Write
from memos.config import SearchSettings
from memos.errors import (
    InternalError,
    InvalidRequest,
    MemosError,
    ModelMismatch,
    Unavailable,
)
from memos.models import Cube, Memory, MemoryType, Status, plain

log = logging.getLogger("memosd.search")

_MANIFEST = "manifest.json"
# Indexes of past versions kept for the queries that follow the first: at most this many, holding
# at most this many memories together (~5 kB each in an exact index, plus the records).
_PAST_INDEXES = 4
_PAST_DOCS = 50_000


def _searchable(mem: Memory) -> bool:
    return mem.type is MemoryType.plaintext and bool(mem.text) and mem.status is not Status.deleted


def _doc(mem: Memory) -> Doc:
    return doc_for(mem.id, mem.text or "", mem.metadata, mem.created_at)


class SearchService:
    def __init__(self, memos: Memos, settings: SearchSettings, index_dir: Path, jobs: Any) -> None:
        self.memos = memos
        self.settings = settings
        self.index_dir = index_dir
        self.jobs = jobs
        self.model = ThreadPoolExecutor(1, thread_name_prefix="memosd-model")
        # Query embeddings run here while the searching thread scores words.
        self._queries = ThreadPoolExecutor(2, thread_name_prefix="memosd-query")
        self._embedder: Any = None
        self._embedder_ready = threading.Event()
        self._embedder_error: BaseException | None = None
        self._indexes: dict[str, HybridIndex] = {}
        self._versions: dict[str, int] = {}
        self._ready: dict[str, threading.Event] = {}
        self._pending: dict[str, list[tuple[int, list[str]]]] = {}
        self._past: OrderedDict[tuple[Any, ...], tuple[HybridIndex, dict[str, dict[str, Any]]]] = OrderedDict()
        self._lock = threading.Lock()
        self._db = memos.store.db["vectors"]
        self._queue: queue.Queue[Any] = queue.Queue()
        self._embed_thread = threading.Thread(target=self._embed_loop, name="memosd-embed", daemon=True)
        self._embed_thread.start()
        self._commits: queue.Queue[Any] = queue.Queue()
        self._caught_up = threading.Condition()
        self._lag = 0  # memories committed but not yet in an index
        self._indexer = threading.Thread(target=self._index_loop, name="memosd-indexer", daemon=True)
        self._indexer.start()

    # -- lifecycle ------------------------------------------------------

    def start(self) -> Future:
        """Load the embedder and every cube's index in the background."""
        return self.model.submit(self._boot)

    @property
    def enabled(self) -> bool:
        return self.settings.embedder != "none"

    def _boot(self) -> None:
        if not self.enabled:
            self._embedder_error = Unavailable("search is turned off (search.embedder = 'none')")
            self._embedder_ready.set()
            return
        try:
            from memos.plugins import embedders

            self._embedder = embedders.load(self.settings.embedder, **self.settings.embedder_options)
            self._id_hash = hashlib.sha256(self._embedder.identity.encode()).digest()[:8]
            log.info("embedder loaded", extra={"embedder": self._embedder.identity})
        except BaseException as exc:  # the daemon keeps serving everything but search
            self._embedder_error = exc
            log.exception("embedder failed to load")
            return
        finally:
            self._embedder_ready.set()
        with self.memos.store.read() as txn:
            cubes = [c.name for c in self.memos.ledger.cubes(txn)]
        for cube in cubes:
            self._open(cube)

    def close(self) -> None:
        """Apply the last commits and save every index (after :meth:`stop` and the writer)."""
        self._commits.put(None)
        self._indexer.join()
        for cube in list(self._indexes):
            self._save(cube)

    @property
    def embedder(self) -> Any:
        if not self._embedder_ready.wait(self.settings.ready_timeout_s):
            raise Unavailable("the embedder is still loading; retry shortly")
        if not self.enabled:
            raise Unavailable("search is turned off (search.embedder = 'none')")
        if self._embedder is None:
            raise Unavailable(f"the embedder {self.settings.embedder!r} failed to load: {self._embedder_error}")
        return self._embedder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(list(texts))

    # -- vectors in LMDB ------------------------------------------------

    def _vkey(self, key: str) -> bytes:
        return self._id_hash + hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    def _stored(self, txn: lmdb.Transaction, keys: Sequence[str]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for key in keys:
            raw = txn.get(self._vkey(key), db=self._db)
            out.append(None if raw is None else np.frombuffer(raw, dtype=np.float32))
        return out

    def _vectors_for(self, keys: Sequence[str], job: Any = None) -> np.ndarray:
        """Vectors of ``keys``: stored ones read, missing ones embedded and stored."""
        with self.memos.store.read() as txn:
            found = self._stored(txn, keys)
        missing = [i for i, v in enumerate(found) if v is None]
        if job is not None:
            job.advance(len(keys) - len(missing))
        for start in range(0, len(missing), 256):
            rows = missing[start:start + 256]
            vecs = self.embed([keys[i] for i in rows])
            self.memos.store.write(lambda txn: self._put(txn, [keys[i] for i in rows], vecs))
            for i, vec in zip(rows, vecs):
                found[i] = vec
            if job is not None:
                job.advance(len(rows))
        if not keys:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.stack(found).astype(np.float32, copy=False)

    def _put(self, txn: lmdb.Transaction, keys: Sequence[str], vecs: np.ndarray) -> None:
        for key, vec in zip(keys, vecs):
            txn.put(self._vkey(key), np.asarray(vec, dtype=np.float32).tobytes(), db=self._db, overwrite=False)

    # -- the write path -------------------------------------------------

    def embed_then(self, op: str, args: Any, write: Write, done: Callable[[Write | MemosError], None]) -> None:
        """Queue a write for embedding; ``done`` gets the write to commit, or the error."""
        if not self.enabled:
            done(write)
            return
        self._queue.put((op, args, write, done))

    def _embed_loop(self) -> None:
        """Embed queued writes together: one batched forward pass serves many requests."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 256:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            try:
                for done, result in zip([b[3] for b in batch], self.prepare([b[:3] for b in batch])):
                    done(result)
            except Exception as exc:  # a bug: fail the batch, keep the loop alive
                log.exception("embedding writes failed")
                for *_, done in batch:
                    done(InternalError(f"embedding failed: {type(exc).__name__}"))

    def stop(self) -> None:
        """Finish queued embeddings (handing them to the writer), then stop model work."""
        self._queue.put(None)
        self._embed_thread.join()
        self._queries.shutdown(wait=True)
        self.model.shutdown(wait=True)

    def prepare(self, writes: Sequence[tuple[str, Any, Write]]) -> list[Write | MemosError]:
        """Each write with the vectors of what it stores added to its commit."""
        try:
            self.embedder  # noqa: B018  (waits while the model loads)
        except MemosError:
            # No model: store the memories anyway; their vectors are made when an index is built.
            return [write for _, _, write in writes]
        plans: list[tuple[Write, list[str], list[np.ndarray | None]] | MemosError] = []
        for op, args, write in writes:
            try:
                plans.append((write, *self._keys(op, args)))
            except MemosError as exc:
                plans.append(exc)
        keys = {k for plan in plans if not isinstance(plan, MemosError)
                for k, given in zip(plan[1], plan[2]) if given is None}
        with self.memos.store.read() as txn:
            stored = {k for k, v in zip(keys, self._stored(txn, list(keys))) if v is not None}
        todo = sorted(keys - stored)
        try:
            made = dict(zip(todo, self.embed(todo))) if todo else {}
        except MemosError as exc:
            return [exc] * len(writes)
        return [plan if isinstance(plan, MemosError) else self._with_vectors(plan[0], plan[1], plan[2], made, stored)
                for plan in plans]

    def _keys(self, op: str, args: Any) -> tuple[list[str], list[np.ndarray | None]]:
        """Search keys a write will store, with client-made vectors where given."""
        if op == "add" and args.type == "plaintext" and args.text:
            return [key_text(args.text, args.metadata or {})], [self._client_vector(args, args.embedder)]
        if op == "add_many":
            items = [i for i in args.items if i.type == "plaintext" and i.text]
            return ([key_text(i.text, i.metadata or {}) for i in items],
                    [self._client_vector(i, args.embedder) for i in items])
        if op == "update" and (args.text is not None or args.metadata is not None):
            current = self._current(args.cube, args.id)
            if current is not None and current.type is MemoryType.plaintext:
                text = args.text if args.text is not None else current.text
                metadata = args.metadata if args.metadata is not None else current.metadata
                if text:
                    return [key_text(text, metadata)], [None]
        return [], []

    def _with_vectors(self, write: Write, keys: list[str], given: list[np.ndarray | None],
                      made: dict[str, np.ndarray], stored: set[str]) -> Write:
        fresh = {k: g if g is not None else made[k] for k, g in zip(keys, given) if k not in stored}
        if not fresh:
            return write
        inner = write.fn

        def fn(txn: lmdb.Transaction):
            result = inner(txn)
            self._put(txn, list(fresh), list(fresh.values()))
            return result

        return Write(write.actor, write.op, write.cube, fn, write.request_id)

    def _client_vector(self, item: Any, embedder: str | None) -> np.ndarray | None:
        raw = getattr(item, "vector", None)
        if raw is None:
            return None
        if embedder != self.embedder.identity:
            raise ModelMismatch(
                f"vectors were made by {embedder!r}; this daemon searches with {self.embedder.identity!r}",
                expected=self.embedder.identity, got=embedder,
            )
        if len(raw) != 4 * self.embedder.dim:
            raise InvalidRequest(f"a vector must be {self.embedder.dim} float32 values", field="vector")
        vec = np.frombuffer(raw, dtype=np.float32)
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidRequest("a vector must be finite and non-zero", field="vector")
        return vec / norm

    def _current(self, cube: str, memory_id: str) -> Memory | None:
        try:
            return self.memos.get_many(LOCAL_ADMIN, cube, [memory_id]).get(memory_id)
        except MemosError:
            return None  # the write itself will report the problem

    def on_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        """Called by the writer after each commit: queue the change for the indexer thread.

        Index maintenance (HNSW insertion above all) stays off the writer, so it never
        slows commits down; searches wait until the index has caught up with the cube
        version they read, so every acknowledged write is still visible to them.
        """
        if not self.enabled:
            return  # search is off: nothing derived to maintain
        with self._caught_up:
            # Backpressure: a bulk load may not run further ahead of the index than this,
            # so a search never waits long for the writes it must see.
            self._caught_up.wait_for(lambda: self._lag < self.settings.max_index_lag)
            self._lag += len(memory_ids)
        self._commits.put((cube, version, list(memory_ids)))

    def _index_loop(self) -> None:
        while True:
            item = self._commits.get()
            if item is None:
                return
            cube, version, memory_ids = item
            try:
                self._index_commit(cube, version, memory_ids)
            except Exception:
                log.exception("index update failed; rebuilding", extra={"cube": cube})
                try:
                    self.model.submit(self._rebuild, cube)
                except RuntimeError:  # shutting down: the next start rebuilds the stale index
                    pass
            finally:  # the writer may be waiting on the lag: always release it
                with self._caught_up:
                    self._lag -= len(memory_ids)
                    self._caught_up.notify_all()

    def _index_commit(self, cube: str, version: int, memory_ids: list[str]) -> None:
        if self._embedder is None:
            return  # no model yet: the index is built from the store once it loads
        with self._lock:
            ready = self._ready.get(cube)
            if ready is None:  # a new cube: its index starts empty
                self._indexes[cube] = HybridIndex(self._embedder.dim, self._config())
                self._versions[cube] = 0
                ready = self._ready[cube] = threading.Event()
                ready.set()
            if not ready.is_set():  # a rebuild is running; it applies these when done
                self._pending.setdefault(cube, []).append((version, memory_ids))
                return
        self._apply(cube, version, memory_ids)

    def _wait_until_current(self, cube: str, version: int) -> None:
        """Block until the index of ``cube`` reflects ``version`` (read-your-writes)."""
        with self._caught_up:
            if not self._caught_up.wait_for(lambda: self._versions.get(cube, -1) >= version,
                                            self.settings.ready_timeout_s):
                raise Unavailable(f"the index of cube {cube!r} is behind; retry shortly", cube=cube)

    def _apply(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        if not memory_ids:
            with self._lock:
                self._versions[cube] = max(self._versions.get(cube, 0), version)
            return
        mems = self.memos.get_many(LOCAL_ADMIN, cube, memory_ids)
        keep = [m for m in mems.values() if _searchable(m)]
        gone = [m for m in memory_ids if m not in mems or not _searchable(mems[m])]
        index = self._indexes[cube]
        if keep:
            docs = [_doc(m) for m in keep]
            index.upsert(docs, self._vectors_for([d.key for d in docs]))
        if gone:
            index.remove(gone)
        with self._lock:
            self._versions[cube] = max(self._versions.get(cube, 0), version)

    # -- building and persisting indexes --------------------------------------

    def _config(self) -> RetrievalConfig:
        return RetrievalConfig(ann_threshold=self.settings.ann_threshold)

    def _open(self, cube: str) -> None:
        """Load the saved index of ``cube`` if it is current, else rebuild it."""
        with self._lock:
            event = self._ready.setdefault(cube, threading.Event())
            event.clear()
        with self.memos.store.read() as txn:
            version = self.memos.ledger.cube(txn, cube).version
        folder = self.index_dir / cube
        try:
            manifest = json.loads((folder / _MANIFEST).read_text())
            if manifest == {"version": version, "embedder": self._embedder.identity}:
                index = HybridIndex.load(folder / "index")
                self._finish(cube, index, version)
                log.info("index loaded", extra={"cube": cube, "docs": len(index), "version": version})
                return
            log.info("index is stale; rebuilding", extra={"cube": cube, "saved": manifest, "version": version})
        except FileNotFoundError:
            log.info("no saved index; building", extra={"cube": cube})
        except (ValueError, OSError) as exc:
            log.warning("saved index unreadable; rebuilding", extra={"cube": cube, "error": str(exc)})
        self._rebuild(cube)

    def _rebuild(self, cube: str) -> None:
        docs = []
        with self.memos.store.read() as txn:  # one pass, keeping only the small Doc of each memory
            version = self.memos.ledger.cube(txn, cube).version
            for _, v, state in self.memos.ledger.iter_heads(txn, cube):
                mem = Memory.from_state_bytes(state, v)
                if _searchable(mem):
                    docs.append(_doc(mem))
        job = self.jobs.start("build_index", cube, len(docs))
        try:
            index = HybridIndex(self._embedder.dim, self._config())
            for start in range(0, len(docs), 4096):
                chunk = docs[start:start + 4096]
                index.upsert(chunk, self._vectors_for([d.key for d in chunk], job))
            self._finish(cube, index, version)
            self._save(cube)
            job.finish()
        except BaseException as exc:
            job.fail(exc)
            with self._lock:  # serve nothing rather than something silently partial
                self._ready[cube].set()
                self._indexes.pop(cube, None)
            raise

    def _finish(self, cube: str, index: HybridIndex, version: int) -> None:
        with self._lock:
            self._indexes[cube] = index
            self._versions[cube] = version
            pending = self._pending.pop(cube, [])
        for v, ids in pending:
            if v > version:
                self._apply(cube, v, ids)
        with self._lock:
            self._ready[cube].set()
        with self._caught_up:
            self._caught_up.notify_all()

    def _save(self, cube: str) -> None:
        index = self._indexes.get(cube)
        if index is None or self._embedder is None:
            return
        folder = self.index_dir / cube
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            version = self._versions[cube]
        try:
            (folder / _MANIFEST).unlink(missing_ok=True)  # no manifest while files change
            index.save(folder / "index")
            (folder / _MANIFEST).write_text(json.dumps({"version": version, "embedder": self._embedder.identity}))
        except OSError:
            log.exception("saving index failed", extra={"cube": cube})
            shutil.rmtree(folder, ignore_errors=True)

    def reindex(self, cube: str) -> str:
        """Rebuild a cube's index from LMDB in the background; returns the job's cube."""
        self.embedder  # noqa: B018  (raises while unavailable)
        self.model.submit(self._rebuild, cube)
        return cube

    def _index(self, cube: str) -> HybridIndex:
        with self._lock:
            ready = self._ready.get(cube)
        if ready is None:
            self.embedder  # noqa: B018
            self.model.submit(self._open, cube).result()
            ready = self._ready[cube]
        if not ready.wait(self.settings.ready_timeout_s):
            raise Unavailable(f"the index of cube {cube!r} is being built; see `memosctl jobs`", cube=cube)
        index = self._indexes.get(cube)
        if index is None:
            raise Unavailable(f"the index of cube {cube!r} failed to build; see `memosctl jobs`", cube=cube)
        return index

    # -- search ---------------------------------------------------------------

    def search(self, actor: Actor, a: p.SearchArgs) -> list[dict[str, Any]]:
        cube = self.memos.get_cube(actor, a.cube)  # access check (audited on denial)
        if not a.query.strip():
            raise InvalidRequest("query is empty", field="query")
        self.embedder  # noqa: B018  (raises Unavailable now rather than inside the index)
        embedding = self._queries.submit(self.embed, [a.query])

        def qvec() -> np.ndarray:  # the index asks once its lexical scores are done
            return embedding.result()[0]

        keep = _filter(a)
        if a.at is not None:
            index, mems = self._past_version(actor, cube, a.at)
            allow = {i for i, m in mems.items() if keep(m)}
            hits = index.search(a.query, qvec, a.k, allow=allow)
        else:
            index = self._index(cube.name)
            self._wait_until_current(cube.name, cube.version)
            hits, mems = self._filtered(actor, cube.name, index, a, qvec, keep)
        results = [{"memory": mems[h.id], "score": h.score,
                    "lexical": h.lexical, "dense": h.dense} for h in hits if h.id in mems][: a.k]
        self.memos.record_reads(cube.name, [r["memory"]["id"] for r in results])
        return results

    def _past_version(self, actor: Actor, cube: Cube, at: int) -> tuple[HybridIndex, dict[str, dict[str, Any]]]:
        """An index of the cube's searchable memories as they were at version ``at``, and those memories.

        Built from the store on first use, which is O(n). A past version never
        changes, so the last few are kept: whoever searches one past state
        usually asks more than one question of it. The key names the embedder
        too: its vectors are the index's.
        """
        key = (cube.name, at, self.embedder.identity)
        with self._lock:
            cached = self._past.get(key)
            if cached is not None:
                self._past.move_to_end(key)
                return cached
        found = [m for m in self.memos.list(actor, cube.name, at=at, status=None) if _searchable(m)]
        # Every query of a past version is scored exactly (it passes ``allow``): no HNSW graph to build.
        index = HybridIndex(self.embedder.dim, replace(self._config(), ann_threshold=1 << 62))
        docs = [_doc(m) for m in found]
        if docs:
            index.upsert(docs, self._vectors_for([d.key for d in docs]))
        built = (index, {m.id: plain(m) for m in found})
        if len(docs) <= _PAST_DOCS:
            with self._lock:
                self._past[key] = built
                while len(self._past) > _PAST_INDEXES or sum(len(i) for i, _ in self._past.values()) > _PAST_DOCS:
                    self._past.popitem(last=False)
        return built

    def _filtered(self, actor: Actor, cube: str, index: HybridIndex, a: p.SearchArgs,
                  qvec: Callable[[], np.ndarray],
                  keep: Callable[[dict[str, Any]], bool]):
        """Best hits that pass the filters: oversample first, scan only when that falls short."""
        want = a.k * self.settings.oversample
        hits = index.search(a.query, qvec, want)
        passing: list[Any] = []
        mems: dict[str, dict[str, Any]] = {}
        for start in range(0, len(hits), a.k):  # read k at a time: most searches need only the first k
            page = self.memos.get_many_plain(actor, cube, [h.id for h in hits[start:start + a.k]])
            mems.update(page)
            passing += [h for h in hits[start:start + a.k] if h.id in page and keep(page[h.id])]
            if len(passing) >= a.k:
                return passing, mems
        if len(hits) < want:
            return passing, mems
        allow = {m.id for m in self.memos.list(actor, cube, status=None) if _searchable(m) and keep(plain(m))}
        hits = index.search(a.query, qvec, a.k, allow=allow)
        return hits, self.memos.get_many_plain(actor, cube, [h.id for h in hits])


def _filter(a: p.SearchArgs) -> Callable[[dict[str, Any]], bool]:
    """The search's filters, as a test of a memory in plain form."""
    statuses = {Status.active.value, Status.archived.value} if a.status == "all" else {Status(a.status).value}
    tags = set(a.tags or ())

    def keep(m: dict[str, Any]) -> bool:
        return (m["status"] in statuses
                and tags.issubset(m["tags"])
                and (a.since is None or m["created_at"] >= a.since)
                and (a.until is None or m["created_at"] < a.until)
                and all(m["metadata"].get(k) == v for k, v in (a.metadata or {}).items()))

    return keep


"""The embedder and the vectors it made, kept in LMDB beside the memories.

A vector is stored under (embedder identity hash, sha256 of the search key),
in plaintext's ``vectors`` sub-database. Keyed by content, not by memory: a
rollback, a re-added text or a rebuilt index never needs the model again, and
vectors of two embedders never mix. Those rows are a cache of what memories
hold, so a write may lack them (the model was loading): an index build makes
what is missing.

Writes get their vectors before they are committed (:meth:`Vectors.prepare`,
on the daemon's prepare thread, one batched forward pass for many requests)
and in the same transaction, so an acknowledged memory is searchable without
the model being asked again. Model calls run on the calling thread: the
shared model executor may be busy with an index build for minutes, and
writes must not queue behind it (the embedder serialises its own forward
passes).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from memos.errors import (
    InternalError,
    InvalidRequest,
    MemosError,
    ModelMismatch,
    Unavailable,
)
from memos.jobs import Progress
from memos.memtypes import Pending, Rows, Services

from .retrieval import key_text
from .settings import SearchSettings

log = logging.getLogger("memosd.search")

NAME = "plaintext"
DB = "vectors"
_CHUNK = 256  # texts embedded and stored together while building


class Vectors:
    """The embedder's lifecycle, stored vectors, and the embedding of writes."""

    def __init__(self, services: Services, settings: SearchSettings) -> None:
        self.services = services
        self.settings = settings
        self._model: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._id_hash = b""

    @property
    def enabled(self) -> bool:
        return self.settings.embedder != "none"

    # -- the model ------------------------------------------------------

    def load(self) -> bool:
        """Load the embedder (on the model executor); False if search is off or the model failed."""
        if not self.enabled:
            self._error = Unavailable("search is turned off (search.embedder = 'none')")
            self._ready.set()
            return False
        try:
            from memos.plugins import embedders

            model = embedders.load(self.settings.embedder, **self.settings.embedder_options)
            self._id_hash = hashlib.sha256(model.identity.encode()).digest()[:8]
            self._model = model
            log.info("embedder loaded", extra={"embedder": model.identity})
            return True
        except BaseException as exc:  # the daemon keeps serving everything but search
            self._error = exc
            log.exception("embedder failed to load")
            return False
        finally:
            self._ready.set()

    @property
    def loaded(self) -> Any:
        """The embedder if it has loaded, else None (never waits)."""
        return self._model

    @property
    def model(self) -> Any:
        """The embedder, waiting while it loads; Unavailable if there is none."""
        if not self._ready.wait(self.settings.ready_timeout_s):
            raise Unavailable("the embedder is still loading; retry shortly")
        if not self.enabled:
            raise Unavailable("search is turned off (search.embedder = 'none')")
        if self._model is None:
            raise Unavailable(f"the embedder {self.settings.embedder!r} failed to load: {self._error}")
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.embed(list(texts))

    # -- stored vectors -------------------------------------------------

    def key(self, text: str, cube: str | None = None) -> bytes:
        """Where a search key's vector is stored: shared by every cube when the model made it;
        under ``cube`` alone when a client sent it, so that no writer of one cube can choose the
        vector another cube's memory of the same text gets."""
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if cube is None:
            return self._id_hash + digest
        return self._id_hash + b"c" + hashlib.sha256(cube.encode() + b"\0" + digest).digest()

    def stored(self, rows: Rows, keys: Sequence[str], cube: str | None = None) -> list[np.ndarray | None]:
        """Stored vectors of ``keys``: the cube's own (client-made) first, else the shared ones."""
        out: list[np.ndarray | None] = []
        for key in keys:
            raw = rows.get(DB, self.key(key, cube)) if cube is not None else None
            if raw is None:
                raw = rows.get(DB, self.key(key))
            out.append(None if raw is None else np.frombuffer(raw, dtype=np.float32))
        return out

    def writer(self, vectors: dict[str, np.ndarray], cube: str | None = None):
        """A function storing ``vectors`` (search key -> vector) in a transaction; existing rows win.

        ``cube``: client-made vectors, stored for that cube only.
        """
        items = [(self.key(k, cube), np.asarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()]

        def put(rows: Rows) -> None:
            for key, value in items:
                rows.put(DB, key, value, overwrite=False)

        return put

    def vectors_for(self, keys: Sequence[str], job: Progress | None = None, cube: str | None = None) -> np.ndarray:
        """Vectors of ``keys`` in ``cube``: stored ones read, missing ones embedded and stored (shared).

        ``job`` is advanced per vector and checked for cancellation between model calls.
        """
        with self.services.read_rows() as rows:
            found = self.stored(rows, keys, cube)
        missing = [i for i, v in enumerate(found) if v is None]
        if job is not None:
            job.advance(len(keys) - len(missing))
        for start in range(0, len(missing), _CHUNK):
            if job is not None:
                job.check()
            chunk = missing[start:start + _CHUNK]
            vecs = self.embed([keys[i] for i in chunk])
            self.services.write_rows(self.writer({keys[i]: v for i, v in zip(chunk, vecs)}))
            for i, vec in zip(chunk, vecs):
                found[i] = vec
            if job is not None:
                job.advance(len(chunk))
        if not keys:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        return np.stack(found).astype(np.float32, copy=False)

    # -- the write path -------------------------------------------------

    def prepare(self, pending: Sequence[Pending]) -> None:
        """Add to each write the vectors of the search keys it stores that are not stored yet."""
        if not self.enabled:
            return
        try:
            self.model  # noqa: B018  (waits while the model loads)
        except MemosError:
            return  # no model: store the memories anyway; their vectors are made when an index is built
        plans: list[tuple[Pending, list[str], list[np.ndarray | None]]] = []
        for p in pending:
            if p.error is not None:
                continue
            try:
                plans.append((p, *self._keys(p)))
            except MemosError as exc:
                p.fail(exc)
        keys = {k for _, ks, given in plans for k, g in zip(ks, given) if g is None}
        with self.services.read_rows() as rows:
            stored = {k for k, v in zip(keys, self.stored(rows, list(keys))) if v is not None}
        todo = sorted(keys - stored)
        failure: MemosError | None = None
        try:
            made = dict(zip(todo, self.embed(todo))) if todo else {}
        except MemosError as exc:
            failure = exc
        except Exception as exc:  # the model broke: refuse the writes that needed it, keep serving
            log.exception("embedding writes failed")
            failure = InternalError(f"embedding failed: {type(exc).__name__}")
        if failure is not None:
            missing = set(todo)
            for p, ks, given in plans:
                if any(g is None and k in missing for k, g in zip(ks, given)):
                    p.fail(failure)
            plans = [plan for plan in plans if plan[0].error is None]
            made = {}
        for p, ks, given in plans:
            fresh = {k: made[k] for k, g in zip(ks, given) if g is None and k not in stored}
            if fresh:
                p.also(self.writer(fresh))
            sent = {k: g for k, g in zip(ks, given) if g is not None}
            if sent:  # a client's vectors serve its own cube only
                p.also(self.writer(sent, cube=p.cube))

    def _keys(self, p: Pending) -> tuple[list[str], list[np.ndarray | None]]:
        """Search keys a write will store, with client-made vectors where given."""
        a = p.args
        if p.op == "add":
            if a.type == NAME and a.text:
                return [key_text(a.text, a.metadata or {})], [self._client_vector(a, a.embedder)]
        elif p.op == "add_many":
            keys: list[str] = []
            given: list[np.ndarray | None] = []
            for item in a.items:
                if isinstance(item, str):  # a text alone: a plaintext memory without metadata
                    if item:
                        keys.append(key_text(item, {}))
                        given.append(None)
                elif item.type == NAME and item.text:
                    keys.append(key_text(item.text, item.metadata or {}))
                    given.append(self._client_vector(item, a.embedder))
            return keys, given
        elif p.op == "update" and (a.text is not None or a.metadata is not None):
            current = self._current(p.cube if p.cube is not None else a.cube, a.id)
            if current is not None and current.get("type") == NAME:
                text = a.text if a.text is not None else current.get("text")
                metadata = a.metadata if a.metadata is not None else current.get("metadata") or {}
                if text:
                    return [key_text(text, metadata)], [None]
        return [], []

    def _client_vector(self, item: Any, embedder: str | None) -> np.ndarray | None:
        raw = getattr(item, "vector", None)
        if raw is None:
            return None
        model = self.model
        if embedder != model.identity:
            raise ModelMismatch(
                f"vectors were made by {embedder!r}; this daemon searches with {model.identity!r}",
                expected=model.identity, got=embedder,
            )
        if len(raw) != 4 * model.dim:
            raise InvalidRequest(f"a vector must be {model.dim} float32 values", field="vector")
        vec = np.frombuffer(raw, dtype=np.float32)
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidRequest("a vector must be finite and non-zero", field="vector")
        return vec / norm

    def _current(self, cube: Any, memory_id: Any) -> dict[str, Any] | None:
        try:
            with self.services.system_snapshot(cube) as snap:
                return snap.get_many([memory_id]).get(memory_id)
        except MemosError:
            return None  # the write itself will report the problem

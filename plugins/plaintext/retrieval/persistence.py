"""Saving and loading an index folder: versioned, checksummed, atomically switched (see docs/retrieval.md)."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from memos.retrieval.config import IndexCorruptError, RetrievalConfig
from memos.retrieval.locks import _Read
from memos.retrieval.postings import _Posting
from memos.retrieval.text import _WORD

if TYPE_CHECKING:
    from memos.retrieval.index import HybridIndex

FORMAT_VERSION = 1


class _Persistence:
    """HybridIndex methods that write and read the saved form of an index."""

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index into folder `path` atomically: a new version folder is written and fsynced,
        then the CURRENT pointer file is replaced (os.replace), then older versions are deleted."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        with self._save_lock, _Read(self._lock):
            n = self._n
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=path)
            try:
                lens = self._own_len[:n].astype(np.int64)
                total = int(lens.sum())
                starts = np.repeat(self._own_off[:n], lens)
                src = starts + np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
                live = [p.live(self._gen) for p in self._post]
                plen = np.array([len(r) for r, _ in live], np.int64)
                arrays = dict(
                    vecs=self._vecs[:n], dl=self._dl[:n], spk=self._spk[:n], pos=self._pos[:n], grp=self._grp[:n],
                    nb=self._nb[:n], nbw=self._nbw[:n], own_len=self._own_len[:n],
                    own_terms=self._own_terms[src], own_cnt=self._own_cnt[src],
                    post_len=plen,
                    post_rows=np.concatenate([r for r, _ in live]) if live else np.zeros(0, np.int32),
                    post_tf=np.concatenate([t for _, t in live]) if live else np.zeros(0, np.float32),
                )
                files = {}
                with open(os.path.join(tmp, "arrays.npz"), "wb") as f:
                    np.savez(f, **arrays)
                strings = dict(ids=self._ids, terms=self._terms, speakers=self._speakers, groups=self._groups,
                               grp_rows=[list(map(int, r)) for r in self._grp_rows])
                with open(os.path.join(tmp, "strings.json"), "w", encoding="utf-8") as f:
                    json.dump(strings, f, ensure_ascii=False)
                if self._ann is not None:
                    self._ann.save(os.path.join(tmp, "ann.usearch"))
                for name in sorted(os.listdir(tmp)):
                    files[name] = _file_crc(os.path.join(tmp, name))
                meta = dict(format=FORMAT_VERSION, dim=self.dim, n=n, sum_dl=self._sum_dl,
                            config=_config_to_json(self.config), files=files)
                with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                    json.dump(meta, f)
                for name in os.listdir(tmp):
                    _fsync_file(os.path.join(tmp, name))
                version = _next_version(path)
                final = os.path.join(path, version)
                os.rename(tmp, final)
                _fsync_dir(path)
                ptr = os.path.join(path, ".CURRENT.tmp")
                with open(ptr, "w") as f:
                    f.write(version + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(ptr, os.path.join(path, "CURRENT"))
                _fsync_dir(path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for name in os.listdir(path):
                if (name.startswith("v-") and name != version) or name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(path, name), ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HybridIndex":
        """Load a folder written by save(). Raises IndexCorruptError on missing/corrupt/unknown files."""
        path = os.fspath(path)
        try:
            with open(os.path.join(path, "CURRENT"), encoding="utf-8") as f:
                version = f.read().strip()
            if not re.fullmatch(r"v-\d+", version):
                raise IndexCorruptError(f"{path}: bad CURRENT pointer {version!r}")
            folder = os.path.join(path, version)
            with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
                raise IndexCorruptError(f"{path}: unknown index format {meta.get('format') if isinstance(meta, dict) else meta!r}")
            for name, crc in meta["files"].items():
                if _file_crc(os.path.join(folder, name)) != crc:
                    raise IndexCorruptError(f"{path}: checksum mismatch in {name}")
            cfg = _config_from_json(meta["config"])
            self = cls(int(meta["dim"]), cfg)
            with np.load(os.path.join(folder, "arrays.npz"), allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            with open(os.path.join(folder, "strings.json"), encoding="utf-8") as f:
                s = json.load(f)
            n = int(meta["n"])
            self._restore(n, float(meta["sum_dl"]), a, s)
            if "ann.usearch" in meta["files"]:
                ann = self._new_ann()
                ann.load(os.path.join(folder, "ann.usearch"))
                if len(ann) != n:
                    raise IndexCorruptError(f"{path}: ANN index holds {len(ann)} vectors, expected {n}")
                self._ann = ann
            return self
        except IndexCorruptError:
            raise
        except (OSError, KeyError, TypeError, ValueError, IndexError, RuntimeError, zlib.error) as e:
            raise IndexCorruptError(f"{path}: cannot load index: {type(e).__name__}: {e}") from e

    def _restore(self, n: int, sum_dl: float, a: dict[str, np.ndarray], s: dict[str, Any]) -> None:
        if len(s["ids"]) != n or a["vecs"].shape != (n, self.dim):
            raise IndexCorruptError("inconsistent saved index (sizes)")
        self._ensure_capacity(max(n, 16))
        self._n = n
        self._ids = list(s["ids"])
        self._row = {d: i for i, d in enumerate(self._ids)}
        if len(self._row) != n:
            raise IndexCorruptError("duplicate ids in saved index")
        for name in ("vecs", "dl", "spk", "pos", "grp", "nb", "nbw", "own_len"):
            getattr(self, "_" + name)[:n] = a[name]
        lens = a["own_len"].astype(np.int64)
        self._own_off[:n] = np.cumsum(lens) - lens
        total = int(lens.sum())
        self._own_terms = np.array(a["own_terms"], np.int32)
        self._own_cnt = np.array(a["own_cnt"], np.float32)
        if len(self._own_terms) != total or len(self._own_cnt) != total:
            raise IndexCorruptError("inconsistent saved index (terms)")
        self._own_used = total
        self._sum_dl = sum_dl
        self._terms = list(s["terms"])
        self._vocab = {t: i for i, t in enumerate(self._terms)}
        plen = a["post_len"]
        if len(plen) != len(self._terms):
            raise IndexCorruptError("inconsistent saved index (postings)")
        off = np.concatenate(([0], np.cumsum(plen)))
        rows_all, tf_all = a["post_rows"], a["post_tf"]
        if len(rows_all) != off[-1] or (len(rows_all) and (rows_all.min() < 0 or rows_all.max() >= n)):
            raise IndexCorruptError("inconsistent saved index (posting rows)")
        self._gen[:] = 0
        self._post = []
        for t in range(len(self._terms)):
            p = _Posting()
            r, f = rows_all[off[t]: off[t + 1]], tf_all[off[t]: off[t + 1]]
            p.rows, p.tf = np.array(r, np.int32), np.array(f, np.float32)
            p.gens = np.zeros(len(r), np.uint32)
            p.size = len(r)
            if not p.size:
                p.rows, p.gens, p.tf = np.empty(4, np.int32), np.empty(4, np.uint32), np.empty(4, np.float32)
            self._post.append(p)
        self._speakers = list(s["speakers"])
        self._spk_code = {x: i for i, x in enumerate(self._speakers)}
        self._spk_count = [0] * len(self._speakers)
        for c in self._spk[:n].tolist():
            if c >= 0:
                self._spk_count[c] += 1
        self._first = {}
        for c, x in enumerate(self._speakers):
            first = _WORD.findall(x.lower())
            if self._spk_count[c] and first:
                self._first.setdefault(first[0], set()).add(c)
        self._groups = list(s["groups"])
        self._grp_code = {x: i for i, x in enumerate(self._groups)}
        self._grp_rows = [list(r) for r in s["grp_rows"]]
        self._grp_pos = [[float(self._pos[r]) for r in rows] for rows in self._grp_rows]
        if len(self._grp_rows) != len(self._groups):
            raise IndexCorruptError("inconsistent saved index (groups)")
        if (self._nb[:n] < 0).any() or (self._nb[:n] >= max(n, 1)).any():
            raise IndexCorruptError("inconsistent saved index (neighbours)")


# ---------------------------------------------------------------------------------------------- helpers

def _config_to_json(cfg: RetrievalConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["window"] = list(cfg.window)
    return d


def _config_from_json(d: Mapping[str, Any]) -> RetrievalConfig:
    names = {f.name for f in fields(RetrievalConfig)}
    return RetrievalConfig(**{k: (tuple(v) if k == "window" else v) for k, v in d.items() if k in names})


def _file_crc(p: str) -> int:
    crc = 0
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return crc
            crc = zlib.crc32(b, crc)


def _fsync_file(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: str) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _next_version(path: str) -> str:
    nums = [int(x[2:]) for x in os.listdir(path) if re.fullmatch(r"v-\d+", x)]
    return f"v-{max(nums, default=0) + 1}"

"""Search at a past version, in process: each version's index is built once and the last few are kept."""

from __future__ import annotations

import pytest

from conftest import ALICE
from memos import protocol as p
from memos.config import SearchSettings
from memos.daemon import search as search_module
from memos.daemon.jobs import Jobs
from memos.daemon.search import SearchService


@pytest.fixture
def service(memos, tmp_path):
    svc = SearchService(memos, SearchSettings(embedder="hashing"), tmp_path / "index", Jobs())
    svc.start().result(timeout=60)
    yield svc
    svc.stop()
    svc.close()


def test_each_past_version_is_read_once_while_kept(service, memos, monkeypatch):
    memos.create_cube(ALICE, "notes")
    versions = [memos.add(ALICE, "notes", f"note {i} about the office move").version for i in range(7)]
    builds: list[int | None] = []
    listing = memos.list

    def counted(actor, cube, **kw):
        builds.append(kw.get("at"))
        return listing(actor, cube, **kw)

    monkeypatch.setattr(memos, "list", counted)

    def search(at: int) -> list[str]:
        return sorted(h["memory"]["text"] for h in service.search(ALICE, p.SearchArgs(cube="notes", query="office", at=at)))

    assert search(versions[0]) == ["note 0 about the office move"]
    assert search(versions[0]) == ["note 0 about the office move"]
    assert search(versions[2]) == [f"note {i} about the office move" for i in range(3)]
    assert builds == [versions[0], versions[2]]  # the repeat was served from the kept index

    for v in versions[3:]:  # four more versions: only the last four are kept
        search(v)
    assert search(versions[2]) == [f"note {i} about the office move" for i in range(3)]
    assert builds[-1] == versions[2] and len(builds) == 7  # evicted, so read again
    assert len(service._past) == search_module._PAST_INDEXES


def test_a_cube_too_big_to_keep_is_searched_but_not_kept(service, memos, monkeypatch):
    monkeypatch.setattr(search_module, "_PAST_DOCS", 2)
    memos.create_cube(ALICE, "big")
    for i in range(3):
        memos.add(ALICE, "big", f"big note {i}")
    version = memos.get_cube(ALICE, "big").version
    hits = service.search(ALICE, p.SearchArgs(cube="big", query="note", at=version))
    assert len(hits) == 3 and not service._past

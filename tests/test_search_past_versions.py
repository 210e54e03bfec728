"""Search at a past version, in process: each version's index is built once and the last few are kept."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ALICE
from memos.jobs import Jobs
from memos.plugins.plaintext import SearchSettings
from memos.plugins.plaintext import searching as searching_module
from memos.services import TypeServices


@pytest.fixture
def plaintext(memos, tmp_path):
    executor = ThreadPoolExecutor(1, thread_name_prefix="test-model")
    memtype = memos.types["plaintext"]
    memtype.start(TypeServices(memos, "plaintext", SearchSettings(embedder="hashing"), tmp_path / "state",
                               Jobs(), executor))
    memtype.booted.result(timeout=60)
    yield memtype
    memtype.stop()
    executor.shutdown(wait=True)
    memtype.close()


def counting_builds(plaintext, monkeypatch) -> list[int]:
    """The versions whose index is built from the store, in order."""
    builds: list[int] = []
    searcher = plaintext._searcher
    build = searcher._past_version

    def counted(key, found):
        builds.append(key[1])
        return build(key, found)

    monkeypatch.setattr(searcher, "_past_version", counted)
    return builds


def test_each_past_version_is_read_once_while_kept(plaintext, memos, monkeypatch):
    memos.create_cube(ALICE, "notes")
    versions = [memos.add(ALICE, "notes", f"note {i} about the office move").version for i in range(7)]
    builds = counting_builds(plaintext, monkeypatch)

    def search(at: int) -> list[str]:
        return sorted(h["memory"]["text"] for h in plaintext.search(ALICE, "notes", "office", at=at))

    assert search(versions[0]) == ["note 0 about the office move"]
    assert search(versions[0]) == ["note 0 about the office move"]
    assert search(versions[2]) == [f"note {i} about the office move" for i in range(3)]
    assert builds == [versions[0], versions[2]]  # the repeat was served from the kept index

    for v in versions[3:]:  # four more versions: only the last four are kept
        search(v)
    assert search(versions[2]) == [f"note {i} about the office move" for i in range(3)]
    assert builds[-1] == versions[2] and len(builds) == 7  # evicted, so read again
    assert len(plaintext._searcher._past) == searching_module._PAST_INDEXES


def test_a_cube_too_big_to_keep_is_searched_but_not_kept(plaintext, memos, monkeypatch):
    monkeypatch.setattr(searching_module, "_PAST_DOCS", 2)
    memos.create_cube(ALICE, "big")
    for i in range(3):
        memos.add(ALICE, "big", f"big note {i}")
    version = memos.get_cube(ALICE, "big").version
    hits = plaintext.search(ALICE, "big", "note", at=version)
    assert len(hits) == 3 and not plaintext._searcher._past

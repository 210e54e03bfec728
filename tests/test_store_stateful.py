"""Random add/update/delete/rollback sequences checked against a plain-Python model.

After every step the head must equal the model, and reading at every past
version must equal the model's snapshot of that version, byte for byte.
"""

from __future__ import annotations

import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import ALICE
from memos.api import Memos, NewMemory
from memos.errors import InvalidRequest, NotFound
from memos.storage import StoreOptions

CUBE = "c"
texts = st.text(alphabet="abcdé xyz", min_size=1, max_size=12).filter(lambda s: s.strip())
tag_lists = st.lists(st.sampled_from(["red", "green", "blue"]), unique=True, max_size=3)
# An entry of the model: (text, tags, status, exact state bytes).
Entry = tuple


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="memos-stateful-")
        # Durability is not what this test is about; the crash test covers it.
        self.m = Memos(self.dir, options=StoreOptions(sync=False))
        self.m.create_cube(ALICE, CUBE)
        self.model: dict[str, Entry] = {}
        self.snapshots: list[dict[str, Entry]] = [{}]  # index = cube version
        self.known: list[str] = []  # every id ever created, present or not

    def teardown(self) -> None:
        self.m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _committed(self) -> None:
        self.snapshots.append(dict(self.model))

    def _record(self, mem) -> None:
        self.model[mem.id] = (mem.text, list(mem.tags), mem.status.value, mem.state_bytes())

    # -- rules ----------------------------------------------------------

    @rule(text=texts, tags=tag_lists)
    def add(self, text, tags):
        mem = self.m.add(ALICE, CUBE, text, tags=tags)
        self._record(mem)
        self.known.append(mem.id)
        self._committed()

    @rule(items=st.lists(st.tuples(texts, tag_lists), min_size=1, max_size=3))
    def add_many(self, items):
        mems = self.m.add_many(ALICE, CUBE, [NewMemory(text=t, tags=g) for t, g in items])
        for mem in mems:
            self._record(mem)
            self.known.append(mem.id)
        self._committed()

    @precondition(lambda self: self.known)
    @rule(data=st.data(), text=st.none() | texts, tags=st.none() | tag_lists,
          status=st.none() | st.sampled_from(["active", "archived"]))
    def update(self, data, text, tags, status):
        memory_id = data.draw(st.sampled_from(self.known))
        current = self.model.get(memory_id)
        if current is None or (current[2] == "deleted" and status is None):
            expected = NotFound
        elif text is None and tags is None and status is None:
            expected = InvalidRequest
        else:
            expected = None
        try:
            mem = self.m.update(ALICE, CUBE, memory_id, text=text, tags=tags, status=status)
        except (NotFound, InvalidRequest) as exc:
            assert type(exc) is expected, (exc, expected)
            return
        assert expected is None
        assert mem.text == (text if text is not None else current[0])
        assert mem.tags == (tags if tags is not None else current[1])
        self._record(mem)
        self._committed()

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def delete(self, data):
        memory_id = data.draw(st.sampled_from(self.known))
        if memory_id not in self.model:
            try:
                self.m.delete(ALICE, CUBE, memory_id)
            except NotFound:
                return
            raise AssertionError("deleting an absent memory succeeded")
        mem = self.m.delete(ALICE, CUBE, memory_id)
        assert mem.status.value == "deleted"
        self._record(mem)
        self._committed()

    @rule(data=st.data())
    def rollback(self, data):
        target = data.draw(st.integers(0, len(self.snapshots) - 1))
        self.m.rollback(ALICE, CUBE, target)
        self.model = dict(self.snapshots[target])
        self._committed()

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def rollback_some(self, data):
        target = data.draw(st.integers(0, len(self.snapshots) - 1))
        chosen = data.draw(st.lists(st.sampled_from(self.known), min_size=1, max_size=3, unique=True))
        self.m.rollback(ALICE, CUBE, target, memory_ids=chosen)
        for memory_id in chosen:
            old = self.snapshots[target].get(memory_id)
            if old is None:
                self.model.pop(memory_id, None)
            else:
                self.model[memory_id] = old
        self._committed()

    # -- invariants -----------------------------------------------------

    @invariant()
    def head_matches_model(self):
        listed = {m.id: (m.text, m.tags, m.status.value) for m in self.m.list(ALICE, CUBE, status=None)}
        assert listed == {k: v[:3] for k, v in self.model.items()}
        assert self.m.state(ALICE, CUBE) == {k: v[3] for k, v in self.model.items()}
        assert self.m.get_cube(ALICE, CUBE).version == len(self.snapshots) - 1

    @invariant()
    def every_past_version_matches_its_snapshot(self):
        for version, snapshot in enumerate(self.snapshots):
            state = self.m.state(ALICE, CUBE, at=version)
            assert state == {k: v[3] for k, v in snapshot.items()}, version
            listed = self.m.list(ALICE, CUBE, at=version, status=None)
            assert {m.id: (m.text, m.tags, m.status.value) for m in listed} == {k: v[:3] for k, v in snapshot.items()}

    @invariant()
    def sampled_gets_at_past_versions(self):
        rng = random.Random(len(self.snapshots))
        for _ in range(4):
            version = rng.randrange(len(self.snapshots))
            if not self.known:
                return
            memory_id = rng.choice(self.known)
            expected = self.snapshots[version].get(memory_id)
            try:
                got = self.m.get(ALICE, CUBE, memory_id, at=version, include_deleted=True)
            except NotFound:
                assert expected is None, (memory_id, version)
                continue
            assert expected is not None and got.state_bytes() == expected[3]


StoreMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_store_matches_model = StoreMachine.TestCase

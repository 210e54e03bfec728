"""Random sequences of requests to a real memosd, checked against a plain-Python model.

A Hypothesis state machine drives one memosd (for the whole test; a fresh cube for each example)
as the local administrator and as a second agent with a token of its own. Its rules add, update,
delete, roll back, grant the second agent a role (or none), write and search as that agent,
restart the daemon cleanly, and SIGKILL it and start it again. After every step the daemon must
agree with the model: each memory's text and status, the cube's version, a past version's
contents, history without gaps, search (each memory found by the one token only its text holds
while active, never once deleted), and what the second agent may read and write under its role.

The store's own state machine (tests/test_store_stateful.py) covers the versioning in depth,
in-process; this one covers what the wire, the writer, the index and restarts add to it.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from daemon_fixtures import Daemon
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from memos.errors import Denied, NotFound

ROLES = [None, "read", "write", "admin"]
RANK = {None: 0, "read": 1, "write": 2, "admin": 3}
words = st.lists(st.sampled_from(["bees", "roof", "boiler", "green", "café", "naïve", "x"]), min_size=1, max_size=4)
# One entry of the model: (text, status).
Entry = tuple


class DaemonMachine(RuleBasedStateMachine):
    daemon: Daemon  # set by the test: one memosd for every example
    other_token: str
    cubes = itertools.count()
    restarts_per_example = 2

    def __init__(self) -> None:
        super().__init__()
        self.d = self.daemon
        if not self.d.alive():  # an earlier example failed between a kill and the start
            self.d.start()
        self._connect()
        self.cube = f"sm{next(self.cubes)}"
        self.model: dict[str, Entry] = {}
        self.snapshots: list[dict[str, Entry]] = []  # index: cube version
        self.known: list[str] = []  # every id ever acknowledged
        self.role: str | None = None  # the second agent's role on the cube
        self.tokens = itertools.count()
        self.restarts = 0

    def _connect(self) -> None:
        self.d.close_clients()
        self.admin = self.d.client(timeout=30)
        self.other = self.d.client(token=self.other_token, timeout=30)

    def _text(self, words: list[str]) -> str:
        # The last word is in this text alone: a search for it must find this memory.
        return " ".join(words) + f" tok{self.cube}x{next(self.tokens)}"

    def _committed(self, version: int) -> None:
        self.snapshots.append(dict(self.model))
        assert version == len(self.snapshots) - 1, (version, len(self.snapshots) - 1)

    @initialize()
    def create(self) -> None:
        assert self.admin.cube_create(self.cube).version == 0
        self.snapshots.append({})

    # -- writes ------------------------------------------------------------

    @rule(words=words)
    def add(self, words) -> None:
        text = self._text(words)
        mem = self.admin.add(self.cube, text)
        assert mem.text == text and mem.status.value == "active"
        self.model[mem.id] = (text, "active")
        self.known.append(mem.id)
        self._committed(mem.version)

    @rule(words=words)
    def add_as_other(self, words) -> None:
        text = self._text(words)
        if RANK[self.role] < RANK["write"]:
            with pytest.raises(Denied):
                self.other.add(self.cube, text)
            return
        mem = self.other.add(self.cube, text)
        assert mem.provenance.actor == "stateful-other"
        self.model[mem.id] = (text, "active")
        self.known.append(mem.id)
        self._committed(mem.version)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), words=words)
    def update(self, data, words) -> None:
        memory_id = data.draw(st.sampled_from(self.known))
        text = self._text(words)
        if self.model.get(memory_id, (None, "deleted"))[1] == "deleted":
            with pytest.raises(NotFound):
                self.admin.update(self.cube, memory_id, text=text)
            return
        mem = self.admin.update(self.cube, memory_id, text=text)
        assert mem.text == text
        self.model[memory_id] = (text, "active")
        self._committed(mem.version)

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def delete(self, data) -> None:
        memory_id = data.draw(st.sampled_from(self.known))
        if memory_id not in self.model:  # rolled back to before it was added
            with pytest.raises(NotFound):
                self.admin.delete(self.cube, memory_id)
            return
        mem = self.admin.delete(self.cube, memory_id)
        assert mem.status.value == "deleted"
        self.model[memory_id] = (self.model[memory_id][0], "deleted")
        self._committed(mem.version)

    @rule(data=st.data())
    def rollback(self, data) -> None:
        target = data.draw(st.integers(0, len(self.snapshots) - 1))
        commit = self.admin.rollback(self.cube, target)
        self.model = dict(self.snapshots[target])
        self._committed(commit.version)

    @rule(role=st.sampled_from(ROLES))
    def grant(self, role) -> None:
        self.admin.cube_grant(self.cube, "stateful-other", role)
        self.role = role

    # -- reads -------------------------------------------------------------

    def _search_each(self, client) -> None:
        """Every memory searched for by the token only its text holds: found while active, never once deleted."""
        for memory_id, (text, status) in self.model.items():
            token = text.split()[-1]
            hits = {h.memory.id: h.memory.text for h in client.search(self.cube, token, k=3)}
            if status == "active":
                assert hits.get(memory_id) == text, (token, hits)
            else:
                assert memory_id not in hits, f"deleted {memory_id} found"

    @rule()
    def search_as_other(self) -> None:
        if self.role is None:
            with pytest.raises(Denied):
                self.other.search(self.cube, "anything", k=3)
            return
        self._search_each(self.other)

    # -- the daemon --------------------------------------------------------

    @precondition(lambda self: self.restarts < self.restarts_per_example)
    @rule()
    def restart(self) -> None:
        self.restarts += 1
        self.d.restart()
        self._connect()

    @precondition(lambda self: self.restarts < self.restarts_per_example)
    @rule()
    def kill_and_start(self) -> None:
        self.restarts += 1
        self.d.kill()
        self.d.start()
        self._connect()

    # -- after every step --------------------------------------------------

    @invariant()
    def daemon_matches_model(self) -> None:
        if not self.snapshots:
            return
        listed = {m.id: (m.text, m.status.value) for m in self.admin.list(self.cube, status="all")}
        assert listed == self.model
        version = self.admin.cube_get(self.cube).version
        assert version == len(self.snapshots) - 1
        history = [c.version for c in self.admin.history(self.cube, limit=1000)]
        assert history == list(range(version, -1, -1))
        past = version // 2  # a past version reads as it was
        assert {m.id: (m.text, m.status.value) for m in self.admin.list(self.cube, at=past, status="all")} \
            == self.snapshots[past]

    @invariant()
    def search_agrees_with_the_model(self) -> None:
        if self.snapshots:
            self._search_each(self.admin)

    @invariant()
    def the_other_agent_reads_what_its_role_allows(self) -> None:
        if not self.snapshots:
            return
        if self.role is None:
            with pytest.raises(Denied):
                self.other.list(self.cube)
            assert self.cube not in {c.name for c in self.other.cube_list()}
            return
        listed = {m.id: (m.text, m.status.value) for m in self.other.list(self.cube, status="all")}
        assert listed == self.model
        live = [k for k, v in self.model.items() if v[1] == "active"]
        if live:
            assert self.other.get(self.cube, live[0]).text == self.model[live[0]][0]


def test_the_daemon_behaves_as_the_model_says():
    d = Daemon().start()
    try:
        DaemonMachine.daemon = d
        DaemonMachine.other_token = d.client().agent_add("stateful-other")["token"]
        run_state_machine_as_test(DaemonMachine, settings=settings(
            max_examples=15, stateful_step_count=25, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
        for i in range(len(d.logs)):  # no daemon of the run logged a traceback
            assert "Traceback" not in d.log(i), d.log(i)[-3000:]
        d.stop()
    finally:
        d.cleanup()

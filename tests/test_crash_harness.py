"""Crash harness: memosd SIGKILLed at random moments while agent processes write.

Several agents, each a process of its own with its own token (``tests/crash_agent.py``), add to
a shared cube and add to, update and delete in a private cube; each logs every write the moment
its reply arrives. The harness kills memosd at a random moment of each round, waits for every
agent to notice, restarts it, and checks the store against the logs:

* every acknowledged write is there, with its exact text (or deletion) at its acknowledged
  version, and the commit of that version names the memory;
* nothing is half-applied: each cube's history holds every version from 0 to the cube's version,
  and every memory's state is the one the commit of its version wrote; no text that no agent
  sent;
* the audit chain verifies;
* the search index, rebuilt from the store after the crash, agrees with it: every active memory
  checked is found by the one token only its text holds, with that text, and no deleted memory
  is ever found.

A SIGKILL leaves the page cache, so this is about ordering and atomicity (a reply only after its
commit; a commit whole or absent), not flushes: tests/test_powerloss.py covers those.

``pytest -m slow tests/test_crash_harness.py`` runs the long version (more agents, more kills,
everything checked after every kill). The seed is printed; ``MEMOS_CRASH_SEED`` replays one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from daemon_fixtures import ROOT, Daemon

AGENT = ROOT / "tests" / "crash_agent.py"
SHARED = "crash-shared"


class Agents:
    """The agent processes, their control folder and their logs."""

    def __init__(self, d: Daemon, n: int, seed: int, early_ack: bool = False) -> None:
        self.d = d
        self.ctl = d.root / "ctl"
        self.ctl.mkdir()
        admin = d.client(timeout=30)
        admin.cube_create(SHARED)
        self.names = [f"a{i}" for i in range(n)]
        self.logs = [d.root / f"{name}.log" for name in self.names]
        self.privates = [f"crash-{name}" for name in self.names]
        self.procs = []
        for i, name in enumerate(self.names):
            token = admin.agent_add(name)["token"]
            admin.cube_grant(SHARED, name, "write")
            cfg = {"socket": str(d.socket), "token": token, "name": name, "shared": SHARED,
                   "private": self.privates[i], "ctl": str(self.ctl), "seed": seed * 100 + i,
                   "log": str(self.logs[i]), "early_ack": early_ack}
            err = open(d.root / f"{name}.err", "wb")
            self.procs.append(subprocess.Popen([sys.executable, str(AGENT), json.dumps(cfg)], cwd=ROOT,
                                               env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                               stdout=subprocess.DEVNULL, stderr=err))
            err.close()
        d.close_clients()

    def lines(self) -> list[dict]:
        out = []
        for log in self.logs:
            if log.exists():
                out += [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
        return out

    def wait_for(self, key: str, value: object = None, timeout: float = 60.0) -> None:
        """Until every agent has logged ``{key: value}`` (bounded; an agent that died fails it)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [log.exists() and any(_is(line, key, value) for line in log.read_text().splitlines())
                    for log in self.logs]
            if all(seen):
                return
            for name, proc in zip(self.names, self.procs):
                assert proc.poll() is None, f"agent {name} died:\n{(self.d.root / f'{name}.err').read_text()}"
            errors = [line for line in self.lines() if "error" in line]
            assert not errors, errors
            assert time.monotonic() < deadline, f"agents did not log {key} {value} within {timeout} s"
            time.sleep(0.01)

    def go(self, round_: int) -> None:
        (self.ctl / f"go-{round_}").touch()

    def stop(self) -> None:
        (self.ctl / "stop").touch()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _is(line: str, key: str, value: object) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False  # the last line, still being written
    return key in entry and (value is None or entry[key] == value)


def _all_pages(fetch, cursor) -> list:
    """Every item of a paged listing, a page of 500 at a time."""
    out, at = [], None
    while True:
        page = fetch(500, at)
        out += page
        if len(page) < 500:
            return out
        at = cursor(page[-1])


def check(client, agents: Agents, rng: random.Random, since: int, everything: bool) -> dict[str, int]:
    """The store against the agents' logs; ``since``: acks before this index are only sampled."""
    lines = agents.lines()
    acks = [line["ack"] for line in lines if "ack" in line]
    tried: dict[str, set[str]] = defaultdict(set)  # texts sent to each cube, acknowledged or not
    for line in lines:
        if "try" in line and line["try"][3] is not None:
            tried[line["try"][1]].add(line["try"][3])
    checked = {"acks": 0, "searched": 0}
    for cube in [SHARED, *agents.privates]:
        head = client.cube_get(cube).version
        commits = _all_pages(lambda n, at: client.history(cube, limit=n, before=at), lambda c: c.version)
        assert [c.version for c in commits] == list(range(head, -1, -1)), f"{cube}: versions not contiguous"
        changes = {c.version: {(ch.memory_id, ch.after) for ch in c.changes} for c in commits}
        mems = _all_pages(lambda n, at: client.list(cube, status="all", limit=n, after=at), lambda m: m.id)
        for mem in mems:  # each memory is as the commit of its version left it
            assert mem.version <= head, (cube, mem.id, mem.version, head)
            assert (mem.id, mem.content_hash) in changes[mem.version], f"{cube}: {mem.id} without its commit"
            assert mem.text is None or mem.text in tried[cube], f"{cube}: {mem.text!r} was never sent"
        texts = {m.text for m in mems}
        live = [m for m in mems if m.status.value == "active"]
        gone = [m for m in mems if m.status.value == "deleted"]
        fresh = {a[2] for a in acks[since:] if a[1] == cube}
        sample = live if everything else ([m for m in live if m.id in fresh]
                                          + rng.sample(live, min(15, len(live))))
        for mem in sample:  # the rebuilt index agrees with the store
            token = mem.text.split()[-1]
            hits = {h.memory.id: h.memory.text for h in client.search(cube, token, k=5)}
            assert hits.get(mem.id) == mem.text, f"{cube}: search for {token} misses {mem.id}"
            checked["searched"] += 1
        for mem in gone if everything else rng.sample(gone, min(10, len(gone))):
            hits = client.search(cube, mem.text.split()[-1], k=5)
            assert mem.id not in {h.memory.id for h in hits}, f"{cube}: deleted {mem.id} found by search"
        for i, (op, ack_cube, memory_id, text, version) in enumerate(acks):
            if ack_cube != cube or (i < since and not everything and rng.random() > 0.1):
                continue
            checked["acks"] += 1
            if memory_id is None:  # acknowledged without a reply (the harness broken on purpose)
                assert text in texts, f"{cube}: acknowledged {text!r} is lost"
                continue
            assert version <= head, f"{cube}: acknowledged version {version} lost (cube at {head})"
            then = client.get(cube, memory_id, at=version, include_deleted=True)
            assert then.version == version, (cube, memory_id, then.version, version)
            assert memory_id in {m for m, _ in changes[version]}, f"{cube}: commit {version} lacks {memory_id}"
            if op == "delete":
                assert then.status.value == "deleted", (cube, memory_id, version)
            else:
                assert then.text == text, f"{cube}: {memory_id} at {version} is {then.text!r}, not {text!r}"
    assert client.audit_verify().ok
    return checked


def run(kills: int, n_agents: int, everything: bool, early_ack: bool = False) -> dict[str, int]:
    seed = int(os.environ.get("MEMOS_CRASH_SEED") or random.SystemRandom().randrange(1, 10**6))
    print(f"crash harness seed {seed} (MEMOS_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    d = Daemon().start()
    agents = None
    try:
        agents = Agents(d, n_agents, seed, early_ack)
        agents.go(0)
        agents.wait_for("ready")  # the private cubes exist before the first kill
        since = 0
        figures = {"kills": 0, "acks": 0, "searched": 0}
        for round_ in range(kills):
            if round_:
                agents.go(round_)
            time.sleep(rng.uniform(0.05, 0.4))  # the moment of the kill: random, not a synchronisation
            d.kill()
            figures["kills"] += 1
            agents.wait_for("down", [round_])
            d.start()
            checked = check(d.client(timeout=30), agents, rng, since, everything)
            figures["searched"] += checked["searched"]
            since = len([line for line in agents.lines() if "ack" in line])
            d.close_clients()
        agents.stop()
        final = check(d.client(timeout=30), agents, rng, 0, True)  # everything, once more
        figures["acks"] = final["acks"]
        figures["searched"] += final["searched"]
        for i in range(len(d.logs)):
            assert "Traceback" not in d.log(i), d.log(i)[-3000:]
        d.stop()
        print(f"crash harness: {figures['kills']} kills, {n_agents} agents, {figures['acks']} acknowledged "
              f"writes all present at their versions, {figures['searched']} searches agreed with the store")
        return figures
    finally:
        if agents is not None:
            agents.stop()
        d.cleanup()


def test_sigkill_at_random_moments_loses_no_acknowledged_write():
    figures = run(kills=20, n_agents=3, everything=False)
    assert figures["kills"] == 20 and figures["acks"] > 300


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_long_run_checks_everything_after_every_kill(request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("the long crash run: pytest -m slow tests/test_crash_harness.py")
    figures = run(kills=100, n_agents=5, everything=True)
    assert figures["kills"] == 100

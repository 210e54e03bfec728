"""Weeks of simulated use of one memosd: an agent writes and asks; the scheduled policies promote,
fuse, distill (a tiny model) and decay on their own; a decay that archived what the agent still
needs is undone through a rollback proposal another admin approves; the audit chain holds."""

from __future__ import annotations

import time

import pytest

from memos.errors import Denied
from test_activation import _env, tiny_models  # noqa: F401 (the fixture)
from test_scheduler import DAY, FAST, policy_daemon

POLICIES = f"""
[promote]
every_s = 0.5
min_reads = 3
window_s = {2 * DAY}
[demote]
every_s = 0.5
unused_s = {10 * DAY}
[distill]
every_s = 0.5
min_reads = 3
stable_s = {DAY}
min_memories = 2
max_load = 1000.0
recipe = {{ steps = {FAST["steps"]}, learning_rate = {FAST["learning_rate"]}, batch_size = {FAST["batch_size"]}, kl_weight = 0.0 }}
[fuse]
every_s = 0.5
similarity = 0.8
[decay]
every_s = 0.5
unused_s = {30 * DAY}
"""
GOVERNANCE = """
proposal_ttl_s = 86400
[[rule]]
cubes = ["journal"]
agents = ["planner"]
rollback = "propose"
[[rule]]
rollback = "direct"
"""
FACTS = ["Q: Where does Ada keep her bees?\nA: On the roof of the old library.",
         "Q: Who services the boiler in flat 3?\nA: Olek, every May."]


def eventually(what: str, check, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def made_by(client, policy: str, type: str):
    return [m for m in client.list("journal", status="all") if m.type == type
            and m.provenance.actor == f"policy:{policy}"]


@pytest.fixture
def scenario(tiny_models, tmp_path):
    env = _env(tiny_models)
    governance = tmp_path / "governance.toml"
    governance.write_text(GOVERNANCE)
    env["MEMOS_DAEMON__GOVERNANCE"] = str(governance)
    d, sim = policy_daemon(env, POLICIES)
    try:
        yield d, sim
        d.stop()
    finally:
        d.cleanup()


def test_weeks_of_use_under_the_scheduled_policies(scenario):
    d, sim = scenario
    admin = d.client(timeout=60)
    planner = d.client(token=admin.agent_add("planner")["token"], timeout=60)

    # Day 0: the agent writes what it learns, twice over for one thing, and keeps asking.
    day0 = sim.t
    planner.cube_create("journal")
    facts = [planner.add("journal", f) for f in FACTS]
    dups = [planner.add("journal", "The garden gate sticks in wet weather."),
            planner.add("journal", "The garden gate sticks in wet weather!")]
    planner.add("journal", "A note nobody will read again.")
    for _ in range(3):
        for fact in facts:
            planner.get("journal", fact.id)

    promoted = eventually("promote builds a KV cache of the hot memories",
                          lambda: [m for m in made_by(planner, "promote", "activation") if m.status == "active"])
    assert {s.memory_id for s in promoted[0].provenance.sources} >= {f.id for f in facts}
    merges = eventually("fuse merges the near duplicates",
                        lambda: [c for c in planner.history("journal") if c.op == "merge"])
    assert merges[0].actor == "policy:fuse"
    assert {planner.get("journal", m.id).status for m in dups} == {"archived"}

    # Day 1: the facts have been stable for a day: they are distilled into an adapter.
    sim.set(day0 + DAY + 60)
    adapter = eventually("distill trains an adapter", lambda: made_by(planner, "distill", "parameter"), 180)[0]
    assert {f["memory_id"] for f in planner.adapters("journal")[0]["facts"]} == {f.id for f in facts}
    assert adapter.provenance.policy == "distill"

    # Day 32: nothing was read for a month. Decay archives the plaintext; demote drops the cache.
    sim.set(day0 + 32 * DAY)
    bees = facts[0]
    eventually("decay archives the facts", lambda: all(
        m.status == "archived" for m in planner.list("journal", status="all") if m.id in {f.id for f in facts}))
    eventually("demote drops the cache", lambda: not [
        m for m in made_by(planner, "promote", "activation") if m.status == "active"])
    decayed = planner.history("journal", memory_id=bees.id, limit=1)[0]
    assert (decayed.op, decayed.actor) == ("update", "policy:decay")

    # The agent still needs the bees: it may not roll back here directly, so it proposes.
    with pytest.raises(Denied, match="propose"):
        planner.rollback("journal", decayed.version - 1, [bees.id])
    proposal = planner.rollback_propose("journal", decayed.version - 1, [bees.id], reason="still needed")
    with pytest.raises(Denied, match="other than its proposer"):
        planner.rollback_approve(proposal.id)
    shown = admin.rollback_show(proposal.id)
    assert [(e.memory_id, e.before.status, e.after.status) for e in shown.diff] == [(bees.id, "archived", "active")]
    commit = admin.rollback_approve(proposal.id)
    assert commit.info["proposal"] == proposal.id and commit.actor == "admin"
    restored = planner.get("journal", bees.id)
    assert restored.status == "active" and restored.content_hash == bees.content_hash  # byte for byte

    # The restored memory counts as used now: the next decay runs leave it alone.
    runs = len(admin.policy_history("decay", limit=1000))
    eventually("decay runs again", lambda: len(admin.policy_history("decay", limit=1000)) >= runs + 2)
    assert planner.get("journal", bees.id).status == "active"

    actors = {r.actor for r in admin.audit_tail(10_000)}
    assert {"policy:promote", "policy:fuse", "policy:distill", "policy:decay", "policy:demote"} <= actors
    assert {r.op for r in admin.audit_tail(10_000) if r.actor in ("planner", "admin")} >= {
        "rollback_propose", "rollback_approve"}
    assert admin.audit_verify().ok

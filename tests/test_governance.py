"""Governed rollback in the store: rules, proposals, approval by another admin, expiry, staleness;
and merging memories, whose rollback restores the originals byte for byte."""

from __future__ import annotations

import pytest

from conftest import ALICE, BOB, CAROL, audit_seq, observable, register
from memos import clock
from memos.api import LOCAL_ADMIN, Memos
from memos.errors import ConfigError, Conflict, Denied, Expired, InvalidRequest, NotFound
from memos.governance import Governance, Rule
from memos.models import Status

TTL = 3600.0
RULES = Governance(proposal_ttl_s=TTL, rule=[
    Rule(cubes=["open-*"], rollback="direct"),
    Rule(cubes=["*"], agents=["carol"], rollback="deny"),
    Rule(cubes=["*"], rollback="propose"),
])


class Clock:
    """The daemon's wall clock, held still and moved by the test."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def now(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(clock, "_source", fake)
    return fake


@pytest.fixture
def gov(store_dir, now):
    m = Memos(store_dir, governance=RULES)
    register(m, ALICE, BOB, CAROL)
    m.create_cube(ALICE, "team")
    for agent, role in (("bob", "admin"), ("carol", "write")):
        m.grant(ALICE, "team", agent, role)
    yield m
    m.close()


@pytest.fixture
def edited(gov):
    """v1: a memory added; v2: its text changed (the change a rollback to v1 undoes)."""
    mem = gov.add(ALICE, "team", "Ada keeps bees on the library roof")
    gov.update(ALICE, "team", mem.id, "Ada keeps no bees")
    return mem


def test_the_rules_decide_who_rolls_back_directly(gov, edited):
    with pytest.raises(Denied, match="propose"):
        gov.rollback(ALICE, "team", 1)  # alice owns the cube, and still must propose here
    gov.create_cube(ALICE, "open-notes")
    mem = gov.add(ALICE, "open-notes", "x")
    gov.update(ALICE, "open-notes", mem.id, "y")
    assert gov.rollback(ALICE, "open-notes", 1).op == "rollback"
    with pytest.raises(Denied, match="may not roll back"):
        gov.propose(CAROL, "team", 1)
    assert Governance().rollback_mode("any", "anyone") == "direct"  # the default: cube admins roll back
    assert Governance(rule=[Rule(cubes=["x"], rollback="direct")]).rollback_mode("y", "a") == "propose"


def test_a_proposal_is_applied_by_another_admin_exactly(gov, edited):
    before = gov.state(LOCAL_ADMIN, "team", at=1)
    proposal = gov.propose(ALICE, "team", 1, reason="the edit was wrong")
    assert proposal.status == "pending" and proposal.base_version == 2 and len(proposal.plan) == 1
    assert gov.get(ALICE, "team", edited.id).text == "Ada keeps no bees"  # nothing applied yet
    shown = gov.proposals.show(BOB, proposal.id)
    assert [d.change for d in shown.diff] == ["modified"] and shown.proposal.stale is False
    assert shown.diff[0].before.text == "Ada keeps no bees" and shown.diff[0].after.text.startswith("Ada keeps bees")

    with pytest.raises(Denied, match="other than its proposer"):
        gov.approve(ALICE, proposal.id)
    with pytest.raises(Denied):
        gov.approve(CAROL, proposal.id)  # write is not enough to approve
    commit = gov.approve(BOB, proposal.id)
    assert commit.op == "rollback" and commit.actor == "bob" and commit.version == 3
    assert commit.info["proposal"] == proposal.id and commit.info["proposer"] == "alice"
    assert gov.state(LOCAL_ADMIN, "team") == before
    done = gov.proposals.list(ALICE, status="all")[0]
    assert (done.status, done.decided_by, done.applied_version) == ("applied", "bob", 3)
    with pytest.raises(Conflict, match="already applied"):
        gov.approve(BOB, proposal.id)

    trail = [(r.op, r.actor, r.outcome) for r in gov.audit_tail(LOCAL_ADMIN, 5)]
    assert {r.cube for r in gov.audit_tail(LOCAL_ADMIN, 5)} == {"team"}  # refusals name the cube too
    assert trail == [("rollback_propose", "alice", "ok"), ("rollback_approve", "alice", "denied"),
                     ("rollback_approve", "carol", "denied"), ("rollback_approve", "bob", "ok"),
                     ("rollback_approve", "bob", "error")]
    assert gov.audit_verify(LOCAL_ADMIN).ok


def test_an_agent_denied_rollback_cannot_approve_one(store_dir, now):
    rules = Governance(rule=[Rule(agents=["bob"], rollback="deny"), Rule(rollback="propose")])
    with Memos(store_dir, governance=rules) as m:
        register(m, ALICE, BOB, CAROL)
        m.create_cube(ALICE, "team")
        m.grant(ALICE, "team", "bob", "admin")
        mem = m.add(ALICE, "team", "a")
        m.update(ALICE, "team", mem.id, "b")
        proposal = m.propose(ALICE, "team", 1)
        with pytest.raises(Denied, match="nor approve"):
            m.approve(BOB, proposal.id)
        assert m.get(ALICE, "team", mem.id).text == "b"
        assert m.approve(LOCAL_ADMIN, proposal.id).version == 3


def test_an_expired_proposal_cannot_be_applied(gov, edited, now):
    proposal = gov.propose(ALICE, "team", 1)
    assert proposal.expires_at == now.t + TTL
    now.t += TTL - 0.001
    assert gov.proposals.list(BOB)[0].expired is False
    now.t += 0.001
    assert gov.proposals.list(BOB) == []  # pending ones only, by default
    assert gov.proposals.list(BOB, status="expired")[0].expired
    seq = audit_seq(gov)
    with pytest.raises(Expired, match="expired"):
        gov.approve(BOB, proposal.id)
    assert gov.get(ALICE, "team", edited.id).text == "Ada keeps no bees"
    assert gov.audit_tail(LOCAL_ADMIN, 1)[0].seq == seq + 1  # the refusal is audited
    with pytest.raises(Expired):
        gov.reject(BOB, proposal.id)


def test_a_proposal_made_stale_by_later_commits_is_refused(gov, edited):
    other = gov.add(ALICE, "team", "Bo rides a green bicycle")  # v3: not in the proposal's plan
    proposal = gov.propose(ALICE, "team", 2, memory_ids=[other.id])  # undo v3 only
    unrelated = gov.propose(ALICE, "team", 1, memory_ids=[edited.id])
    gov.update(BOB, "team", other.id, "Bo rides a red bicycle")  # v4 changes what `proposal` restores
    assert gov.proposals.show(BOB, proposal.id).proposal.stale is True
    with pytest.raises(Conflict, match="stale"):
        gov.approve(BOB, proposal.id)
    assert gov.get(ALICE, "team", other.id).text == "Bo rides a red bicycle"
    assert gov.approve(BOB, unrelated.id).version == 5  # later commits elsewhere do not matter
    assert gov.get(ALICE, "team", edited.id).text.startswith("Ada keeps bees")


def test_rejecting_and_withdrawing(gov, edited):
    first = gov.propose(ALICE, "team", 1)
    second = gov.propose(ALICE, "team", 1)
    with pytest.raises(Denied):
        gov.reject(CAROL, first.id)  # neither admin nor proposer
    assert gov.reject(BOB, first.id, "keep the edit").status == "rejected"
    assert gov.reject(ALICE, second.id).decided_by == "alice"  # the proposer withdraws
    with pytest.raises(Conflict):
        gov.approve(BOB, second.id)
    assert gov.get(ALICE, "team", edited.id).text == "Ada keeps no bees"
    assert [p.decision for p in gov.proposals.list(ALICE, status="rejected")] == ["", "keep the edit"]


def test_proposals_are_seen_only_by_readers_of_their_cube(gov, edited):
    proposal = gov.propose(ALICE, "team", 1)
    gov.create_cube(BOB, "private")
    assert [p.id for p in gov.proposals.list(CAROL)] == [proposal.id]
    with pytest.raises(Denied):
        gov.proposals.list(CAROL, cube="private")
    gov.grant(ALICE, "team", "carol", None)
    assert gov.proposals.list(CAROL) == []
    with pytest.raises(Denied):
        gov.proposals.show(CAROL, proposal.id)


def test_bad_proposals_are_refused_and_change_nothing(gov, edited):
    before = observable(gov)
    with pytest.raises(InvalidRequest, match="nothing to propose"):
        gov.propose(ALICE, "team", 2)
    with pytest.raises(NotFound):
        gov.propose(ALICE, "team", 9)
    with pytest.raises(NotFound):
        gov.propose(ALICE, "team", 1, memory_ids=["0" * 26])
    with pytest.raises(InvalidRequest):
        gov.approve(BOB, "not-an-id")
    with pytest.raises(NotFound):
        gov.approve(BOB, "0" * 26)
    with pytest.raises(InvalidRequest):
        gov.propose(ALICE, "team", 1, reason=7)
    assert observable(gov) == before
    assert gov.proposals.list(ALICE, status="all") == []


def test_governance_files_are_checked(tmp_path):
    bad = tmp_path / "g.toml"
    bad.write_text('[[rule]]\nrollback = "sometimes"\n')
    with pytest.raises(ConfigError, match="invalid governance"):
        Governance.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        Governance.load(tmp_path / "missing.toml")
    assert Governance.load().rollback_mode("notes", "alice") == "direct"  # the packaged default


# -- merging -------------------------------------------------------------------------


def test_merge_archives_the_originals_and_rolling_it_back_restores_them_byte_exactly(memos, cube):
    a = memos.add(ALICE, cube, "Ada likes green tea", tags=["drinks"], metadata={"speaker": "Ada"})
    b = memos.add(ALICE, cube, "ada likes green tea.", tags=["ada"])
    before = memos.state(LOCAL_ADMIN, cube)
    merged = memos.merge(ALICE, cube, [a.id, b.id])
    assert merged.text == "ada likes green tea." and merged.tags == ["drinks", "ada"]  # b is the newer
    assert [(s.memory_id, s.version) for s in merged.provenance.sources] == [(a.id, 1), (b.id, 2)]
    assert {m.id: m.status for m in memos.list(ALICE, cube, status="all")} == {
        a.id: Status.archived, b.id: Status.archived, merged.id: Status.active}
    commit = memos.history(ALICE, cube, limit=1)[0]
    assert commit.op == "merge" and {c.memory_id for c in commit.changes} == {a.id, b.id, merged.id}
    memos.rollback(ALICE, cube, commit.version - 1)
    assert memos.state(LOCAL_ADMIN, cube) == before


def test_merge_checks_the_versions_it_was_planned_on_and_keeps_tags_within_limits(memos, cube):
    a = memos.add(ALICE, cube, "one", tags=[f"a{i}" for i in range(40)])
    b = memos.add(ALICE, cube, "one!", tags=[f"b{i}" for i in range(40)])
    memos.update(ALICE, cube, a.id, "one, edited")
    with pytest.raises(Conflict, match="not 1"):
        memos.merge(ALICE, cube, [a.id, b.id], expected_versions=[1, 2])
    with pytest.raises(InvalidRequest):
        memos.merge(ALICE, cube, [a.id, b.id], expected_versions=[3])
    merged = memos.merge(ALICE, cube, [a.id, b.id], expected_versions=[3, 2])
    assert merged.text == "one, edited" and len(merged.tags) == memos.limits.max_tags


def test_merge_refuses_what_it_cannot_merge(memos, cube):
    a = memos.add(ALICE, cube, "one")
    b = memos.add(ALICE, cube, "two")
    memos.update(ALICE, cube, b.id, status="archived")
    before = observable(memos)
    for ids, error in (([a.id], InvalidRequest), ([a.id, a.id], InvalidRequest), ([a.id, b.id], Conflict),
                       ([a.id, "0" * 26], NotFound)):
        with pytest.raises(error):
            memos.merge(ALICE, cube, ids)
    with pytest.raises(Denied):
        memos.merge(BOB, cube, [a.id, b.id])
    assert observable(memos) == before

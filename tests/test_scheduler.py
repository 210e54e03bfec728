"""The policy scheduler in a real memosd: each built-in policy acts exactly at its thresholds, on a
clock the test moves (``[daemon] clock_file``); dry runs change nothing; actions are versioned and
audited with the policy as actor; a failing policy stops nothing else; runs never overlap and
schedules resume after a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from daemon_fixtures import Daemon, memosctl
from memos.errors import Conflict, Denied, NotFound
from memos.policies.fuse import near_duplicates
from test_activation import _env, _wait_job, tiny_models  # noqa: F401 (the fixture)

DAY = 86_400.0
FAST = {"steps": 4, "learning_rate": 0.01, "batch_size": 2, "kl_weight": 0.0}
POLICIES = f"""
[promote]
min_reads = 3
window_s = {DAY}
[demote]
unused_s = 7200
[distill]
min_reads = 2
stable_s = 3600
min_memories = 2
max_load = 1000.0
recipe = {json.dumps(FAST).replace('":', '" =').replace('{"', '{ "')}
[fuse]
similarity = 0.8
[decay]
unused_s = {DAY}
"""


class SimClock:
    """The daemon's clock: a file it reads the time from (seconds since the epoch)."""

    def __init__(self, path: Path, start: float = 1_900_000_000.0) -> None:
        self.path = path
        self.set(start)

    def set(self, t: float) -> float:
        self.t = t
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(repr(t))
        tmp.replace(self.path)  # the daemon never reads a half-written time
        return t

    def advance(self, seconds: float) -> float:
        return self.set(self.t + seconds)


def policy_daemon(env: dict[str, str], policies: str) -> tuple[Daemon, SimClock]:
    d = Daemon(env=env)
    (d.root / "policies.toml").write_text(policies)
    sim = SimClock(d.root / "clock")
    d.env.update({"MEMOS_DAEMON__POLICIES": str(d.root / "policies.toml"),
                  "MEMOS_DAEMON__CLOCK_FILE": str(sim.path)})
    return d.start(), sim


@pytest.fixture(scope="module")
def running(tiny_models):
    d, sim = policy_daemon(_env(tiny_models), POLICIES)
    try:
        yield d, sim
        d.stop()
    finally:
        d.cleanup()


@pytest.fixture
def admin(running):
    return running[0].client(timeout=60)


@pytest.fixture
def sim(running):
    return running[1]


def planned(client, policy: str, cube: str) -> list[dict]:
    """The actions a dry run of ``policy`` proposes on ``cube``."""
    run = client.policy_run(policy, dry_run=True)
    assert run.error is None and run.dry_run
    return [a.model_dump() for a in run.actions if a.args.get("cube") == cube]


def test_decay_archives_exactly_after_the_unused_time(admin, sim):
    admin.cube_create("decay")
    t0 = sim.advance(DAY)
    idle = admin.add("decay", "The boiler was serviced in May.")
    read = admin.add("decay", "Bo's bicycle is green.")
    sim.set(t0 + DAY / 2)
    admin.get("decay", read.id)  # a read resets its clock
    sim.set(t0 + DAY - 1)
    assert planned(admin, "decay", "decay") == []
    sim.set(t0 + DAY)
    [action] = planned(admin, "decay", "decay")
    assert action["op"] == "update" and action["args"]["id"] == idle.id and "1.0 days" in action["reason"]

    run = admin.policy_run("decay")
    [done] = [a for a in run.actions if a.args["cube"] == "decay"]
    assert done.outcome == "ok" and done.result["id"] == idle.id
    statuses = {m.id: m.status for m in admin.list("decay", status="all")}  # list counts no reads
    assert statuses == {idle.id: "archived", read.id: "active"}
    sim.set(t0 + DAY / 2 + DAY)
    assert [a["args"]["id"] for a in planned(admin, "decay", "decay")] == [read.id]

    commit = admin.history("decay", limit=1)[0]
    assert (commit.op, commit.actor) == ("update", "policy:decay")
    records = admin.audit_tail(5)
    assert ("update", "policy:decay", "decay") in {(r.op, r.actor, r.cube) for r in records}
    assert records[-1].op == "policy_run" and records[-1].actor == "policy:decay"
    assert records[-1].detail["run"] == run.id
    assert admin.policy_history("decay", limit=1)[0].id == run.id


def test_a_dry_run_changes_nothing(admin, sim):
    admin.cube_create("dry")
    admin.add("dry", "an old memory")
    sim.advance(2 * DAY)
    before = ([(c.name, c.version) for c in admin.cube_list()], admin.audit_checkpoint(),
              [r.id for r in admin.policy_history(limit=1000)])
    run = admin.policy_run("decay", dry_run=True)
    assert run.actions and all(a.outcome == "planned" for a in run.actions)
    after = ([(c.name, c.version) for c in admin.cube_list()], admin.audit_checkpoint(),
             [r.id for r in admin.policy_history(limit=1000)])
    assert after == before


def test_promote_builds_an_activation_memory_of_hot_memories_and_demote_drops_it(admin, sim):
    admin.cube_create("hot")
    hot = admin.add("hot", "Ada keeps her bees on the library roof.")
    admin.add("hot", "Olek services the boiler in May.")
    t0 = sim.advance(DAY)
    for _ in range(2):
        admin.get("hot", hot.id)
    assert planned(admin, "promote", "hot") == []
    admin.get("hot", hot.id)
    [action] = planned(admin, "promote", "hot")
    assert action["op"] == "activate" and action["args"]["ids"] == [hot.id]
    sim.set(t0 + DAY + 1)  # the reads fell out of the window
    assert planned(admin, "promote", "hot") == []
    sim.set(t0 + DAY)

    run = admin.policy_run("promote")
    [done] = [a for a in run.actions if a.args["cube"] == "hot"]
    job = _wait_job(admin, done.result["job"])
    assert job["state"] == "done", job
    made = admin.get("hot", job["detail"]["memory"])
    assert made.type == "activation" and made.provenance.actor == "policy:promote"
    assert made.provenance.policy == "promote"
    assert planned(admin, "promote", "hot") == []  # a fresh activation memory holds them

    t1 = made.created_at
    sim.set(t1 + 7200 - 1)
    assert planned(admin, "demote", "hot") == []
    sim.set(t1 + 7200)
    [drop] = planned(admin, "demote", "hot")
    assert drop["op"] == "delete" and drop["args"]["id"] == made.id
    admin.policy_run("demote")
    with pytest.raises(NotFound):
        admin.get("hot", made.id)
    assert admin.get("hot", hot.id).status == "active"  # the source stays


def test_distill_trains_an_adapter_on_stable_often_read_memories_and_fuse_merges_overlapping_ones(admin, sim):
    admin.cube_create("facts")
    t0 = sim.advance(DAY)
    facts = [admin.add("facts", "Q: Where does Ada keep her bees?\nA: On the library roof."),
             admin.add("facts", "Q: Who services the boiler?\nA: Olek, every May.")]
    for m in facts:
        admin.get("facts", m.id)
        admin.get("facts", m.id)
    sim.set(t0 + 3600 - 1)
    assert planned(admin, "distill", "facts") == []
    sim.set(t0 + 3600)
    [action] = planned(admin, "distill", "facts")
    assert action["args"]["ids"] == sorted(m.id for m in facts) and action["args"]["model"] == "tiny"

    run = admin.policy_run("distill")
    [done] = [a for a in run.actions if a.args["cube"] == "facts"]
    job = _wait_job(admin, done.result["job"], timeout=180)
    assert job["state"] == "done", job
    assert planned(admin, "distill", "facts") == []  # a fresh adapter holds them all
    first = job["detail"]["memory"]
    second = _wait_job(admin, admin.distill("facts", ids=[m.id for m in facts], recipe=FAST)["id"], timeout=180)
    assert second["state"] == "done", second

    [fusing] = planned(admin, "fuse", "facts")
    assert fusing["op"] == "fuse" and set(fusing["args"]["ids"]) == {first, second["detail"]["memory"]}
    run = admin.policy_run("fuse")
    [started] = [a for a in run.actions if a.args["cube"] == "facts"]
    fused = _wait_job(admin, started.result["job"], timeout=180)
    assert fused["state"] == "done", fused
    archiving = planned(admin, "fuse", "facts")  # the next run archives what was fused
    assert {(a["op"], a["args"]["id"]) for a in archiving} == {("update", first), ("update", second["detail"]["memory"])}
    admin.policy_run("fuse")
    assert admin.get("facts", first).status == "archived"
    assert admin.get("facts", fused["detail"]["memory"]).provenance.policy == "fuse"


def test_near_duplicates_are_found_exactly_at_the_similarity_threshold():
    texts = {"a": "one two three four five", "b": "One, two; three four!", "c": "one two three four six seven",
             "d": "unrelated words entirely here"}
    assert near_duplicates(texts, 0.8) == [["a", "b"]]  # 4/5 = 0.8; a-c 4/7, b-c 4/6
    assert near_duplicates(texts, 0.81) == []
    assert near_duplicates(texts, 0.66) == [["a", "b"]]  # b-c 4/6, but a-c 4/7: a chain is no group
    chain = {"x": "a b c d e", "y": "a b c d e f", "z": "a b c d e f g"}  # x-y .83, y-z .86, x-z .71
    assert near_duplicates(chain, 0.8) == [["x", "y"]]
    many = {str(i): f"fact number {i} about topic {i % 7}" for i in range(300)}
    many["dup"] = "fact number 5 about topic 5"
    assert near_duplicates(many, 0.9) == [["5", "dup"]]


def test_fuse_merges_near_duplicates_and_rolling_the_fusion_back_restores_both(admin, sim):
    admin.cube_create("dups")
    a = admin.add("dups", "Ada keeps her bees on the library roof", tags=["bees"])
    b = admin.add("dups", "Ada keeps her bees on the library roof.", tags=["ada"])
    admin.add("dups", "Olek services the boiler every May")
    [action] = planned(admin, "fuse", "dups")
    assert action["op"] == "merge" and action["args"]["ids"] == sorted([a.id, b.id])
    admin.policy_run("fuse")
    commit = admin.history("dups", limit=1)[0]
    assert (commit.op, commit.actor) == ("merge", "policy:fuse")
    merged = next(m for m in admin.list("dups") if m.provenance.sources)
    assert merged.provenance.policy == "fuse" and merged.tags == ["bees", "ada"]
    assert {s.memory_id for s in merged.provenance.sources} == {a.id, b.id}
    assert {admin.get("dups", a.id).status, admin.get("dups", b.id).status} == {"archived"}
    assert [h.memory.id for h in admin.search("dups", "bees library roof")][:1] == [merged.id]

    admin.rollback("dups", commit.version - 1)
    assert admin.get("dups", a.id).content_hash == a.content_hash  # byte for byte
    assert admin.get("dups", b.id).content_hash == b.content_hash
    with pytest.raises(NotFound):
        admin.get("dups", merged.id)


def test_a_policy_acts_only_through_writes_on_cubes_and_each_action_is_checked(admin):
    admin.cube_create("aaa-meddle")
    run = admin.policy_run("meddle")
    outcomes = [(a.op, a.outcome, a.error["code"] if a.error else None) for a in run.actions]
    assert outcomes == [("agent_add", "error", "invalid_request"), ("cube_grant", "error", "invalid_request"),
                        ("add", "error", "invalid_request"), ("history", "error", "invalid_request"),
                        ("add", "ok", None)]
    # What it tried to read beyond cubes, memories, jobs and models was refused too.
    assert run.looked_at["calls"] == {"agent_add": "invalid_request", "audit_tail": "invalid_request",
                                      "rollback_approve": "invalid_request", "jobs": "ok"}
    note = admin.get(run.actions[4].args["cube"], run.actions[4].result["id"])
    assert (note.provenance.actor, note.provenance.policy) == ("policy:meddle", "meddle")
    assert not {"mallory", "eve"} & {a.name for a in admin.agent_list()}
    assert "mallory" not in admin.cube_get("aaa-meddle").acl
    refused = [r for r in admin.audit_tail(20) if r.actor == "policy:meddle" and r.outcome != "ok"]
    assert {r.op for r in refused} >= {"add"}  # a malformed request of a policy is audited like a client's


def test_a_failing_policy_is_recorded_and_only_admins_run_policies(running, admin):
    run = admin.policy_run("explode")
    assert run.error == "RuntimeError: this policy always fails" and run.actions == []
    assert admin.policy_history("explode", limit=1)[0].id == run.id
    with pytest.raises(NotFound):
        admin.policy_run("nonesuch")
    token = admin.agent_add("planner")["token"]
    agent = running[0].client(token=token)
    for call in (agent.policy_list, lambda: agent.policy_run("decay", dry_run=True), agent.policy_history):
        with pytest.raises(Denied):
            call()


def test_memosctl_lists_runs_and_dry_runs_policies(running):
    d = running[0]
    listed = memosctl(d, "policy", "list").stdout
    assert all(name in listed for name in ("promote", "demote", "distill", "fuse", "decay"))
    out = memosctl(d, "policy", "run", "decay", "--dry-run").stdout
    assert "decay" in out and "dry run" in out
    assert "decay" in memosctl(d, "policy", "history", "decay").stdout
    assert "no policy" in memosctl(d, "policy", "run", "nonesuch", ok=False).stderr


# -- a scheduler running on its own ----------------------------------------------------


SCHEDULED = """
[explode]
every_s = 0.3
[decay]
cron = "0 3 * * *"
[sleepy]
every_s = 0.2
sleep_s = 0.6
"""


def test_schedules_run_never_overlap_survive_failures_and_resume_after_a_restart():
    d, _ = policy_daemon({}, SCHEDULED)
    try:
        admin = d.client(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = admin.policy_history(limit=1000)
            if sum(r.policy == "sleepy" for r in runs) >= 4 and sum(r.policy == "explode" for r in runs) >= 3:
                break
            time.sleep(0.2)
        sleepy = sorted((r.looked_at["start"], r.looked_at["end"]) for r in runs if r.policy == "sleepy")
        explode = [r for r in runs if r.policy == "explode"]
        assert len(sleepy) >= 4 and len(explode) >= 3, runs
        assert all(r.error and r.trigger == "schedule" for r in explode)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(sleepy, sleepy[1:])), sleepy  # never overlapping

        deadline = time.monotonic() + 10  # a run asked for while the scheduled one runs is refused
        while not next(p for p in admin.policy_list() if p.name == "sleepy").running:
            assert time.monotonic() < deadline, "sleepy never showed as running"
        with pytest.raises(Conflict, match="running"):
            admin.policy_run("sleepy")

        d.proc.send_signal(15)
        assert d.proc.wait(30) == 0
        d.close_clients()
        d.env["MEMOS_DAEMON__POLICIES"] = str(d.root / "slow.toml")
        (d.root / "slow.toml").write_text("[sleepy]\nevery_s = 3600\n[decay]\ncron = \"0 3 * * *\"\n")
        d.start()
        admin = d.client(timeout=30)
        listed = {p.name: p for p in admin.policy_list()}
        last = listed["sleepy"].last_run
        assert last is not None and last.looked_at["start"] >= sleepy[-1][0]  # the last run survived
        # The schedule resumes from the last run (wall-clock time), not from the restart.
        assert abs(listed["sleepy"].next_run - (last.looked_at["end"] + 3600)) < 5
        assert listed["explode"].schedule == "on demand" and listed["explode"].next_run is None
        assert listed["decay"].schedule == "cron 0 3 * * * (UTC)"
        assert listed["decay"].next_run is not None and listed["decay"].next_run % 86400 == 3 * 3600
    finally:
        d.cleanup()

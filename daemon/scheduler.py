"""The policy scheduler: APScheduler runs each policy on its schedule; runs are recorded and audited.

Policies (``memos.policies``, plugins found by entry point) only propose: a
run gives one a read-only :class:`~memos.policies.spec.Context` and gets a
plan back. The scheduler makes each proposed request through the daemon's
own request path (``perform``: parsed, routed, access-checked, prepared,
group-committed and audited exactly like a client's), as the agent
``policy:<name>``. Each run is recorded (``policy_runs``) with what it looked
at, did and why, in one audited commit; where a policy stands
(``policy_state``) is kept with it, so after a restart an interval schedule
resumes from the last run rather than from the start.

A policy never overlaps itself: the scheduled job has one instance at most,
and a per-policy lock also covers runs asked for by ``policy_run``. A policy
that raises fails its own run only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from memos import catalog, clock, codec
from memos.access import Actor
from memos.api import Memos
from memos.catalog import ActionOutcome, PolicyInfo, PolicyRun
from memos.errors import Cancelled, ConfigError, Conflict, InvalidRequest, MemosError, NotFound
from memos.ids import new_id
from memos.ledger import commit_key
from memos.models import Memory
from memos.policies import config as policy_config
from memos.policies.registry import load_policies
from memos.policies.spec import Context, Plan, Policy
from memos.writes import Applied, Write

log = logging.getLogger("memosd.scheduler")

Perform = Callable[[Actor, str, dict[str, Any]], Any]  # the daemon's request path, for its own requests
Submit = Callable[[Write], Any]  # a write made durable through the writer, waited for


def policy_actor(name: str) -> Actor:
    """The agent a policy acts as: admin of every cube, like the local administrator, but named."""
    return Actor(f"policy:{name}", admin=True, policy=name)


_PAGE = 256  # memories read per snapshot while a policy scans a cube
# What no policy reads (agents, the audit, other policies' runs) or requests (besides those:
# access, models, rollback, others' jobs): people's business. A policy approving a rollback
# would be "an admin other than the proposer".
_NOT_READ_BY_POLICIES = ("agent_", "audit_", "policy_")
_NOT_FOR_POLICIES = (*_NOT_READ_BY_POLICIES, "cube_create", "cube_grant", "cube_pin", "cube_unpin", "cube_retention",
                     "model_", "rollback", "job_cancel")


class _Context(Context):
    """A policy's view, read as its agent, paced: after each page of work it sleeps so that its
    thread computes at most ``duty`` of the time. Requests share the interpreter with it, so an
    unpaced scan would make every request wait for its turn."""

    def __init__(self, memos: Memos, perform: Perform, routes: dict[str, Any], actor: Actor, dry_run: bool,
                 duty: float, stopping: threading.Event) -> None:
        self.memos, self.perform, self.routes, self.actor = memos, perform, routes, actor
        self.stopping = stopping
        self.now = clock.now()
        self.dry_run = dry_run
        self.duty = duty
        self._commit_times: dict[tuple[str, int], float] = {}  # (cube, version) -> its commit's time

    def _pace(self, cpu_start: float) -> None:
        if self.duty < 1.0:
            self.stopping.wait((time.thread_time() - cpu_start) * (1.0 / self.duty - 1.0))
        self._check_stopping()

    def cubes(self) -> list[str]:
        return [c.name for c in self.memos.cubes.list_cubes(self.actor)]

    def memories(self, cube: str, type: str | None = None) -> Iterator[Memory]:
        after = None
        commits = self.memos.store.db["commits"]
        while True:
            cpu = time.thread_time()
            page = self.memos.memories.list(self.actor, cube, usage=True, limit=_PAGE, after=after)
            with self.memos.store.read() as txn:
                for m in page:
                    if (cube, m.version) not in self._commit_times:
                        raw = txn.get(commit_key(cube, m.version), db=commits)
                        self._commit_times[cube, m.version] = codec.unpack(raw)["time"] if raw else m.updated_at
            self._pace(cpu)
            yield from (m for m in page if type is None or m.type == type)
            if len(page) < _PAGE:
                return
            after = page[-1].id

    def changed_at(self, memory: Memory) -> float:
        return self._commit_times.get((memory.cube, memory.version), memory.updated_at)

    def call(self, op: str, **args: Any) -> Any:
        self._check_stopping()
        route = self.routes.get(op)
        if (route is None or route.op.where not in ("inline", "worker") or route.op.streams
                or op.startswith(_NOT_READ_BY_POLICIES)):
            raise InvalidRequest(f"a policy may not call {op!r}: it reads cubes, memories, jobs and models", op=op)
        cpu = time.thread_time()
        try:
            return self.perform(self.actor, op, args)
        finally:
            self._pace(cpu)

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise Cancelled("the daemon is shutting down")


class Scheduler:
    operations = catalog.POLICY_OPERATIONS

    def __init__(self, memos: Memos, policies_file: Any, perform: Perform, submit: Submit,
                 routes: dict[str, Any]) -> None:
        self.memos = memos
        self.perform = perform
        self.submit = submit
        self.routes = routes
        classes = load_policies()
        self.settings, configured, unknown = policy_config.load(policies_file, classes)
        for name in unknown:
            log.warning("policies file names no installed policy %r", name)
        self.schedules = {name: schedule for name, (schedule, _) in configured.items()}
        self.policies: dict[str, Policy] = {name: classes[name](settings) for name, (_, settings) in configured.items()}
        self.locks = {name: threading.Lock() for name in self.policies}
        self._stopping = threading.Event()
        self._aps = BackgroundScheduler(
            timezone=UTC, executors={"default": ThreadPoolExecutor(self.settings.threads)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        for name, schedule in self.schedules.items():
            if schedule.enabled and (schedule.every_s is not None or schedule.cron is not None):
                # next_run_time=None would add the job paused: only interval jobs are given one.
                resume = {"next_run_time": self._resume_at(name)} if schedule.every_s is not None else {}
                self._aps.add_job(self._scheduled, self._trigger(name), args=[name], id=name, name=name, **resume)

    def _trigger(self, name: str) -> Any:
        schedule = self.schedules[name]
        if schedule.every_s is not None:
            return IntervalTrigger(seconds=schedule.every_s, timezone=UTC)
        try:
            return CronTrigger.from_crontab(schedule.cron, timezone=UTC)
        except ValueError as exc:
            raise ConfigError(f"policy {name!r}: invalid cron {schedule.cron!r}: {exc}") from None

    def _resume_at(self, name: str) -> datetime:
        """An interval schedule continues from the last run (a run overdue at start runs at once)."""
        every = self.schedules[name].every_s
        assert every is not None
        state = self._state(name)
        last = state["wall"] if state else time.time()
        return datetime.fromtimestamp(max(last + every, time.time()), UTC)

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        self._aps.start()
        log.info("scheduler started", extra={"policies": {n: s.describe() for n, s in self.schedules.items()}})

    def stop(self) -> None:
        """Ask runs under way to stop at their next page or request (recorded as stopped), then stop."""
        self._stopping.set()
        if self._aps.running:
            self._aps.shutdown(wait=True)

    # -- operations -----------------------------------------------------

    def list_policies(self, actor: Actor) -> list[PolicyInfo]:
        self.memos.core.admin_only(actor, "policy_list")
        out = []
        for name, policy in self.policies.items():
            job = self._aps.get_job(name)
            next_run = job.next_run_time if job is not None else None
            last = self._last_run(name)
            out.append(PolicyInfo(
                name=name, description=policy.description, schedule=self.schedules[name].describe(),
                next_run=next_run.timestamp() if next_run is not None else None,
                running=self.locks[name].locked(), last_run=last,
                settings=policy.settings.model_dump(mode="json"),
            ))
        return out

    def run_now(self, actor: Actor, name: str, dry_run: bool = False) -> PolicyRun:
        self.memos.core.admin_only(actor, "policy_run")
        if name not in self.policies:
            raise self.memos.core.refused(actor, "policy_run", None, NotFound(
                f"no policy {name!r}; installed: {', '.join(self.policies) or 'none'}", policy=name))
        run = self._run(name, "manual", actor.name, dry_run)
        if run is None:
            raise self.memos.core.refused(actor, "policy_run", None, Conflict(
                f"policy {name!r} is running; try again when it ends", policy=name))
        return run

    def history(self, actor: Actor, policy: str | None = None, limit: int = 20) -> list[PolicyRun]:
        self.memos.core.admin_only(actor, "policy_history")
        out = []
        with self.memos.store.read() as txn:
            cursor = txn.cursor(db=self.memos.store.db["policy_runs"])
            if cursor.last():
                for _, raw in cursor.iterprev():
                    run = PolicyRun.model_validate(codec.unpack(raw))
                    if policy is None or run.policy == policy:
                        out.append(run)
                        if len(out) >= limit:
                            break
        return out

    # -- runs -----------------------------------------------------------

    def _scheduled(self, name: str) -> None:
        if self._run(name, "schedule", "scheduler", False) is None:
            log.info("policy still running: this run skipped", extra={"policy": name})

    def _run(self, name: str, trigger: str, requested_by: str, dry_run: bool) -> PolicyRun | None:
        """One run, holding the policy's lock; None if a run of it is under way."""
        lock = self.locks[name]
        if not lock.acquire(blocking=False):
            return None
        try:
            actor = policy_actor(name)
            ctx = _Context(self.memos, self.perform, self.routes, actor, dry_run, self.settings.duty_cycle,
                           self._stopping)
            run = PolicyRun(id=new_id(), policy=name, trigger=trigger, requested_by=requested_by,
                            dry_run=dry_run, started=ctx.now, finished=ctx.now)
            try:
                plan = self.policies[name].propose(ctx)
                if not isinstance(plan, Plan):
                    raise TypeError(f"propose returned {type(plan).__name__}, not a Plan")
            except Exception as exc:  # a policy's bug fails its own run, nothing else
                run.error = f"{type(exc).__name__}: {exc}"[:2000]
                # The run's record says what failed; the traceback is for the policy's author.
                log.error("policy failed", extra={"policy": name, "error": run.error})
                log.debug("policy failed", exc_info=True, extra={"policy": name})
                plan = Plan()
            run.looked_at = plan.looked_at
            for action in plan.actions:
                if self._stopping.is_set():
                    run.error = "stopped: the daemon is shutting down"
                    break
                outcome = ActionOutcome(op=action.op, args=action.args, reason=action.reason, outcome="planned")
                if not dry_run:
                    self._apply(actor, outcome)
                run.actions.append(outcome)
            run.finished = clock.now()
            if not dry_run:
                self._record(actor, run)
            log.info("policy ran", extra={"policy": name, "trigger": trigger, "dry_run": dry_run,
                                          "actions": len(run.actions), "error": run.error})
            return run
        finally:
            lock.release()

    def _apply(self, actor: Actor, outcome: ActionOutcome) -> None:
        route = self.routes.get(outcome.op)
        try:
            if (route is None or route.op.where not in ("writer", "job") or "cube" not in route.op.args.model_fields
                    or outcome.op.startswith(_NOT_FOR_POLICIES)):
                raise InvalidRequest(f"a policy may only write memories to or start jobs on a cube, not {outcome.op!r}")
            result = self.perform(actor, outcome.op, outcome.args)
        except MemosError as exc:
            outcome.outcome, outcome.error = "error", {"code": exc.code, "message": exc.message}
            return
        except Exception as exc:  # a bug on the request path: the run goes on
            log.exception("policy action failed", extra={"op": outcome.op})
            outcome.outcome, outcome.error = "error", {"code": "internal", "message": type(exc).__name__}
            return
        outcome.outcome, outcome.result = "ok", _summary(result)

    def _record(self, actor: Actor, run: PolicyRun) -> None:
        """Store the run and where its policy stands, in one audited commit."""
        store = self.memos.store
        try:  # here, not in the commit: a record that does not encode must not fail other writes
            record = codec.pack(run.model_dump(mode="json"))
        except Exception as exc:  # a policy put something unencodable in looked_at or an action
            run.error = f"the run's record could not be encoded ({type(exc).__name__}); its details are dropped"
            run.looked_at = {}
            for action in run.actions:
                action.args, action.result = {"unrecorded": repr(action.args)[:500]}, {}
            record = codec.pack(run.model_dump(mode="json"))
        state = codec.pack({"run": run.id, "time": run.started, "wall": time.time()})
        failed = sum(a.outcome == "error" for a in run.actions)
        detail = {"run": run.id, "trigger": run.trigger, "requested_by": run.requested_by,
                  "actions": len(run.actions), "failed": failed, **({"error": run.error} if run.error else {})}

        def fn(txn: Any) -> Applied:
            runs = store.db["policy_runs"]
            txn.put(run.id.encode(), record, db=runs)
            txn.put(run.policy.encode(), state, db=store.db["policy_state"])
            excess = txn.stat(runs)["entries"] - self.settings.keep_runs
            if excess > 0:  # the oldest runs go (ids sort by time); the audit keeps their summaries
                cursor = txn.cursor(db=runs)
                cursor.first()
                for _ in range(excess):
                    cursor.delete()
            return Applied(None, detail=detail)

        try:
            self.submit(Write(actor, "policy_run", None, fn))
        except MemosError:
            log.exception("recording a policy run failed", extra={"policy": run.policy, "run": run.id})

    def _last_run(self, name: str) -> PolicyRun | None:
        state = self._state(name)
        if state is None:
            return None
        with self.memos.store.read() as txn:
            raw = txn.get(state["run"].encode(), db=self.memos.store.db["policy_runs"])
        return None if raw is None else PolicyRun.model_validate(codec.unpack(raw))

    def _state(self, name: str) -> dict[str, Any] | None:
        with self.memos.store.read() as txn:
            raw = txn.get(name.encode(), db=self.memos.store.db["policy_state"])
        return None if raw is None else codec.unpack(raw)


def _summary(result: Any) -> dict[str, Any]:
    """What an action made, for the run's record: the job started, or the memory or commit and its version."""
    if isinstance(result, dict):
        if "kind" in result and "state" in result:
            return {"job": result["id"], "kind": result["kind"]}
        out = {k: result[k] for k in ("id", "version") if k in result}
        if isinstance(result.get("changes"), list):
            out["memories"] = [c["memory_id"] for c in result["changes"]]
        return out
    return {}

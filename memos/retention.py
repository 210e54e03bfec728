"""History retention: which versions of a cube are kept, pins, and compaction.

A cube version is *kept* while its commit is in ``commits``; compaction deletes the commits of
the versions the rules let go and every version record that no kept version reads (a memory's
state at version K is its last record at or below K), and takes those records off their blobs'
counts, deleting a blob no record refers to any more. ``docs/storage.md`` (Retention) states the
rule; :meth:`memos.ledger.Ledger.require_kept` refuses reads at a dropped version.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lmdb
from pydantic import ValidationError

from . import catalog_retention, clock, codec, principals
from . import validation as check
from .access import Actor
from .catalog_retention import (
    DAY_S,
    MAX_PINS,
    CompactReport,
    RetentionOverride,
    RetentionRules,
)
from .core import Core
from .errors import Conflict, InvalidRequest, NotFound, TooLarge
from .ledger import ABSENT, cube_prefix
from .models import Cube, Role
from .writes import Applied, Write


def rules_for(defaults: RetentionRules, cube: Cube) -> RetentionRules:
    """The rules in effect for ``cube``: the daemon's defaults with the cube's own keys."""
    own = override(cube.settings.get("retention"))
    return defaults.model_copy(update=own.model_dump(exclude_none=True)) if own is not None else defaults


def override(value: Any) -> RetentionOverride | None:
    """A cube's own rules checked (None: none of its own)."""
    if value is None:
        return None
    try:
        return RetentionOverride.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"retention rules: {'.'.join(map(str, first['loc']))}: {first['msg']}",
                             field="rules") from None


def kept_versions(times: Iterable[tuple[int, float]], head: int, rules: RetentionRules, now: float,
                  protected: Iterable[int]) -> set[int]:
    """Of the versions with commits (``times``: version and commit time, oldest first), those kept."""
    times = list(times)
    existing = {v for v, _ in times}
    kept = {head} | (existing & set(protected))
    all_cut, daily_cut = now - rules.all_days * DAY_S, now - rules.daily_days * DAY_S
    newest_of_day: dict[int, int] = {}
    recent_from = None  # the first version made within all_days: it and every later one stay,
    for v, t in times:  # so a clock that stepped back never drops a version newer than a kept one
        if v > head - rules.keep_versions:
            kept.add(v)
        if t > all_cut and recent_from is None:  # younger than all_days: 0 keeps none for its age
            recent_from = v
        if t > daily_cut:
            newest_of_day[int(t // DAY_S)] = v  # oldest first: the last one seen is the day's newest
    kept.update(newest_of_day.values())
    if recent_from is not None:
        kept.update(v for v in existing if v >= recent_from)
    return kept


@dataclass
class Compaction:
    """What compacting one cube drops: commits, version records, and blob references by blob."""

    report: CompactReport
    commits: list[bytes] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)
    blob_refs: dict[str, int] = field(default_factory=dict)


class Retention:
    operations = catalog_retention.RETENTION_OPERATIONS

    def __init__(self, core: Core, defaults: RetentionRules | None = None) -> None:
        self.core = core
        self.defaults = defaults or RetentionRules()

    # -- writes ---------------------------------------------------------

    def write_pin(self, actor: Actor, cube: Any, version: Any, name: Any = None,
                  request_id: str | None = None) -> Write:
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.admin)
            wanted = check.version(version)
            if wanted > found.version:
                raise NotFound(f"cube {found.name!r} has no version {wanted} (latest is {found.version})",
                               cube=found.name, version=wanted)
            core.ledger.require_kept(txn, found, wanted)  # a dropped version cannot come back
            pin = check.name(f"v{wanted}" if name is None else name, "name")
            if found.pins.get(pin, wanted) != wanted:
                raise Conflict(f"pin {pin!r} of cube {found.name!r} already names version {found.pins[pin]}",
                               cube=found.name, name=pin, version=found.pins[pin])
            if pin not in found.pins and len(found.pins) >= MAX_PINS:
                raise TooLarge(f"cube {found.name!r} has {MAX_PINS} pins already", field="name", limit=MAX_PINS)
            found.pins[pin] = wanted
            core.ledger.put_cube(txn, found)
            return Applied(self._shown(txn, found), found.version, detail={"name": pin, "pinned": wanted})

        return Write(actor, "cube_pin", cube, fn, request_id)

    def write_unpin(self, actor: Actor, cube: Any, name: Any, request_id: str | None = None) -> Write:
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.admin)
            pin = check.name(name, "name")
            if pin not in found.pins:
                raise NotFound(f"cube {found.name!r} has no pin {pin!r}", cube=found.name, name=pin)
            version = found.pins.pop(pin)
            core.ledger.put_cube(txn, found)
            return Applied(self._shown(txn, found), found.version, detail={"name": pin, "unpinned": version})

        return Write(actor, "cube_unpin", cube, fn, request_id)

    def write_cube_retention(self, actor: Actor, cube: Any, rules: Any, request_id: str | None = None) -> Write:
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.admin)
            own = override(rules)
            if own is None or not own.model_dump(exclude_none=True):
                found.settings.pop("retention", None)
            else:
                found.settings["retention"] = own.model_dump(exclude_none=True)
            check.metadata(found.settings, core.limits)
            core.ledger.put_cube(txn, found)
            return Applied(self._shown(txn, found), found.version,
                           detail={"retention": found.settings.get("retention")})

        return Write(actor, "cube_retention", cube, fn, request_id)

    def write_compact(self, actor: Actor, cube: Any, dry_run: bool = False, request_id: str | None = None) -> Write:
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.admin)
            plan = self.plan(txn, found, dry_run=bool(dry_run))
            if not dry_run:
                self.apply(txn, found, plan)
            report = plan.report
            detail = report.model_dump(mode="json", exclude={"cube", "rules"})
            return Applied(report, found.version, detail=detail)

        return Write(actor, "cube_compact", cube, fn, request_id)

    # -- reads ----------------------------------------------------------

    def compact_plan(self, actor: Actor, cube: str) -> CompactReport:
        core = self.core

        def fn(txn: lmdb.Transaction) -> CompactReport:
            found = core.require(txn, actor, cube, Role.admin, shared=True)
            return self.plan(txn, found, dry_run=True).report

        return core.read(actor, "cube_compact_plan", cube, fn)

    # -- the work -------------------------------------------------------

    def protected(self, txn: lmdb.Transaction, found: Cube, now: float) -> set[int]:
        """Versions no rule may drop: pinned ones, and the target and base of a pending proposal."""
        out = set(found.pins.values())
        for _, raw in txn.cursor(db=self.core.store.db["proposals"]):
            p = codec.unpack(raw)
            if p["cube"] == found.name and p["status"] == "pending" and now < p["expires_at"]:
                out.update((p["to_version"], p["base_version"]))
        return out

    def plan(self, txn: lmdb.Transaction, found: Cube, dry_run: bool) -> Compaction:
        ledger, db = self.core.ledger, self.core.store.db
        now = clock.now()
        rules = rules_for(self.defaults, found)
        times = ledger.commit_times(txn, found.name)
        kept = sorted(kept_versions(times, found.version, rules, now, self.protected(txn, found, now)))
        keep = set(kept)
        dropped = [v for v, _ in times if v not in keep]
        plan = Compaction(CompactReport(
            cube=found.name, dry_run=dry_run, head=found.version, rules=rules, versions_dropped=len(dropped),
            records_removed=0, blobs_freed=0, bytes_freed=0, versions_kept=len(kept), oldest_kept=kept[0],
            dropped_first=dropped[0] if dropped else None, dropped_last=dropped[-1] if dropped else None))
        if not dropped:
            return plan
        prefix = cube_prefix(found.name)
        plan.commits = [prefix + codec.u64(v) for v in dropped]
        cur = txn.cursor(db=db["versions"])
        ok = cur.set_range(prefix)
        records: list[tuple[int, bytes, bytes]] = []
        while True:
            key = bytes(cur.key()) if ok else b""
            if records and (not key.startswith(records[0][1][:-8]) or len(key) != len(records[0][1])):
                self._unneeded(records, kept, plan)
                records = []
            if not ok or not key.startswith(prefix):
                break
            records.append((codec.from_u64(key[-8:]), key, bytes(cur.value())))
            ok = cur.next()
        plan.report.records_removed = len(plan.records)
        for sha, n in sorted(plan.blob_refs.items()):
            size = ledger.drop_blob_refs(txn, sha, found.name, n, dry_run=True)
            if size is not None:
                plan.report.blobs_freed += 1
                plan.report.bytes_freed += size
        return plan

    @staticmethod
    def _unneeded(records: list[tuple[int, bytes, bytes]], kept: list[int], plan: Compaction) -> None:
        """Add the records of one memory (oldest first) that no kept version reads to ``plan``."""
        needed = []
        for i, (v, _, _) in enumerate(records):
            j = bisect_left(kept, v)  # the oldest kept version at or after v...
            nxt = records[i + 1][0] if i + 1 < len(records) else None
            needed.append(j < len(kept) and (nxt is None or kept[j] < nxt))  # ...reads v, not a later record
        for i, (_, _, state) in enumerate(records):
            # An absent record that no present one precedes says nothing a missing record would not.
            if needed[i]:
                if state != ABSENT:
                    break
                needed[i] = False
        for (_, key, state), keep in zip(records, needed, strict=True):
            if keep:
                continue
            plan.records.append(key)
            if state != ABSENT and (blob := codec.unpack(state).get("blob")) is not None:
                plan.blob_refs[blob["sha256"]] = plan.blob_refs.get(blob["sha256"], 0) + 1

    def apply(self, txn: lmdb.Transaction, found: Cube, plan: Compaction) -> None:
        db = self.core.store.db
        for key in plan.commits:
            txn.delete(key, db=db["commits"])
        for key in plan.records:
            txn.delete(key, db=db["versions"])
        for sha, n in sorted(plan.blob_refs.items()):
            self.core.ledger.drop_blob_refs(txn, sha, found.name, n)

    def _shown(self, txn: lmdb.Transaction, cube: Cube) -> Cube:
        return principals.shown(self.core.store, txn, cube)

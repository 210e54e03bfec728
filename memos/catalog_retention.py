"""The operations of history retention, declared once (``catalog.core_operations`` lists them).

Like :mod:`memos.catalog`, this module imports no storage or transport: the client library and
the settings (``[retention]``) read it without loading either.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .models import Cube
from .operations import Args, Operation

DAY_S = 86_400.0
MAX_PINS = 64  # per cube: each pinned version keeps its records (and blobs) for good


class RetentionRules(BaseModel):
    """Which versions of a cube compaction keeps (``docs/storage.md``, Retention).

    Every version younger than ``all_days``; the newest version of each UTC day younger than
    ``daily_days``; the newest ``keep_versions``; and always the head, pinned versions and those a
    pending rollback proposal names. Ages are those of the versions' commits.
    """

    model_config = ConfigDict(extra="forbid")  # not strict: memosd reads it from MEMOS_RETENTION__* too

    all_days: float = Field(7, ge=0, le=36_500, description="Keep every version younger than this many days.")
    daily_days: float = Field(90, ge=0, le=36_500, description="Keep the newest version of each UTC day "
                              "younger than this many days.")
    keep_versions: int = Field(10, ge=1, le=1 << 30, description="Keep at least the newest this many versions "
                               "(the head among them).")


class RetentionOverride(BaseModel):
    """A cube's own rules (``cube.settings["retention"]``): the keys given replace the defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    all_days: float | None = Field(None, ge=0, le=36_500)
    daily_days: float | None = Field(None, ge=0, le=36_500)
    keep_versions: int | None = Field(None, ge=1, le=1 << 30)


class PinArgs(Args):
    cube: str = Field(max_length=200)
    version: int = Field(ge=0)
    name: str | None = Field(None, max_length=64)  # default: "v<version>"


class UnpinArgs(Args):
    cube: str = Field(max_length=200)
    name: str = Field(max_length=64)


class RetentionArgs(Args):
    cube: str = Field(max_length=200)
    rules: dict[str, Any] | None = None  # all_days, daily_days, keep_versions; null: the daemon's defaults


class CompactArgs(Args):
    cube: str = Field(max_length=200)
    dry_run: bool = False


class CubeOnlyArgs(Args):
    cube: str = Field(max_length=200)


class CompactReport(BaseModel):
    """What a compaction of one cube dropped (or, in a dry run, would drop) and freed."""

    cube: str
    dry_run: bool
    head: int
    rules: RetentionRules  # the rules in effect (the daemon's defaults with the cube's own)
    versions_dropped: int
    records_removed: int  # version records no kept version needs
    blobs_freed: int  # blobs no version record, in any cube, refers to any more
    bytes_freed: int  # their bytes
    versions_kept: int
    oldest_kept: int
    dropped_first: int | None = None  # the oldest and newest version dropped by this compaction
    dropped_last: int | None = None


RETENTION_OPERATIONS = (
    Operation("cube_pin", PinArgs, Cube, "writer",
              "Pin a version under a name so compaction keeps it (cube admin).",
              "write_pin", ("cube", "version")),
    Operation("cube_unpin", UnpinArgs, Cube, "writer", "Remove a pin by name (cube admin).",
              "write_unpin", ("cube", "name")),
    Operation("cube_retention", RetentionArgs, Cube, "writer",
              "Set the cube's own retention rules; null returns it to the daemon's defaults (cube admin).",
              "write_cube_retention", ("cube", "rules")),
    Operation("cube_compact", CompactArgs, CompactReport, "writer",
              "Drop the versions the retention rules let go and free what only they used; a dry run "
              "reports the same and changes nothing (cube admin).", "write_compact", ("cube",)),
    Operation("cube_compact_plan", CubeOnlyArgs, CompactReport, "worker",
              "What cube_compact would drop and free now, as a read (cube admin).", "compact_plan", ("cube",)),
)

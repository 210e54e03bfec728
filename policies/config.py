"""``etc/policies.toml``: when each policy runs, and its thresholds.

Each ``[name]`` section holds the policy's schedule (``enabled``, and
``every_s`` or ``cron``) and its thresholds (the policy's ``settings_model``).
A policy without a section, or without ``every_s`` or ``cron``, runs only
when asked (``memosctl policy run NAME``). The ``[scheduler]`` section is the
scheduler's own.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memos.errors import ConfigError

from .spec import Policy, Settings


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    every_s: float | None = Field(None, gt=0)  # seconds between runs
    cron: str | None = Field(None, min_length=9)  # "minute hour day month weekday", UTC

    @model_validator(mode="after")
    def _one(self) -> Schedule:
        if self.every_s is not None and self.cron is not None:
            raise ValueError("give every_s or cron, not both")
        return self

    def describe(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.every_s is not None:
            return f"every {self.every_s:g} s"
        if self.cron is not None:
            return f"cron {self.cron} (UTC)"
        return "on demand"


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The share of time a run's thread may compute: after each page of memories it scans (and
    # each request it reads through), it sleeps for the rest. Requests share the interpreter
    # with it; 1.0 runs flat out.
    duty_cycle: float = Field(0.5, gt=0, le=1)
    threads: int = Field(2, ge=1, le=64)  # runs at once (of different policies)
    keep_runs: int = Field(10_000, ge=1)  # run records kept (the oldest go; their audit records stay)


_SCHEDULE_KEYS = set(Schedule.model_fields)
SCHEDULER = "scheduler"


def default_file() -> Path:
    return Path(str(resources.files("memos.etc") / "policies.toml"))


def load(path: str | os.PathLike[str] | None, policies: dict[str, type[Policy]]
         ) -> tuple[SchedulerSettings, dict[str, tuple[Schedule, Settings]], list[str]]:
    """The scheduler's settings, each installed policy's schedule and settings, and the sections
    that name no installed policy."""
    file = Path(path) if path is not None else default_file()
    try:
        with file.open("rb") as f:
            raw: dict[str, Any] = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read policies {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid policies file {file}: {exc}") from None
    if SCHEDULER in policies:
        raise ConfigError(f"a policy may not be named {SCHEDULER!r}")
    try:
        scheduler = SchedulerSettings.model_validate(raw.get(SCHEDULER, {}))
    except ValidationError as exc:
        raise ConfigError(f"{file}: invalid [{SCHEDULER}]: {exc}") from None
    out = {}
    for name, cls in policies.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{file}: [{name}] must be a table")
        try:
            schedule = Schedule.model_validate({k: v for k, v in section.items() if k in _SCHEDULE_KEYS})
            settings = cls.settings_model.model_validate({k: v for k, v in section.items() if k not in _SCHEDULE_KEYS})
        except ValidationError as exc:
            raise ConfigError(f"{file}: invalid [{name}]: {exc}") from None
        out[name] = (schedule, settings)
    return scheduler, out, sorted(set(raw) - set(policies) - {SCHEDULER})

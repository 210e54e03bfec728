"""``etc/policies.toml``: when each policy runs, and its thresholds.

Each ``[name]`` section holds the policy's schedule (``enabled``, and
``every_s`` or ``cron``) and its thresholds (the policy's ``settings_model``).
A policy without a section, or without ``every_s`` or ``cron``, runs only
when asked (``memosctl policy run NAME``).
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


_SCHEDULE_KEYS = set(Schedule.model_fields)


def default_file() -> Path:
    return Path(str(resources.files("memos.etc") / "policies.toml"))


def load(path: str | os.PathLike[str] | None, policies: dict[str, type[Policy]]
         ) -> tuple[dict[str, tuple[Schedule, Settings]], list[str]]:
    """Each installed policy's schedule and settings, and the sections that name no installed policy."""
    file = Path(path) if path is not None else default_file()
    try:
        with file.open("rb") as f:
            raw: dict[str, Any] = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read policies {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid policies file {file}: {exc}") from None
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
    return out, sorted(set(raw) - set(policies))

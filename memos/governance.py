"""Governance of rollback: which agents roll back which cubes directly, and which must propose.

The rules come from ``etc/governance.toml`` (``[daemon] governance`` names
another file). They are read in order; the first whose ``cubes`` and
``agents`` patterns (shell-style, as :mod:`fnmatch` matches them) both match
decides how that agent may roll that cube back:

* ``direct``: at once, by ``rollback`` (the agent still needs admin on the cube);
* ``propose``: by a proposal (``rollback_propose``, which needs write on the
  cube) that an agent other than the proposer, with admin on the cube,
  approves; proposals expire after ``proposal_ttl_s``;
* ``deny``: neither.

An agent no rule matches must propose. Agents are named as they
authenticate: ``admin`` is the local administrator, ``policy:<name>`` a
policy of the scheduler.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

Mode = Literal["direct", "propose", "deny"]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cubes: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    agents: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    rollback: Mode

    def matches(self, cube: str, agent: str) -> bool:
        return (any(fnmatch.fnmatchcase(cube, p) for p in self.cubes)
                and any(fnmatch.fnmatchcase(agent, p) for p in self.agents))


class Governance(BaseModel):
    """The rules; the default lets every cube admin roll back directly."""

    model_config = ConfigDict(extra="forbid")

    proposal_ttl_s: float = Field(7 * 86_400, gt=0, le=10 * 365 * 86_400)
    rule: list[Rule] = Field(default_factory=lambda: [Rule(rollback="direct")])

    def rollback_mode(self, cube: str, agent: str) -> Mode:
        for rule in self.rule:
            if rule.matches(cube, agent):
                return rule.rollback
        return "propose"

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Governance:
        """The rules in ``path``, or in the packaged ``etc/governance.toml``."""
        file = Path(path) if path is not None else Path(str(resources.files("memos.etc") / "governance.toml"))
        try:
            with file.open("rb") as f:
                return cls.model_validate(tomllib.load(f))
        except OSError as exc:
            raise ConfigError(f"cannot read governance rules {file}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"invalid governance rules in {file}: {exc}") from None

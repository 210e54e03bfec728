"""Operations about the caller and the background work it can see: ping, whoami, jobs."""

from __future__ import annotations

import os
from typing import Any

from . import catalog
from .access import Actor
from .cubes import Cubes
from .errors import Denied, MemosError
from .jobs import Jobs
from .models import Role


class Session:
    operations = catalog.SESSION_OPERATIONS

    def ping(self, actor: Actor) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid(), "protocol": catalog.PROTOCOL_VERSION}

    def whoami(self, actor: Actor) -> dict[str, Any]:
        return {"agent": actor.name, "id": actor.key, "admin": actor.admin}


class JobControl:
    operations = catalog.JOB_OPERATIONS

    def __init__(self, jobs: Jobs, cubes: Cubes) -> None:
        self.jobs = jobs
        self.cubes = cubes

    def list_jobs(self, actor: Actor) -> list[dict[str, Any]]:
        """Jobs on cubes the caller may read (all of them for the administrator)."""
        readable = None if actor.admin else {c.name for c in self.cubes.list_cubes(actor)}
        return [j for j in self.jobs.list() if readable is None or j["cube"] in readable]

    def cancel_job(self, actor: Actor, id: str) -> dict[str, Any]:
        """Cancel a job: the administrator any, a cube's admins the jobs on their cube."""
        try:
            job = self.jobs.get(id)
            if not actor.admin and job.cube is None:
                raise Denied("cancelling this job needs the local administrator", job=id)
        except MemosError as exc:  # audited like every refused request
            raise self.cubes.core.refused(actor, "job_cancel", None, exc) from None
        if not actor.admin:
            self.cubes.check_role(actor, job.cube, Role.admin, "job_cancel")  # audits a refusal itself
        return self.jobs.cancel(id).to_wire()

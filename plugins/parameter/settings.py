"""The ``[parameter]`` section of memosd.toml (``MEMOS_PARAMETER__<KEY>``): distillation and adapters.

Only pydantic here: the core reads and validates the section without importing torch.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from memos.plugins.models.recipe import Recipe


class ParameterSettings(BaseModel):
    recipe: Recipe = Field(default_factory=Recipe,
                           description="The distillation recipe; a request may override any of its keys.")
    max_facts: int = Field(2000, ge=1, le=100_000, description="Most memories one distillation takes.")
    nice: int = Field(19, ge=0, le=19,
                      description="Niceness of the training process: the daemon's requests go first.")
    idle: bool = Field(
        True, description="Run the training process under SCHED_IDLE (Linux): any other runnable thread preempts "
                          "it at once, where niceness alone lets it finish its time slice first.")
    threads: int | None = Field(None, ge=1, le=1024,
                                description="torch threads of the training process (None: torch's default).")
    concurrent_jobs: int = Field(
        2, ge=1, le=64,
        description="Distillations and fusions running at once over all models (one per model at a time; "
                    "the others wait).")

"""The operations parameter memory brings: their arguments, results and declarations.

Only pydantic and :mod:`memos.operations` here: the client library and the
documentation read these declarations without importing torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, create_model
from typing_extensions import TypedDict

from memos.jobs import JobInfo
from memos.operations import Args, Operation
from memos.plugins.models.recipe import Recipe

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

# Every key of the recipe, each optional: what a request overrides of [parameter] recipe.
RecipeOverrides = create_model(  # type: ignore[call-overload]
    "RecipeOverrides", __config__=ConfigDict(extra="forbid"),
    **{name: (info.annotation | None, Field(None, description=info.description, json_schema_extra=None))
       for name, info in Recipe.model_fields.items()})


class DistillArgs(Args):
    cube: str = Field(max_length=200)
    ids: list[str] | None = Field(None, max_length=100_000)  # these plaintext memories
    tag: str | None = Field(None, max_length=64)  # or the active plaintext memories with this tag
    model: str | None = Field(None, pattern=MODEL_NAME)  # default: [activation] default_model
    recipe: RecipeOverrides | None = None  # type: ignore[valid-type]


class AdaptersArgs(Args):
    cube: str = Field(max_length=200)


class FuseArgs(Args):
    cube: str = Field(max_length=200)
    ids: list[str] = Field(min_length=2, max_length=16)  # parameter memories of one model
    weights: list[float] | None = Field(None, max_length=16)  # default: equal, summing to 1
    combination: Literal["linear", "svd", "ties", "cat"] = "linear"
    density: float | None = Field(None, gt=0.0, le=1.0)  # ties: the share of each adapter's weights kept
    svd_rank: int | None = Field(None, ge=1, le=1024)  # svd: the fused rank (default: the largest)


class SourceInfo(TypedDict):
    memory_id: str
    version: int


class AdapterInfo(TypedDict):
    memory_id: str
    version: int  # the parameter memory's own version
    model: str  # identity key of the base model
    model_name: str
    rank: int
    alpha: float
    target_modules: list[str]
    parameters: int
    size: int  # bytes of the stored adapter
    sha256: str
    sources: list[SourceInfo]  # distilled memories, or the adapters fused
    facts: list[SourceInfo]  # the plaintext memories it holds, at the versions it learnt
    stale: bool  # a fact changed (or is gone) since: generation does not use it until distilled again
    stale_facts: list[str]
    fused: dict[str, Any] | None  # combination and weights, for a fused adapter
    report: dict[str, Any]  # the training report (steps, losses, seconds, recipe)
    created_at: float


OPERATIONS: tuple[Operation, ...] = (
    Operation("distill", DistillArgs, JobInfo, "job",
              "Train a LoRA adapter on plaintext memories in the background: a parameter memory (write role).",
              "distill", ("cube",)),
    Operation("adapters", AdaptersArgs, list[AdapterInfo], "worker",
              "A cube's parameter memories: model, rank, sources, facts, stale, training report.", "adapters",
              ("cube",)),
    Operation("fuse", FuseArgs, JobInfo, "job",
              "Merge parameter memories into a new one (linear, svd, ties or cat) in the background (write role).",
              "fuse", ("cube", "ids")),
)

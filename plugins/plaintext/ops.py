"""The operations plaintext search brings: their arguments, results and declarations.

Only pydantic and :mod:`memos.operations` here: the client library and the
documentation read these declarations without loading the engine or a model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from typing_extensions import TypedDict

from memos.models import SearchHit
from memos.operations import Args, NoArgs, Operation


class SearchArgs(Args):
    cube: str = Field(max_length=200)
    query: str = Field(max_length=8192)
    k: int = Field(10, ge=1, le=1000)
    at: int | None = Field(None, ge=0)  # search the cube as it was at this version
    tags: list[str] | None = None  # every one of them
    status: Literal["active", "archived", "all"] = "active"  # deleted memories are not searchable
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until
    metadata: dict[str, Any] | None = None  # each key equal to its value


class ReindexArgs(Args):
    cube: str = Field(max_length=200)


class ReindexStarted(TypedDict):
    cube: str
    started: bool
    job: str  # its id in `jobs` (kind ``build_index``); `job_cancel` stops it


class EmbedderInfo(TypedDict):
    name: str
    identity: str  # what client-made vectors must be sent with (``embedder``); changes with the vector space
    dim: int


OPERATIONS: tuple[Operation, ...] = (
    Operation("search", SearchArgs, list[SearchHit], "worker",
              "Hybrid (dense + BM25) search, filtered, now or at a version.", "search", ("cube", "query")),
    Operation("reindex", ReindexArgs, ReindexStarted, "job",
              "Rebuild a cube's search index in the background (cube admin).", "reindex", ("cube",)),
    Operation("embedder", NoArgs, EmbedderInfo, "worker",
              "The embedder's identity and dimension (for client-made vectors).", "embedder_info"),
)

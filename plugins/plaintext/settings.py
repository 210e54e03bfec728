"""The ``[search]`` section of memosd.toml (``MEMOS_SEARCH__<KEY>``): plaintext search's configuration.

Kept in its own module with nothing but pydantic, so the core can read and
validate the section without importing anything of the search itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class SearchSettings(BaseModel):
    embedder: str = Field("minilm", description="Embedder plugin by name (`memos.embedders` entry points); 'none' turns search off.")
    embedder_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the embedder.")
    ann_threshold: int = Field(50_000, description="Cubes with more searchable memories use the HNSW index.")
    oversample: int = Field(4, description="Candidates fetched per wanted result before filters apply.")
    ready_timeout_s: float = Field(60.0, description="How long a search waits for a loading model or index.")
    max_index_lag: int = Field(20_000, description="Committed memories the indexer may fall behind before writes wait.")

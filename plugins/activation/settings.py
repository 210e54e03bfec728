"""The ``[activation]`` section of memosd.toml (``MEMOS_ACTIVATION__<KEY>``): models and generation.

Only pydantic and the light half of :mod:`memos.plugins.models` here: the
core reads and validates the section without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from memos.plugins.models import DEFAULT_MODELS, ModelSpec


def _default_models() -> dict[str, ModelSpec]:
    return {name: spec.model_copy() for name, spec in DEFAULT_MODELS.items()}


class ActivationSettings(BaseModel):
    models: dict[str, ModelSpec] = Field(
        default_factory=_default_models,
        description="Configured models by name (more are added at run time with model_add).")
    default_model: str = Field("smollm2", description="The model activate and generate use when none is named.")
    kv_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="What KV caches are stored in (bfloat16 halves them, at a small cost in accuracy).")
    max_cache_tokens: int = Field(4096, ge=1, description="Longest memory preamble an activation memory may hold.")
    max_new_tokens: int = Field(256, ge=1, description="Tokens generate produces when max_tokens is not given.")
    retrieve_k: int = Field(5, ge=0, le=1000, description="Plaintext memories generate retrieves when k is not given.")
    max_waiting_generations: int = Field(
        1, ge=0, le=64,
        description="Generations that may wait for a model behind the one it runs; more get `unavailable` at once "
                    "(each waiting one holds a worker thread).")
    threads: int | None = Field(None, ge=1, le=1024,
                                description="torch threads for model work (a model's own threads setting wins).")

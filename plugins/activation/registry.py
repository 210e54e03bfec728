"""The models the daemon knows: configured in ``[activation] models``, or added with ``model_add``.

Each is loaded once per process, on first use, by whichever thread needs it
(a job on the model executor, a ``generate`` on a worker) and kept; every use
of a loaded model is serialised with ``model.lock``. A model replaced by
``model_add`` (another spec under the same name) is loaded afresh.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from memos.errors import ConfigError, MemosError, NotFound, Unavailable
from memos.memtypes import Services
from memos.plugins.models import CausalLM, ModelIdentity, ModelSpec, identity_of, load, model_folder

from .settings import ActivationSettings

DB = "models"


def spec_key(spec: ModelSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


class Registry:
    def __init__(self, services: Services, settings: ActivationSettings) -> None:
        self.services = services
        self.settings = settings
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._loaded: dict[str, tuple[str, CausalLM]] = {}  # name -> (spec key, model)
        self._generations: dict[str, int] = {}  # name -> generations running or waiting for it

    # -- specs ---------------------------------------------------------------

    def added(self) -> dict[str, ModelSpec]:
        """Models added with model_add (rows of the ``models`` sub-database)."""
        out = {}
        with self.services.read_rows() as rows:
            for key, value in rows.items(DB):
                out[key.decode()] = ModelSpec.model_validate_json(value)
        return out

    def specs(self) -> dict[str, tuple[ModelSpec, str]]:
        """Every model by name: (spec, "config" or "added"); the configuration wins a clash."""
        out = {name: (spec, "added") for name, spec in self.added().items()}
        out.update({name: (spec, "config") for name, spec in self.settings.models.items()})
        return dict(sorted(out.items()))

    def name(self, model: str | None) -> str:
        return self.settings.default_model if model is None else model

    def spec(self, model: str | None) -> tuple[str, ModelSpec]:
        """(name, spec) of ``model`` (the default model if None); NotFound if nobody configured it."""
        name = self.name(model)
        found = self.specs().get(name)
        if found is None:
            raise NotFound(f"no model named {name!r}; known: {sorted(self.specs())}", model=name)
        spec = found[0]
        if spec.threads is None and self.settings.threads is not None:
            spec = spec.model_copy(update={"threads": self.settings.threads})
        return name, spec

    # -- identities and loaded models ------------------------------------------

    def identity(self, model: str | None) -> tuple[str, ModelIdentity]:
        """(name, identity) from the model's files; the loaded model's if it is loaded."""
        name, spec = self.spec(model)
        with self._lock:
            held = self._loaded.get(name)
        if held is not None and held[0] == spec_key(spec):
            return name, held[1].identity
        return name, identity_of(name, model_folder(name, spec), spec.dtype)

    def loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def get(self, model: str | None) -> CausalLM:
        """The loaded model (loading it here the first time: seconds)."""
        name, spec = self.spec(model)
        key = spec_key(spec)
        with self._lock:
            held = self._loaded.get(name)
            if held is not None and held[0] == key:
                return held[1]
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:  # one load per model at a time; the others wait for it
            with self._lock:
                held = self._loaded.get(name)
                if held is not None and held[0] == key:
                    return held[1]
            try:
                lm = load(name, spec)
            except MemosError:
                raise
            except Exception as exc:  # a broken folder: not a bug of the daemon's
                raise ConfigError(f"model {name!r} cannot be loaded: {type(exc).__name__}: {exc}",
                                  model=name) from exc
            with self._lock:
                self._loaded[name] = (key, lm)
            # A loaded model is hundreds of thousands of Python objects (modules, parameters,
            # tokenizer tables) that live as long as it stays loaded. Frozen, full garbage
            # collections no longer walk them: unfrozen, each pause that stops every thread
            # of the daemon (requests included) grows to a fifth of a second.
            gc.freeze()
            return lm

    @contextmanager
    def using(self, model: str | None) -> Iterator[CausalLM]:
        """The loaded model, held for this thread alone."""
        lm = self.get(model)
        with lm.lock:
            yield lm

    @contextmanager
    def generating(self, model: str | None) -> Iterator[CausalLM]:
        """``using`` for a generation, which holds a worker thread while it waits for the model.

        At most ``max_waiting_generations`` wait behind the one running; more
        are refused with ``unavailable`` at once, so that generations never
        take every worker and the daemon's other reads keep being served.
        """
        name = model or self.settings.default_model
        with self._lock:
            if self._generations.get(name, 0) > self.settings.max_waiting_generations:
                raise Unavailable(f"model {name!r} is busy with {self._generations[name]} generations; retry shortly",
                                  model=name)
            self._generations[name] = self._generations.get(name, 0) + 1
        try:
            with self.using(model) as lm:
                yield lm
        finally:
            with self._lock:
                self._generations[name] -= 1

    def forget(self) -> None:
        with self._lock:
            self._loaded.clear()

    def info(self, name: str, spec: ModelSpec, source: str) -> dict[str, Any]:
        """One model_list entry."""
        entry: dict[str, Any] = {"name": name, "spec": spec.model_dump(mode="json"), "source": source,
                                 "default": name == self.settings.default_model, "prepared": False,
                                 "loaded": self.loaded(name), "identity": None, "error": None}
        try:
            entry["identity"] = self.identity(name)[1].key
            entry["prepared"] = True
        except MemosError as exc:
            entry["error"] = exc.message
        except OSError as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        return entry

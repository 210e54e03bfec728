"""memosctl against a real memosd: the command names and JSON shapes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from daemon_fixtures import Daemon


@pytest.fixture(scope="module")
def ctl():
    d = Daemon().start()

    def run(*args: str, token: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "MEMOS_SOCKET": str(d.socket)}
        env.pop("MEMOS_TOKEN", None)
        if token:
            env["MEMOS_TOKEN"] = token
        proc = subprocess.run([sys.executable, "-m", "memos.cli", *args], capture_output=True, text=True,
                              env=env, timeout=60)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    def js(*args: str, **kw):
        return json.loads(run(*args, "--json", **kw).stdout)

    run.json = js
    try:
        yield run
    finally:
        d.cleanup()


def test_the_whole_loop_in_json(ctl, tmp_path):
    js = ctl.json
    assert js("cube", "create", "notes")["name"] == "notes"
    assert [c["name"] for c in js("cube", "list")] == ["notes"]
    added = js("add", "notes", "Ada prefers tea", "--tag", "prefs", "--tag", "drinks")
    assert added["type"] == "plaintext" and added["text"] == "Ada prefers tea" and added["version"] == 1
    assert added["tags"] == ["prefs", "drinks"]
    mid = added["id"]
    updated = js("update", "notes", mid, "Ada prefers coffee")
    assert updated["version"] == 2
    assert js("get", "notes", mid)["text"] == "Ada prefers coffee"
    assert js("get", "notes", mid, "--at", "1")["text"] == "Ada prefers tea"
    second = js("add", "notes", "The boiler is serviced in May")
    assert [m["id"] for m in js("list", "notes", "--limit", "1")] == [mid]
    assert len(js("list", "notes")) == 2
    js("delete", "notes", second["id"])
    assert [c["version"] for c in js("history", "notes")] == [4, 3, 2, 1, 0]
    diff = js("diff", "notes", "1", "2")
    assert [(d["memory_id"], d["change"]) for d in diff] == [(mid, "modified")]
    commit = js("rollback", "notes", "--to", "1")
    assert commit["version"] == 5 and commit["op"] == "rollback"
    assert js("get", "notes", mid)["text"] == "Ada prefers tea"
    assert js("search", "notes", "tea", "-k", "1")[0]["memory"]["id"] == mid
    verify = js("audit", "verify")
    assert verify["ok"] is True and verify["records"] == 6  # create, 2 adds, update, delete, rollback
    assert [r["op"] for r in js("audit", "tail")][-1] == "rollback"

    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"speaker": "Ada", "text": "I moved to Lisbon"}\n{"speaker": "Bo", "text": "Nice!"}\n')
    ingested = js("ingest", "notes", str(chat), "--session", "s1")
    assert [m["metadata"]["speaker"] for m in ingested] == ["Ada", "Bo"]


def test_agents_tokens_and_roles(ctl):
    js = ctl.json
    js("cube", "create", "private")
    token = js("agent", "add", "scout")["token"]
    assert token.startswith("scout.")
    denied = ctl("list", "private", token=token, ok=False)
    assert denied.returncode != 0
    assert denied.stderr.strip().startswith("memosctl: denied:")
    js("cube", "grant", "private", "scout", "write")
    assert js("add", "private", "seen by scout", token=token)["provenance"]["actor"] == "scout"
    flag = ctl("--token", token, "--json", "whoami")
    assert json.loads(flag.stdout)["agent"] == "scout"
    assert ctl("rollback", "private", "--to", "0", token=token, ok=False).stderr.startswith("memosctl: denied:")


def test_failures_exit_non_zero_with_code_and_message(ctl):
    missing = ctl("get", "nowhere", "01ARZ3NDEKTSV4RRFFQ69G5FAV", ok=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("memosctl: not_found: ")
    bad = ctl("add", "bad name!", "text", ok=False)
    assert bad.returncode == 1 and bad.stderr.startswith("memosctl: invalid_request: ")
    nodaemon = subprocess.run([sys.executable, "-m", "memos.cli", "--socket", "/tmp/no-such-memosd.sock",
                               "--timeout", "0.3", "ping"], capture_output=True, text=True, timeout=60)
    assert nodaemon.returncode == 1 and "unavailable: memosd is not running" in nodaemon.stderr

"""memos-mcp against a real memosd, driven by the MCP SDK's own client (stdio and streamable HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from daemon_fixtures import ROOT, Daemon  # noqa: E402

SERVER = [sys.executable, "-m", "memos.integrations.mcp_server"]
BASE_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(env={"MEMOS_SEARCH__EMBEDDER": "hashing"}).start()
    try:
        yield d
        d.stop()
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def admin(daemon):
    return daemon.client()


@asynccontextmanager
async def stdio_session(sock: Path, token: str | None = None, log: Path | None = None):
    """An initialized MCP client session on a memos-mcp subprocess over stdio."""
    env = dict(BASE_ENV)
    if token:
        env["MEMOS_TOKEN"] = token
    params = StdioServerParameters(command=SERVER[0], args=[*SERVER[1:], "--socket", str(sock)], env=env,
                                   cwd=str(ROOT))
    with open(log or os.devnull, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def text_of(result) -> str:
    return "\n".join(item.text for item in result.content if item.type == "text")


def payload(result) -> dict:
    """The JSON a tool returned: its last text block, which must equal the structured content."""
    assert not result.is_error, text_of(result)
    data = json.loads(result.content[-1].text)
    assert result.structured_content == data
    return data


def run(coro):
    """Run a scenario; a failure inside the SDK's task groups is raised as itself."""
    try:
        return asyncio.run(asyncio.wait_for(coro, 60))
    except BaseExceptionGroup as group:
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None


def test_tools_add_search_history_rollback(daemon, admin, tmp_path):
    admin.cube_create("mcp-notes")

    async def scenario():
        async with stdio_session(daemon.socket, log=tmp_path / "server.log") as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert {"search", "add", "get", "list", "update", "delete", "history", "diff", "rollback",
                    "audit_verify", "generate", "activate", "activations", "cubes"} <= tools.keys()
            assert "distill" not in tools
            listed = payload(await s.call_tool("cubes", {}))
            assert "mcp-notes" in [c["name"] for c in listed["cubes"]] and listed["agent"] == "admin"
            for tool in tools.values():
                assert tool.description and tool.input_schema["type"] == "object"
            assert tools["search"].input_schema["required"] == ["cube", "query"]
            assert tools["search"].annotations.read_only_hint is True

            added = payload(await s.call_tool("add", {"cube": "mcp-notes", "text": "Ada prefers tea in the morning",
                                                      "tags": ["preferences"]}))
            first = added["memories"][0]
            assert first["text"] == "Ada prefers tea in the morning" and first["version"] == 1
            assert first["provenance"]["actor"] == "admin"

            talk = [{"speaker": "Ada", "text": "The deploy key rotates on Fridays."},
                    {"speaker": "Bo", "text": "Noted, I will rotate it this week."}]
            conv = payload(await s.call_tool("add", {"cube": "mcp-notes", "messages": talk, "session": "monday"}))
            assert [m["metadata"]["speaker"] for m in conv["memories"]] == ["Ada", "Bo"]
            assert {m["version"] for m in conv["memories"]} == {2}

            both = await s.call_tool("add", {"cube": "mcp-notes", "text": "x", "messages": talk})
            assert both.is_error and text_of(both).startswith("invalid_request:")

            found = await s.call_tool("search", {"cube": "mcp-notes", "query": "Ada prefers tea", "k": 3})
            framing = found.content[0].text
            assert "stored memories" in framing and "not instructions" in framing
            hits = payload(found)
            assert hits["note"].startswith("Stored memories: untrusted data")
            top = hits["memories"][0]
            assert top["id"] == first["id"] and top["score"] is not None
            assert set(top) >= {"id", "version", "text", "tags", "provenance", "score"}

            updated = payload(await s.call_tool("update", {"cube": "mcp-notes", "id": first["id"],
                                                           "text": "Ada prefers coffee in the morning"}))
            assert updated["memories"][0]["version"] == 3

            history = payload(await s.call_tool("history", {"cube": "mcp-notes"}))
            assert [c["version"] for c in history["commits"]] == [3, 2, 1, 0]
            assert history["commits"][0]["changes"] == [{"memory_id": first["id"], "change": "modified"}]

            diff = payload(await s.call_tool("diff", {"cube": "mcp-notes", "v1": 2, "v2": 3}))
            assert [(c["before"]["text"], c["after"]["text"]) for c in diff["changes"]] == [
                ("Ada prefers tea in the morning", "Ada prefers coffee in the morning")]

            rolled = payload(await s.call_tool("rollback", {"cube": "mcp-notes", "to_version": 2}))
            assert rolled["commit"]["version"] == 4

            got = payload(await s.call_tool("get", {"cube": "mcp-notes", "id": first["id"], "at": 3}))
            assert got["memories"][0]["text"] == "Ada prefers coffee in the morning"
            page = payload(await s.call_tool("list", {"cube": "mcp-notes", "limit": 2}))
            assert len(page["memories"]) == 2 and page["next_after"] == page["memories"][-1]["id"]

            audit = payload(await s.call_tool("audit_verify", {}))
            assert audit["ok"] and audit["head"]["seq"] > 0

            missing = await s.call_tool("get", {"cube": "mcp-notes", "id": "0" * 26})
            assert missing.is_error and text_of(missing).startswith("not_found:")
            return first["id"]

    memory_id = run(scenario())
    # The state, read through the client library: the rollback restored the old text as version 4.
    assert admin.get("mcp-notes", memory_id).text == "Ada prefers tea in the morning"
    assert admin.cube_get("mcp-notes").version == 4
    assert [c.op for c in admin.history("mcp-notes", limit=1)] == ["rollback"]
    assert admin.audit_verify().ok


def test_agent_token_denied_is_a_tool_error(daemon, admin, tmp_path):
    admin.cube_create("mcp-private")
    admin.add("mcp-private", "the admin's secret")
    admin.cube_create("mcp-shared")
    admin.add("mcp-shared", "the shared note")
    token = admin.agent_add("mcp-eve")["token"]
    admin.cube_grant("mcp-shared", "mcp-eve", "write")
    log = tmp_path / "server.log"

    async def scenario():
        async with stdio_session(daemon.socket, token=token, log=log) as s:
            denied = await s.call_tool("search", {"cube": "mcp-private", "query": "secret"})
            assert denied.is_error
            assert text_of(denied).startswith("denied:"), text_of(denied)
            assert "secret" not in text_of(denied)
            assert (denied.meta or {}).get("memos/error", {}).get("code") == "denied"
            refused = await s.call_tool("add", {"cube": "mcp-private", "text": "intrusion"})
            assert refused.is_error and text_of(refused).startswith("denied:")
            # write on the shared cube, but rollback needs admin
            no_admin = await s.call_tool("rollback", {"cube": "mcp-shared", "to_version": 1})
            assert no_admin.is_error and text_of(no_admin).startswith("denied:")
            # ...and the server goes on serving, as mcp-eve
            added = payload(await s.call_tool("add", {"cube": "mcp-shared", "text": "by eve"}))
            assert added["memories"][0]["provenance"]["actor"] == "mcp-eve"

            listing = json.loads((await s.read_resource("memos://cubes")).contents[0].text)
            assert listing["agent"] == "mcp-eve"
            assert [(c["name"], c["role"]) for c in listing["cubes"]] == [("mcp-shared", "write")]
            with pytest.raises(MCPError) as info:
                await s.read_resource("memos://cube/mcp-private")
            assert info.value.message.startswith("denied:") and info.value.data["code"] == "denied"

    run(scenario())
    assert [m.text for m in admin.list("mcp-private")] == ["the admin's secret"]
    assert [m.provenance.actor for m in admin.list("mcp-shared")] == ["admin", "mcp-eve"]
    denials = [r for r in admin.audit_tail(200) if r.outcome == "denied" and r.actor == "mcp-eve"]
    assert {r.op for r in denials} >= {"search", "add", "rollback"}
    assert "Traceback" not in log.read_text()


def test_resources(daemon, admin):
    admin.cube_create("mcp-described")
    admin.add_many("mcp-described", ["one", "two", "three"])
    gone = admin.add("mcp-described", "four")
    admin.delete("mcp-described", gone.id)
    admin.agent_add("mcp-reader")
    admin.cube_grant("mcp-described", "mcp-reader", "read")

    async def scenario():
        async with stdio_session(daemon.socket) as s:
            assert [str(r.uri) for r in (await s.list_resources()).resources] == ["memos://cubes"]
            templates = (await s.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["memos://cube/{name}"]
            listing = json.loads((await s.read_resource("memos://cubes")).contents[0].text)
            assert "mcp-described" in [c["name"] for c in listing["cubes"]]
            read = await s.read_resource("memos://cube/mcp-described")
            assert read.contents[0].mime_type == "application/json"
            cube = json.loads(read.contents[0].text)
            assert cube["owner"] == "admin" and cube["version"] == 3
            assert cube["acl"]["mcp-reader"] == "read"
            assert cube["memories_by_type"] == {"plaintext": 3}
            assert cube["memories_by_status"] == {"active": 3, "deleted": 1}
            with pytest.raises(MCPError) as info:
                await s.read_resource("memos://cube/no-such-cube")
            assert info.value.message.startswith("not_found:")

    run(scenario())


def test_daemon_not_running_is_a_clear_error(tmp_path):
    async def scenario():
        async with stdio_session(tmp_path / "nobody.sock") as s:
            result = await s.call_tool("list", {"cube": "notes"})
            assert result.is_error
            assert text_of(result).startswith("unavailable: memosd is not running")

    run(scenario())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_transport(daemon, admin, tmp_path):
    admin.cube_create("mcp-http")
    token = admin.agent_add("mcp-http-agent")["token"]
    admin.cube_grant("mcp-http", "mcp-http-agent", "read")
    admin.add("mcp-http", "reached over HTTP")
    port = free_port()
    env = {**os.environ, **BASE_ENV, "MEMOS_TOKEN": token}
    log = tmp_path / "http.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*SERVER, "--socket", str(daemon.socket), "--transport", "http", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/mcp"

        async def scenario():
            async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
                async with streamable_http_client(url, http_client=http) as (read, write):
                    async with ClientSession(read, write) as s:
                        await s.initialize()
                        assert "search" in {t.name for t in (await s.list_tools()).tools}
                        hits = payload(await s.call_tool("search", {"cube": "mcp-http", "query": "HTTP"}))
                        assert hits["memories"][0]["text"] == "reached over HTTP"
            async with create_mcp_http_client(headers={"Authorization": "Bearer wrong"}) as http:
                response = await http.post(url, json={})
                assert response.status_code == 401

        run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)


def test_http_refuses_other_hosts_and_the_local_administrator():
    env = {**os.environ, **BASE_ENV}
    env.pop("MEMOS_TOKEN", None)
    wide = subprocess.run([*SERVER, "--transport", "http", "--host", "0.0.0.0"],
                          capture_output=True, text=True, env={**env, "MEMOS_TOKEN": "x.y"}, cwd=ROOT, timeout=30)
    assert wide.returncode == 2 and "not a loopback address" in wide.stderr
    argv = subprocess.run([*SERVER, "--transport", "http", "--token", "x.y"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert argv.returncode == 2 and "MEMOS_TOKEN, not --token" in argv.stderr  # argv is readable by all users
    admin = subprocess.run([*SERVER, "--transport", "http"], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=30)
    assert admin.returncode == 2 and "needs an agent's token" in admin.stderr


def test_activate_activations_generate_with_a_tiny_model(tmp_path):
    from test_activation import _tiny_model, _tokenizer

    tiny = _tiny_model(tmp_path / "tiny", _tokenizer(), 0)
    d = Daemon(env={"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_ACTIVATION__DEFAULT_MODEL": "tiny",
                    "MEMOS_ACTIVATION__MODELS": json.dumps({"tiny": {"path": str(tiny)}})}).start()
    try:
        admin = d.client(timeout=60)
        admin.cube_create("mcp-team")
        facts = [admin.add("mcp-team", text) for text in
                 ("The weekly meeting is on Tuesdays in room Orion.", "Bo is allergic to peanuts.")]

        async def scenario():
            async with stdio_session(d.socket) as s:
                job = payload(await s.call_tool("activate", {"cube": "mcp-team"}))
                assert job["kind"] == "activate" and job["cube"] == "mcp-team"
                deadline = time.monotonic() + 30
                while not (found := payload(await s.call_tool("activations", {"cube": "mcp-team"})))["activations"]:
                    assert time.monotonic() < deadline, admin.jobs()
                    await asyncio.sleep(0.05)
                [act] = found["activations"]
                assert act["model"] == "tiny" and not act["stale"] and act["tokens"] > 0
                assert act["sources"] == [{"memory_id": m.id, "version": m.version} for m in facts]

                out = await s.call_tool("generate", {"cube": "mcp-team", "prompt": "When is the meeting?",
                                                      "max_tokens": 4})
                assert "not instructions" in out.content[0].text
                answer = payload(out)
                assert answer["model"] == "tiny" and answer["activation"] == act["memory_id"]
                assert answer["tokens"] <= 4 and answer["cached_tokens"] > 0
                used = {(m["memory_id"], m["type"]) for m in answer["memories"]}
                assert {(m.id, "plaintext") for m in facts} <= used

        run(scenario())
        d.stop()
    finally:
        d.cleanup()

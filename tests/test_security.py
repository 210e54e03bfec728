"""Security promises of docs/security.md against a real memosd: tokens, agent identity, other
local users, require_token, and events only for cubes a watcher may read."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest
from daemon_fixtures import admin, daemon, fresh_daemon, make_daemon  # noqa: F401  (fixtures)
from daemon_fixtures import Daemon, frame, memosctl

from memos.client import Client
from memos.errors import Denied, MemosError, NotFound, Unauthenticated

NOBODY = 65534


def secret_of(token: str) -> bytes:
    return token.split(".", 1)[1].encode()


def store_bytes(d: Daemon) -> bytes:
    return d.stored_bytes()


# -- tokens ----------------------------------------------------------------------


def test_a_token_is_never_in_the_store_its_stored_replies_or_the_log(fresh_daemon):
    d = fresh_daemon
    with d.raw() as raw:
        first = raw.exchange(frame("agent_add", {"name": "planner"}, rid="add-planner"))
        token = first["result"]["token"]
        again = raw.exchange(frame("agent_add", {"name": "planner"}, rid="add-planner"))  # a retry
    assert again["ok"] is False and again["error"]["code"] == "conflict"
    assert again["error"]["details"]["withheld"] is True  # applied once, the token not shown twice
    rotated = d.client().agent_rotate("planner")["token"]
    d.client(token=rotated).whoami()
    d.stop()  # everything on disk
    for secret in (secret_of(token), secret_of(rotated)):
        assert secret not in store_bytes(d)
        assert secret.decode() not in d.log()


def test_rotation_and_removal_end_a_token_at_once(daemon, admin):
    old = admin.agent_add("rotor")["token"]
    agent = daemon.client(token=old)
    assert agent.whoami()["agent"] == "rotor"
    new = agent.agent_rotate("rotor")["token"]  # an agent may rotate its own token
    with pytest.raises(Unauthenticated):
        agent.whoami()
    rotor = daemon.client(token=new)
    assert rotor.whoami()["agent"] == "rotor"
    other = daemon.client(token=admin.agent_add("rotor-peer")["token"])
    with pytest.raises(Denied):
        other.agent_rotate("rotor")  # but not another's
    admin.agent_remove("rotor")
    with pytest.raises(Unauthenticated):
        rotor.whoami()


# -- identity ----------------------------------------------------------------------


def test_an_agent_added_again_under_a_removed_name_inherits_nothing(daemon, admin):
    alice = daemon.client(token=admin.agent_add("heir")["token"])
    old_id = alice.whoami()["id"]
    alice.cube_create("heir-private")
    alice.add("heir-private", "the old agent's secret")
    admin.cube_create("heir-shared")
    admin.cube_grant("heir-shared", "heir", "write")
    removed = admin.agent_remove("heir")
    assert removed["grants_removed"] == ["heir-private", "heir-shared"] and removed["cubes_to_admin"] == ["heir-private"]

    again = daemon.client(token=admin.agent_add("heir")["token"])
    assert again.whoami()["id"] != old_id  # a new id: ids are never reused
    assert [c.name for c in again.cube_list()] == []
    for cube in ("heir-private", "heir-shared"):
        with pytest.raises(Denied):
            again.list(cube)
    assert "heir" not in admin.cube_get("heir-shared").acl
    assert admin.cube_get("heir-private").owner == "admin"


def test_grants_name_existing_agents_only(daemon, admin):
    admin.cube_create("grants-known")
    with pytest.raises(NotFound):
        admin.cube_grant("grants-known", "nobody-like-this", "read")
    admin.agent_add("grantee")
    assert admin.cube_grant("grants-known", "grantee", "read").acl["grantee"] == "read"


def test_the_stored_owner_and_grants_are_ids_not_names(daemon, admin):
    token = admin.agent_add("by-id")["token"]
    me = daemon.client(token=token).whoami()
    assert me["id"].startswith("agent:")
    daemon.client(token=token).cube_create("by-id-cube")
    daemon.stop()
    from memos.api import Memos

    with Memos(daemon.data_dir, storage=daemon.storage) as m, m.store.read() as txn:
        stored = m.ledger.cube(txn, "by-id-cube")
    assert stored.owner == me["id"] and set(stored.acl) == {me["id"]}
    daemon.start()


# -- other local users (a child that drops to uid 65534) --------------------------------

def as_user(d: Daemon, uid: int, token: str | None = None, timeout: float = 10) -> dict:
    """Ask ``whoami`` from a forked child that has dropped to ``uid`` (group nogroup). Forked,
    not executed: the interpreter may live where that user cannot read it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but the client, then _exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(uid)
            try:
                out = {"ok": Client(d.socket, token=token, timeout=timeout, retries=0).whoami()}
            except MemosError as exc:
                out = {"error": exc.code}
            os.write(write_end, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and text, "the child failed"
    return json.loads(text)


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="dropping to another uid needs root")


@pytest.fixture
def shared_daemon(make_daemon):
    """memosd whose socket the group nogroup may reach, under a root others may pass through."""

    def make(**settings) -> Daemon:
        env = {"MEMOS_DAEMON__SOCKET_GROUP": str(NOBODY),
               **{f"MEMOS_DAEMON__{k.upper()}": json.dumps(v) for k, v in settings.items()}}
        d = make_daemon(env=env)
        os.chmod(d.root, 0o711)
        return d.start()

    return make


@needs_root
def test_by_default_another_user_cannot_even_reach_the_socket(fresh_daemon):
    os.chmod(fresh_daemon.root, 0o711)
    assert stat.S_IMODE(fresh_daemon.socket.parent.stat().st_mode) == 0o700
    assert as_user(fresh_daemon, NOBODY) == {"error": "unavailable"}


@needs_root
def test_an_allowed_user_must_present_a_token(shared_daemon):
    d = shared_daemon(allow_uids=[NOBODY])
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660
    assert as_user(d, NOBODY) == {"error": "unauthenticated"}
    token = d.client().agent_add("guest")["token"]
    assert as_user(d, NOBODY, token=token)["ok"]["agent"] == "guest"


@needs_root
def test_a_mapped_user_acts_as_its_agent_and_others_are_refused(shared_daemon):
    d = shared_daemon(uid_agents={str(NOBODY): "mapped"})
    assert as_user(d, NOBODY) == {"error": "unauthenticated"}  # the agent does not exist yet
    d.client().agent_add("mapped")
    assert as_user(d, NOBODY)["ok"]["agent"] == "mapped"
    # In the group, so it reaches the socket, but not allowed: ZAP refuses the connection.
    assert as_user(d, NOBODY - 1, timeout=2) == {"error": "timeout"}


def test_other_users_need_a_socket_group(make_daemon):
    d = make_daemon(env={"MEMOS_DAEMON__ALLOW_UIDS": "[1234]"})
    proc = d.spawn()
    assert proc.wait(30) != 0
    assert "socket_group" in d.log()


# -- require_token --------------------------------------------------------------------


def test_require_token_refuses_a_local_client_without_one(make_daemon):
    d = make_daemon()
    d.env.update({"MEMOS_DAEMON__REQUIRE_TOKEN": "true", "MEMOS_DAEMON__ADMIN_TOKEN_FILE": str(d.admin_token_file)})
    d.proc = d.spawn()
    token_file = d.admin_token_file
    deadline = time.monotonic() + 30
    while not (token_file.exists() and d.socket.exists()):  # made before memosd listens
        assert time.monotonic() < deadline and d.alive(), d.log()
        time.sleep(0.05)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with pytest.raises(Unauthenticated):
        Client(d.socket, timeout=5, retries=0).whoami()
    admin_token = token_file.read_text().strip()
    assert Client(d.socket, token=admin_token, timeout=5).whoami()["admin"] is True
    assert secret_of(admin_token).decode() not in d.log()
    out = memosctl(d, "whoami", "--json")  # memosctl reads the administrator's file
    assert json.loads(out.stdout)["admin"] is True
    rotated = Client(d.socket, token=admin_token, timeout=5).agent_rotate("admin")["token"]
    assert token_file.read_text().strip() == rotated  # the file follows the rotation
    with pytest.raises(Unauthenticated):
        Client(d.socket, token=admin_token, timeout=5, retries=0).whoami()


# -- events -------------------------------------------------------------------------------


def test_events_reach_only_watchers_that_may_read_the_cube(daemon, admin):
    owner = daemon.client(token=admin.agent_add("ev-owner")["token"])
    watcher_token = admin.agent_add("ev-watcher")["token"]
    watcher = daemon.client(token=watcher_token)
    owner.cube_create("ev-private")
    owner.cube_create("ev-shared")
    owner.cube_grant("ev-shared", "ev-watcher", "read")
    with pytest.raises(Denied):
        watcher.events("ev-private", timeout=1)  # refused at once, not silently empty

    seen: list = []
    events = watcher.events(timeout=3)  # every cube it may read; acknowledged before this returns
    done = threading.Event()

    def follow():
        for event in events:
            seen.append((event.cube, event.op))
        done.set()

    thread = threading.Thread(target=follow)
    thread.start()
    owner.add("ev-private", "not for the watcher")
    owner.add("ev-shared", "for the watcher")
    owner.cube_grant("ev-shared", "ev-watcher", None)  # revoked: nothing more from it
    owner.add("ev-shared", "after the revocation")
    assert done.wait(30)
    thread.join()
    assert ("ev-shared", "add") in seen
    assert all(cube == "ev-shared" for cube, _ in seen)
    assert seen.count(("ev-shared", "add")) == 1


def test_a_watch_is_refused_without_a_valid_token(daemon):
    with pytest.raises(Unauthenticated):
        Client(daemon.socket, token="ghost.secret", timeout=5).events(timeout=1)


def test_memosctl_agent_rotate_prints_a_new_token(daemon, admin):
    admin.agent_add("cli-rotor")
    out = memosctl(daemon, "agent", "rotate", "cli-rotor", "--json")
    token = json.loads(out.stdout)["token"]
    assert Client(daemon.socket, token=token, timeout=5).whoami()["agent"] == "cli-rotor"


def test_the_retry_of_a_rotation_is_refused_not_answered_with_the_token(daemon, admin):
    admin.agent_add("retry-rotor")
    with daemon.raw() as raw:
        first = raw.exchange(frame("agent_rotate", {"name": "retry-rotor"}, rid="rot-1"))
        again = raw.exchange(frame("agent_rotate", {"name": "retry-rotor"}, rid="rot-1"))
    assert again["error"]["code"] == "conflict" and "rotate" in again["error"]["message"]
    assert secret_of(first["result"]["token"]).decode() not in json.dumps(again)
    # The rotation was applied once: the token of the first reply works.
    assert Client(daemon.socket, token=first["result"]["token"], timeout=5).whoami()["agent"] == "retry-rotor"

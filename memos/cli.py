"""``memosctl``: the command line for memosd.

Every command prints a short human form, or with ``--json`` the full result as
JSON on stdout. A failed request exits non-zero with ``code: message`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import cli_audit, cli_store
from .cli_audit import EXIT_VERIFY_FAILED
from .cli_format import human
from .client import Client
from .errors import MemosError
from .models import plain
from .paging import every

EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS lets the options stand before or after the command without one resetting the other.
    common.add_argument("--socket", default=argparse.SUPPRESS, help="memosd socket (default: MEMOS_SOCKET or the configured path)")
    common.add_argument("--token", default=argparse.SUPPRESS, help="agent token (default: MEMOS_TOKEN, else the administrator's "
                        "token file when memosd requires tokens; none = local admin)")
    common.add_argument("--server-key", default=argparse.SUPPRESS, dest="server_key",
                        help="memosd's CURVE public key, for a tcp:// --socket (default: MEMOS_SERVER_KEY)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for a reply")

    parser = argparse.ArgumentParser(prog="memosctl", description="Talk to memosd.", parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, parent: Any = commands) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, parents=[common])

    command("ping", "check that memosd answers")
    command("whoami", "the agent the daemon sees")

    agent = commands.add_parser("agent", help="agents and their tokens").add_subparsers(dest="sub", required=True)
    command("add", "register an agent and print its token", agent).add_argument("name")
    command("list", "registered agents", agent)
    command("remove", "remove an agent: its token, grants and cubes (to the admin)", agent).add_argument("name")
    command("rotate", "a new token for an agent (the old one stops at once)", agent).add_argument("name")

    cube = commands.add_parser("cube", help="cubes and their ACLs").add_subparsers(dest="sub", required=True)
    command("create", "create a cube", cube).add_argument("name")
    command("list", "cubes you may read", cube)
    command("get", "one cube", cube).add_argument("cube")
    grant = command("grant", "give an agent a role (read, write, admin, none)", cube)
    grant.add_argument("cube")
    grant.add_argument("agent")
    grant.add_argument("role", choices=["read", "write", "admin", "none"])
    pin = command("pin", "keep a version through compaction, under a name", cube)
    pin.add_argument("cube")
    pin.add_argument("version", type=int)
    pin.add_argument("--name", help="default: v<version>")
    unpin = command("unpin", "remove a pin", cube)
    unpin.add_argument("cube")
    unpin.add_argument("name")
    compact = command("compact", "drop the versions the retention rules let go", cube)
    compact.add_argument("cube")
    compact.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    retention = command("retention", "set the cube's own retention rules (none given: the defaults)", cube)
    retention.add_argument("cube")
    for flag in ("--all-days", "--daily-days"):
        retention.add_argument(flag, type=float)
    retention.add_argument("--keep-versions", type=int)

    add = command("add", "add a plaintext memory")
    add.add_argument("cube")
    add.add_argument("text")
    add.add_argument("--tag", action="append", dest="tags", help="a tag (repeatable)")
    add.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="a metadata entry (repeatable)")

    get = command("get", "one memory, now or at a version")
    get.add_argument("cube")
    get.add_argument("id")
    get.add_argument("--at", type=int, metavar="VERSION")
    get.add_argument("--include-deleted", action="store_true")

    update = command("update", "replace a memory's text")
    update.add_argument("cube")
    update.add_argument("id")
    update.add_argument("text")
    update.add_argument("--tag", action="append", dest="tags", help="replace the tags (repeatable)")

    delete = command("delete", "delete a memory (history is kept)")
    delete.add_argument("cube")
    delete.add_argument("id")

    list_ = command("list", "memories of a cube")
    list_.add_argument("cube")
    list_.add_argument("--limit", type=int)
    list_.add_argument("--at", type=int, metavar="VERSION")
    list_.add_argument("--tag")
    list_.add_argument("--status", choices=["active", "archived", "deleted", "all"])

    history = command("history", "commits of a cube, newest first")
    history.add_argument("cube")
    history.add_argument("--memory", help="only commits that touched this memory")
    history.add_argument("--limit", type=int)

    diff = command("diff", "what changed between two versions")
    diff.add_argument("cube")
    diff.add_argument("v1", type=int)
    diff.add_argument("v2", type=int)

    rollback = commands.add_parser("rollback", help="restore a cube (or memories) to a version, directly or "
                                   "by a proposal (`rollback CUBE --to V` is `rollback apply CUBE --to V`; "
                                   "a cube named like a subcommand needs the long form)")
    rollbacks = rollback.add_subparsers(dest="sub", required=True)
    for sub, help in (("apply", "roll back now (as governance allows)"),
                      ("propose", "propose a rollback for another admin to approve")):
        target = command(sub, help, rollbacks)
        target.add_argument("cube")
        target.add_argument("--to", type=int, metavar="VERSION", dest="to_version")
        target.add_argument("--ids", "--memory", nargs="+", action="extend", dest="memory_ids", metavar="ID",
                            help="only these memories")
        target.add_argument("--undo", type=int, metavar="VERSION",
                            help="undo one commit: its memories back to the version before it")
    rollback_propose = rollbacks.choices["propose"]
    rollback_propose.add_argument("--reason", default="")
    command("show", "a proposal and the diff approving it would make", rollbacks).add_argument("id")
    command("approve", "apply a proposal (admin of the cube, not its proposer)", rollbacks).add_argument("id")
    reject = command("reject", "reject a proposal (or withdraw your own)", rollbacks)
    reject.add_argument("id")
    reject.add_argument("--reason", default="")
    proposals = command("proposals", "rollback proposals", rollbacks)
    proposals.add_argument("cube", nargs="?")
    proposals.add_argument("--status", choices=["pending", "applied", "rejected", "expired", "all"], default="pending")

    policy = commands.add_parser("policy", help="the scheduler's policies (local admin)")
    policies = policy.add_subparsers(dest="sub", required=True)
    command("list", "policies: schedule, next and last run", policies)
    run = command("run", "run a policy now", policies)
    run.add_argument("name")
    run.add_argument("--dry-run", action="store_true", dest="dry_run", help="show what it would do; change nothing")
    policy_history = command("history", "recorded runs, newest first", policies)
    policy_history.add_argument("name", nargs="?")
    policy_history.add_argument("--limit", type=int, default=20)

    search = command("search", "find memories by meaning and words")
    search.add_argument("cube")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10, help="how many results")
    search.add_argument("--at", type=int, metavar="VERSION", help="search the cube as of this version")
    search.add_argument("--tag", action="append", dest="tags", help="only memories with this tag (repeatable)")
    search.add_argument("--status", choices=["active", "archived", "all"])

    ingest = command("ingest", "store a conversation (JSON lines, one message per line)")
    ingest.add_argument("cube")
    ingest.add_argument("file", type=Path, help='lines like {"speaker": "Ada", "text": "...", "date": "..."}')
    ingest.add_argument("--session", help="session id shared by these messages")
    ingest.add_argument("--tag", action="append", dest="tags", default=[])

    command("jobs", "background jobs and their progress")
    command("cancel", "ask a running background job to stop").add_argument("id", help="the job's id (see jobs)")
    command("reindex", "rebuild a cube's search index").add_argument("cube")

    model = commands.add_parser("model", help="language models (activation memory, generation)")
    models = model.add_subparsers(dest="sub", required=True)
    command("list", "configured and added models", models)
    model_add = command("add", "add (or replace) a model: a local Hugging Face folder (local admin)", models)
    model_add.add_argument("name")
    model_add.add_argument("path", help="the model's folder, or 'prepared'")
    model_add.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    model_add.add_argument("--backend", default="transformers")
    model_add.add_argument("--threads", type=int)
    model_add.add_argument("--description", default="")
    prepare = command("prepare", "make a packaged model's folder (local admin)", models)
    prepare.add_argument("name")
    prepare.add_argument("--wait", action="store_true", help="wait for the job and exit non-zero if it fails")

    activate = command("activate", "build an activation memory (KV cache) from plaintext memories")
    activate.add_argument("cube")
    activate.add_argument("--ids", nargs="+", metavar="ID", help="these memories (default: every active one)")
    activate.add_argument("--tag", help="the active memories with this tag")
    activate.add_argument("--model", help="default: the configured default model")
    activate.add_argument("--wait", action="store_true", help="wait for the job and exit non-zero if it fails")

    activate.add_argument("--adapter", metavar="ID", help="build with this parameter memory's adapter active")

    command("activations", "a cube's activation memories, stale or not").add_argument("cube")

    distill = command("distill", "train a LoRA adapter (parameter memory) on plaintext memories")
    distill.add_argument("cube")
    distill.add_argument("--ids", nargs="+", metavar="ID", help="these memories (default: every active one)")
    distill.add_argument("--tag", help="the active memories with this tag")
    distill.add_argument("--model", help="default: the configured default model")
    for key, kind in (("rank", int), ("alpha", float), ("steps", int), ("epochs", float),
                      ("learning-rate", float), ("seed", int), ("kl-weight", float), ("batch-size", int)):
        distill.add_argument(f"--{key}", type=kind, dest=key.replace("-", "_"), help="(recipe)")
    distill.add_argument("--targets", nargs="+", metavar="MODULE", dest="target_modules",
                         help="module names to adapt (recipe)")
    distill.add_argument("--wait", action="store_true", help="wait for the job, print its report")

    fuse = command("fuse", "merge parameter memories into a new one")
    fuse.add_argument("cube")
    fuse.add_argument("ids", nargs="+", metavar="ID")
    fuse.add_argument("--weights", nargs="+", type=float)
    fuse.add_argument("--combination", choices=["linear", "svd", "ties", "cat"], default="linear")
    fuse.add_argument("--density", type=float, help="ties: the share of weights kept")
    fuse.add_argument("--svd-rank", type=int, dest="svd_rank")
    fuse.add_argument("--wait", action="store_true", help="wait for the job, print its report")

    command("adapters", "a cube's parameter memories (LoRA adapters), stale or not").add_argument("cube")

    generate = command("generate", "answer a prompt from a cube's memories (streams the text)")
    generate.add_argument("cube")
    generate.add_argument("prompt")
    generate.add_argument("--model")
    generate.add_argument("--max-tokens", type=int, dest="max_tokens")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0, dest="top_p")
    generate.add_argument("--seed", type=int)
    generate.add_argument("-k", type=int, help="plaintext memories to retrieve")
    generate.add_argument("--activation", metavar="ID", help="inject this activation memory")
    generate.add_argument("--no-activation", action="store_true", dest="no_activation",
                          help="no cache: every memory goes into the prompt")
    generate.add_argument("--adapter", metavar="ID", help="use this parameter memory's adapter")
    generate.add_argument("--no-adapter", action="store_true", dest="no_adapter", help="the base model alone")
    generate.add_argument("--stop", action="append", help="stop at this string (repeatable)")

    command("backup", "a consistent copy of the whole store into a new folder, while memosd serves") \
        .add_argument("path")
    restore = command("restore", "put a backup into a new data folder and verify it (no memosd needed)")
    restore.add_argument("backup")
    restore.add_argument("--data-dir", dest="data_dir", help="default: the configured data folder")
    migrate = command("migrate", "copy the LMDB store and its whole history into PostgreSQL (memosd stopped)")
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://...: a database with no store yet")
    migrate.add_argument("--data-dir", dest="data_dir", help="default: the configured data folder")
    export = command("export", "write a cube with its whole history to a new file")
    export.add_argument("cube")
    export.add_argument("path")
    command("import", "add the cube of an export file, history and all").add_argument("path")

    cli_audit.add_commands(commands, command)
    cli_store.add_commands(commands, command)
    return parser


def _metadata(pairs: Sequence[str]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"memosctl: --meta needs KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out or None


def _messages(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"memosctl: cannot read {path}: {exc}") from None


def _plain(value: Any) -> Any:
    """Plain data all the way down (results may hold models inside maps)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return plain(value)


def _stream(part: Any) -> None:
    """A piece of generated text, printed as it comes."""
    sys.stdout.write(str(part.get("text", "")) if isinstance(part, dict) else str(part))
    sys.stdout.flush()


def _waited(client: Client, job: dict[str, Any], a: argparse.Namespace, poll_s: float = 0.2) -> dict[str, Any]:
    """``job`` as it ended, with ``--wait`` (progress on stderr); at once otherwise."""
    if not getattr(a, "wait", False):
        return job
    seen = None
    while True:
        job = next((j for j in client.jobs() if j["id"] == job["id"]), job)
        line = f"{job['state']} {job['done']}/{job['total']} {job.get('detail', {}).get('stage', '')}".rstrip()
        if line != seen and not getattr(a, "json", False):
            print(f"memosctl: job {job['id']}: {line}", file=sys.stderr)
            seen = line
        if job["state"] != "running":
            return job
        time.sleep(poll_s)


_RECIPE_KEYS = ("rank", "alpha", "steps", "epochs", "learning_rate", "seed", "kl_weight", "batch_size",
                "target_modules")


def _recipe(a: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(a, k) for k in _RECIPE_KEYS if getattr(a, k, None) is not None}


def _reported(client: Client, a: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    """A distillation or fusion job (as it ended, with ``--wait``), with the training report of what it made."""
    job = _waited(client, job, a)
    memory = job.get("detail", {}).get("memory")
    if job["state"] == "done" and memory:
        made = next((x for x in client.adapters(a.cube) if x["memory_id"] == memory), None)
        if made is not None:
            job = {**job, "report": made["report"]}
    return job


def _target(client: Client, a: argparse.Namespace) -> tuple[int, list[str] | None]:
    """A rollback's version and memories: ``--to`` (and ``--ids``), or ``--undo`` of one commit."""
    if (a.to_version is None) == (a.undo is None):
        raise SystemExit("memosctl: rollback needs --to VERSION or --undo VERSION")
    if a.to_version is not None:
        return a.to_version, a.memory_ids
    found = client.history(a.cube, before=a.undo + 1, limit=1)
    if not found or found[0].version != a.undo or a.undo < 1:
        raise SystemExit(f"memosctl: cube {a.cube} has no commit v{a.undo}")
    ids = a.memory_ids or [c.memory_id for c in found[0].changes]
    if not ids:
        raise SystemExit(f"memosctl: commit v{a.undo} changed no memory: nothing to undo")
    for memory_id in ids:  # undoing v only: a later change to one of its memories would be lost
        latest = client.history(a.cube, memory_id=memory_id, limit=1)[0].version
        if latest > a.undo:
            raise SystemExit(f"memosctl: memory {memory_id} changed again at v{latest}, after v{a.undo}; "
                             f"roll back with --to {a.undo - 1} --ids ... to discard that too")
    return a.undo - 1, ids


_ROLLBACK_SUBCOMMANDS = {"apply", "propose", "show", "approve", "reject", "proposals", "-h", "--help"}
_VALUED = {"--socket", "--token", "--timeout", "--server-key"}


def _with_default_rollback(argv: Sequence[str]) -> list[str]:
    """``rollback CUBE --to V`` (the form before proposals existed) as ``rollback apply CUBE --to V``."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if word.startswith("-") or (i and argv[i - 1] in _VALUED):
            continue
        if word == "rollback" and i + 1 < len(argv) and argv[i + 1] not in _ROLLBACK_SUBCOMMANDS:
            argv.insert(i + 1, "apply")
        break
    return argv


def _run(client: Client, a: argparse.Namespace) -> tuple[str, Any]:
    name = a.command + (f" {a.sub}" if getattr(a, "sub", None) else "")
    calls: dict[str, Callable[[], Any]] = {
        "ping": client.ping,
        "whoami": client.whoami,
        "agent add": lambda: client.agent_add(a.name),
        "agent list": lambda: every(lambda n, after: client.agent_list(limit=n, after=after), lambda x: x.name),
        "agent remove": lambda: client.agent_remove(a.name),
        "agent rotate": lambda: client.agent_rotate(a.name),
        "cube create": lambda: client.cube_create(a.name),
        "cube list": lambda: every(lambda n, after: client.cube_list(limit=n, after=after), lambda c: c.name),
        "cube get": lambda: client.cube_get(a.cube),
        "cube grant": lambda: client.cube_grant(a.cube, a.agent, None if a.role == "none" else a.role),
        "cube pin": lambda: client.cube_pin(a.cube, a.version, name=a.name),
        "cube unpin": lambda: client.cube_unpin(a.cube, a.name),
        "cube compact": lambda: client.cube_compact(a.cube, dry_run=a.dry_run),
        "cube retention": lambda: client.cube_retention(a.cube, {k: v for k in ("all_days", "daily_days", "keep_versions")
                                                                if (v := getattr(a, k)) is not None} or None),
        "add": lambda: client.add(a.cube, a.text, tags=a.tags, metadata=_metadata(a.meta)),
        "get": lambda: client.get(a.cube, a.id, at=a.at, include_deleted=a.include_deleted),
        "update": lambda: client.update(a.cube, a.id, a.text, tags=a.tags),
        "delete": lambda: client.delete(a.cube, a.id),
        # Without --limit, every item: a page at a time (the daemon answers at most a page).
        "list": lambda: client.list(a.cube, limit=a.limit, at=a.at, tag=a.tag, status=a.status)
        if a.limit is not None else every(lambda n, after: client.list(
            a.cube, limit=n, after=after, at=a.at, tag=a.tag, status=a.status), lambda m: m.id),
        "history": lambda: client.history(a.cube, memory_id=a.memory, limit=a.limit)
        if a.limit is not None else every(lambda n, before: client.history(
            a.cube, memory_id=a.memory, limit=n, before=before), lambda c: c.version),
        "diff": lambda: every(lambda n, after: client.diff(a.cube, a.v1, a.v2, limit=n, after=after),
                              lambda e: e.memory_id),
        "rollback apply": lambda: client.rollback(a.cube, *_target(client, a)),
        "rollback propose": lambda: client.rollback_propose(a.cube, *_target(client, a), reason=a.reason),
        "rollback show": lambda: client.rollback_show(a.id),
        "rollback approve": lambda: client.rollback_approve(a.id),
        "rollback reject": lambda: client.rollback_reject(a.id, a.reason),
        "rollback proposals": lambda: every(lambda n, before: client.rollback_proposals(
            a.cube, status=a.status, limit=n, before=before), lambda p: p.id),
        "policy list": client.policy_list,
        "policy run": lambda: client.policy_run(a.name, dry_run=a.dry_run),
        "policy history": lambda: client.policy_history(a.name, limit=a.limit),
        "search": lambda: client.search(a.cube, a.query, k=a.k, at=a.at, tags=a.tags, status=a.status),
        "jobs": client.jobs,
        "cancel": lambda: client.job_cancel(a.id),
        "ingest": lambda: client.add_messages(a.cube, _messages(a.file), session=a.session, tags=a.tags),
        "reindex": lambda: client.reindex(a.cube),
        **cli_audit.calls(client, a),
        **cli_store.calls(client, a),
        # The daemon opens these paths: absolute, as the caller means them.
        "backup": lambda: client.store_backup(os.path.abspath(a.path)),
        "export": lambda: client.cube_export(a.cube, os.path.abspath(a.path)),
        "import": lambda: client.cube_import(os.path.abspath(a.path)),
        "model list": client.model_list,
        "model add": lambda: client.model_add(
            a.name, a.path if a.path == "prepared" else str(Path(a.path).expanduser().resolve()),
            backend=a.backend, dtype=a.dtype, threads=a.threads, description=a.description),
        "model prepare": lambda: _waited(client, client.model_prepare(a.name), a),
        "activate": lambda: _waited(client, client.activate(a.cube, ids=a.ids, tag=a.tag, model=a.model,
                                                            adapter=a.adapter), a),
        "activations": lambda: client.activations(a.cube),
        "distill": lambda: _reported(client, a, client.distill(a.cube, ids=a.ids, tag=a.tag, model=a.model,
                                                               recipe=_recipe(a) or None)),
        "fuse": lambda: _reported(client, a, client.fuse(a.cube, a.ids, weights=a.weights, combination=a.combination,
                                                         density=a.density, svd_rank=a.svd_rank)),
        "adapters": lambda: client.adapters(a.cube),
        "generate": lambda: client.generate(
            a.cube, a.prompt, model=a.model, activation=a.activation, use_activation=not a.no_activation,
            adapter=a.adapter, use_adapter=not a.no_adapter, k=a.k, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
            stop=a.stop, on_partial=None if getattr(a, "json", False) else _stream),
    }
    return name, _plain(calls[name]())


def _admin_token() -> str | None:
    """The administrator's token, when memosd requires tokens and this user may read its file."""
    from .config import load

    try:
        settings = load()
        if not settings.daemon.require_token:
            return None
        return settings.daemon.admin_token_file.expanduser().read_text().strip() or None
    except (OSError, MemosError, ValueError):  # no readable file, or a config memosd would refuse too
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_with_default_rollback(sys.argv[1:] if argv is None else argv))
    options: dict[str, Any] = {}
    token = getattr(args, "token", None) or os.environ.get("MEMOS_TOKEN") or _admin_token()
    if token:
        options["token"] = token
    if getattr(args, "timeout", None):
        options["timeout"] = args.timeout
    if getattr(args, "server_key", None):
        options["server_key"] = args.server_key
    if args.command in ("activate", "generate", "distill", "fuse") or getattr(args, "sub", None) == "prepare":
        # Never resent: a second frame would start a second job or generation.
        options["retries"] = 0
        if args.command == "generate":
            options.setdefault("timeout", 300.0)  # a model may be loading before the first token
    try:
        if args.command == "restore":  # offline: a file copy and a check, no daemon
            from .backup import restore
            from .config import load

            name, result = "restore", restore(args.backup, args.data_dir or load().daemon.data_dir.expanduser())
        elif args.command == "migrate":  # offline too: memosd must not serve the store meanwhile
            from .config import load
            from .migrate import migrate

            name, result = "migrate", migrate(args.data_dir or load().daemon.data_dir.expanduser(), args.to)
        else:
            with Client(getattr(args, "socket", None), **options) as client:
                name, result = _run(client, args)
    except MemosError as exc:
        print(f"memosctl: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"memosctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if name == "generate" and not getattr(args, "json", False):
        print()  # the text was streamed; the summary follows on a line of its own
    print(json.dumps(result, indent=2, default=str) if getattr(args, "json", False) else human(name, result))
    if name == "audit verify" and args.strict and not result["ok"]:
        return EXIT_VERIFY_FAILED
    if getattr(args, "wait", False) and result.get("state") != "done":
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How ``memosctl`` prints each command's result for a person (``--json`` prints it whole)."""

from __future__ import annotations

import json
import time
from typing import Any

from . import cli_store


def short(text: str | None, width: int = 70) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _memory_line(m: dict[str, Any]) -> str:
    tags = f" [{', '.join(m['tags'])}]" if m.get("tags") else ""
    status = "" if m.get("status") == "active" else f" ({m['status']})"
    body = m.get("text") if m.get("text") is not None else f"<{m['type']} blob {m['blob']['size']} bytes>"
    return f"{m['id']}  v{m['version']}{status}  {short(body)}{tags}"


def human(command: str, value: Any) -> str:
    if command in ("add", "get", "update", "delete"):
        return _memory_line(value)
    if command in ("list", "ingest"):
        return "\n".join(_memory_line(m) for m in value) or "(no memories)"
    if command == "search":
        return "\n".join(f"{h['score']:7.3f}  {_memory_line(h['memory'])}" for h in value) or "(no results)"
    if command == "cancel":
        return f"job {value['id']}: {value['state']}" + (" (stopping)" if value["state"] == "running" else "")
    if command == "jobs":
        return "\n".join(
            f"{j['id']}  {j['kind']:<12} {j.get('cube') or '-':<16} {j['state']:<8} {j['done']}/{j['total']}"
            for j in value
        ) or "(no jobs)"
    if command == "model list":
        return "\n".join(
            f"{m['name']:<16}{'*' if m['default'] else ' '} {m['source']:<7} {m['spec']['dtype']:<9} "
            f"{'loaded' if m['loaded'] else 'ready' if m['prepared'] else 'missing':<8} "
            f"{m['identity'] or m['error'] or ''}" for m in value
        ) or "(no models)"
    if command == "model add":
        return f"model {value['name']}: {value['spec']['path']} ({value['spec']['dtype']})"
    if command in ("activate", "model prepare"):
        return _job_line(value)
    if command == "activations":
        return "\n".join(
            f"{a['memory_id']}  v{a['version']:<5} {a['model_name']:<12} {a['tokens']:>6} tokens {a['dtype']:<9} "
            f"{a['size']:>10} bytes  {len(a['sources'])} memories{'  STALE' if a['stale'] else ''}"
            for a in value
        ) or "(no activation memories)"
    if command == "adapters":
        return "\n".join(
            f"{a['memory_id']}  v{a['version']:<5} {a['model_name']:<12} rank {a['rank']:<3} "
            f"{'+'.join(a['target_modules']):<16} {a['size']:>10} bytes  {len(a['facts'])} facts"
            f"{'  fused' if a['fused'] else ''}{'  STALE' if a['stale'] else ''}"
            for a in value
        ) or "(no parameter memories)"
    if command in ("distill", "fuse"):
        line = _job_line(value)
        report = value.get("report")
        if report:
            line += "\n" + "\n".join(f"  {k}: {v}" for k, v in report.items() if k != "recipe")
        return line
    if command == "generate":
        return _generation_summary(value)
    if command == "history":
        return "\n".join(
            f"v{c['version']:<6} {c['op']:<12} {c['actor']:<16} {len(c['changes'])} change(s)" for c in value
        )
    if command == "diff":
        return "\n".join(
            f"{d['change']:<9} {d['memory_id']}  {short((d.get('after') or d.get('before') or {}).get('text'), 60)}"
            for d in value
        ) or "(no differences)"
    if command in ("cube list",):
        return "\n".join(f"{c['name']:<24} v{c['version']:<6} owner={c['owner']}" for c in value) or "(no cubes)"
    if command in ("cube create", "cube grant", "cube get"):
        roles = ", ".join(f"{a}={r}" for a, r in value["acl"].items())
        return f"{value['name']}  v{value['version']}  owner={value['owner']}  acl: {roles}"
    if command in ("rollback apply", "rollback approve"):
        return f"rolled back to v{value['info']['to_version']} as v{value['version']}: {len(value['changes'])} change(s)"
    if command in ("rollback propose", "rollback reject"):
        return _proposal_line(value)
    if command == "rollback proposals":
        return "\n".join(_proposal_line(p) for p in value) or "(no proposals)"
    if command == "rollback show":
        changes = "\n".join(
            f"  {d['change']:<9} {d['memory_id']}  {short((d.get('before') or {}).get('text'), 40)!r} -> "
            f"{short((d.get('after') or {}).get('text'), 40)!r}" for d in value["diff"])
        stale = "  STALE: the cube changed since it was proposed" if value["proposal"].get("stale") else ""
        return f"{_proposal_line(value['proposal'])}{stale}\n{changes or '  (no changes)'}"
    if command == "policy list":
        return "\n".join(
            f"{p['name']:<9} {p['schedule']:<26} next {_when(p['next_run']):<20} "
            f"{'RUNNING ' if p['running'] else ''}last: {_run_line(p['last_run']) if p['last_run'] else 'never'}"
            for p in value)
    if command == "policy run":
        return "\n".join([_run_line(value), *(
            f"  {x['outcome']:<7} {x['op']} {json.dumps(x['args'])[:70]}  -- {x['reason']}"
            + (f"  [{x['error']['code']}: {x['error']['message']}]" if x.get("error") else "")
            for x in value["actions"])])
    if command == "policy history":
        return "\n".join(_run_line(r) for r in value) or "(no runs)"
    if command == "agent add":
        return f"agent {value['name']} token (shown once):\n{value['token']}"
    if command == "audit verify":
        if value["ok"]:
            start = (value.get("boundary") or {}).get("seq", 1)
            return "".join([
                f"audit chain ok: {value['records']} records, head {value['head']['seq']}:{value['head']['head']}",
                f"; matches {value['checkpoints']} checkpoints" if value.get("checkpoints") else "",
                f" ({value['unchecked']} more name archived records)" if value.get("unchecked") else "",
                f"; the store's chain begins at record {start} (earlier ones archived)" if start > 1 else ""])
        where = f" at record {value['first_bad']}" if value.get("first_bad") is not None else ""
        return f"AUDIT CHAIN BROKEN{where}: {value['reason']}"
    if command == "audit archive":
        return (f"archived records {value['first']} to {value['last']} to {value['file']} (sha256 {value['sha256']}); "
                f"the store's chain now begins at record {value['boundary']['seq']}")
    if command.startswith("store "):
        return cli_store.human(command, value)
    if command == "migrate":
        return (f"copied {value['rows']} rows from {value['from']} to {value['to']} in {value['seconds']:.1f}s: "
                f"every sub-database identical on both sides, audit chain verified "
                f"({value['audit']['records']} records)")
    if command == "audit tail":
        return "\n".join(
            f"{r['seq']:>7} {r['outcome']:<6} {r['actor']:<16} {r['op']:<12} {r.get('cube') or '-':<16} "
            f"{json.dumps(r['detail'])[:60]}" for r in value
        )
    return json.dumps(value, indent=2, default=str)


def _job_line(j: dict[str, Any]) -> str:
    detail = "  ".join(f"{k}={v}" for k, v in j.get("detail", {}).items())
    error = f"  error: {j['error']}" if j.get("error") else ""
    return f"job {j['id']}  {j['kind']}  {j['state']}  {j['done']}/{j['total']}  {detail}{error}".rstrip()


def _generation_summary(g: dict[str, Any]) -> str:
    used = ", ".join(f"{m['memory_id']}@v{m['version']} ({m['how']})" for m in g["memories"]) or "none"
    t = g["timings"]
    return (f"-- model {g['model_name']}; activation {g['activation'] or 'none'}; memories: {used}; "
            f"ttft {t['ttft_s'] * 1000:.0f} ms; {t['cached_tokens']} prompt tokens from the cache, "
            f"{t['prefill_tokens']} prefilled; {t['tokens']} new tokens ({g['stopped']})")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


def _proposal_line(p: dict[str, Any]) -> str:
    state = "expired" if p.get("expired") else p["status"]
    ids = f" ids={','.join(p['memory_ids'])}" if p.get("memory_ids") else ""
    return (f"{p['id']}  {p['cube']}  to v{p['to_version']}{ids}  {state}  by {p['proposer']}  "
            f"{len(p['plan'])} change(s)  expires {_when(p['expires_at'])}"
            + (f"  decided by {p['decided_by']}" if p.get("decided_by") else "")
            + (f"  -- {p['reason']}" if p.get("reason") else ""))


def _run_line(r: dict[str, Any]) -> str:
    failed = sum(a["outcome"] == "error" for a in r["actions"])
    return (f"{r['id']}  {r['policy']:<8} {_when(r['started'])}  {r['trigger']:<8} "
            f"{'dry run ' if r['dry_run'] else ''}{len(r['actions'])} action(s)"
            + (f", {failed} failed" if failed else "") + (f"  ERROR {r['error']}" if r.get("error") else ""))

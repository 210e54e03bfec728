"""``memosctl audit``: verify the chain (against signed checkpoints and archives), tail, checkpoint, archive.

Files named on the command line are read here, where memosctl runs: the
checkpoint file and public key are sent to the daemon as their contents, archive
paths as absolute paths (memosd runs as the same user and reads them itself).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import Client

EXIT_VERIFY_FAILED = 3


def add_commands(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="sub", required=True)
    verify = command("verify", "check the audit chain", audit)
    verify.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="memosd's signed checkpoint file (every line's signature is checked, then the chain "
                             "against each), or a head saved from `audit checkpoint --json`")
    verify.add_argument("--public-key", type=Path, dest="public_key", metavar="PATH",
                        help="the public key the checkpoints must be signed with (default: memosd's, "
                             "<signing key>.pub)")
    verify.add_argument("--archive", type=Path, action="append", dest="archives", metavar="FILE",
                        help="a file written by `audit archive` (repeat, oldest first): the chain is then "
                             "checked from its very first record")
    verify.add_argument("--strict", action="store_true", help=f"exit {EXIT_VERIFY_FAILED} when the chain is broken")
    tail = command("tail", "the last audit records", audit)
    tail.add_argument("-n", type=int, default=20)
    checkpoint = command("checkpoint", "print the audit head (save it to verify later)", audit)
    checkpoint.add_argument("--sign", action="store_true",
                            help="sign it with memosd's key and append it to memosd's checkpoint file")
    archive = command("archive", "move the oldest records out of the store into a file", audit)
    archive.add_argument("--before", type=int, required=True, metavar="SEQ",
                         help="archive the records before this one; a signed checkpoint must name SEQ or later")
    archive.add_argument("--to", type=Path, required=True, metavar="FILE", help="a new file (never overwritten)")


def calls(client: Client, a: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    return {
        "audit verify": lambda: _verify(client, a),
        "audit tail": lambda: client.audit_tail(a.n),
        "audit checkpoint": client.audit_sign if getattr(a, "sign", False) else client.audit_checkpoint,
        "audit archive": lambda: client.audit_archive(a.before, str(_absolute(a.to))),
    }


def _verify(client: Client, a: argparse.Namespace) -> Any:
    checkpoint = signed = public_key = None
    if a.checkpoint is not None:
        checkpoint, signed = read_checkpoints(a.checkpoint)
    if a.public_key is not None:
        public_key = _read(a.public_key)
    archives = [str(_absolute(p)) for p in a.archives] if a.archives else None
    return client.audit_verify(checkpoint, signed=signed, public_key=public_key, archives=archives)


def read_checkpoints(path: Path) -> tuple[dict[str, Any] | None, list[Any] | None]:
    """A saved head (one JSON map without a signature), or the lines of a signed checkpoint file."""
    text = _read(path)
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return (None, [whole]) if "signature" in whole else (whole, None)
    lines: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except ValueError as exc:
                raise SystemExit(f"memosctl: {path} line {number} is not JSON: {exc}") from None
    return None, lines


def _read(path: Path) -> str:
    try:
        return path.expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"memosctl: cannot read {path}: {exc}") from None


def _absolute(path: Path) -> Path:
    return path.expanduser().resolve()

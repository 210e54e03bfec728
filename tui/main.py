"""``memos-tui [--socket PATH] [--token T]``: the Textual app for memosd."""

from __future__ import annotations

import argparse
import os
import sys

from .app import MemosApp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memos-tui", description="Inspect and govern memosd's cubes.")
    parser.add_argument("--socket", default=os.environ.get("MEMOS_SOCKET"),
                        help="memosd socket (default: MEMOS_SOCKET or the configured path)")
    parser.add_argument("--token", help="agent token (default: MEMOS_TOKEN; none = the local administrator)")
    args = parser.parse_args(argv)
    MemosApp(args.socket, args.token).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A writer for the crash test: adds memories forever, printing each acknowledged one.

Usage: python crash_writer.py STORE_DIR FIRST_NUMBER
A line "ID TEXT" is printed (and flushed) only after add() has returned.
"""

from __future__ import annotations

import sys

from memos.api import Actor, Memos


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    writer = Actor("writer")
    m = Memos(path)
    if not any(c.name == "crash" for c in m.list_cubes(writer)):
        m.create_cube(writer, "crash")
    print("ready", flush=True)
    while True:
        text = f"memory number {n}"
        mem = m.add(writer, "crash", text, tags=[f"n{n % 7}"])
        sys.stdout.write(f"{mem.id} {text}\n")
        sys.stdout.flush()
        n += 1


if __name__ == "__main__":
    main()

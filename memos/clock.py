"""The daemon's wall clock: the time that memories, commits, read counts, proposals and policies see.

It is the system clock, unless a clock file is configured (``[daemon]
clock_file``): then the time is read from that file (seconds since the epoch)
at each call. That lets a test or a demonstration move the daemon through days
of simulated use, so that policies whose thresholds are days (decay, demote)
can be watched at work; it is never meant for production. Durations inside the
daemon (timeouts, waits) use the monotonic clock and are not affected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

_source: Callable[[], float] = time.time


def now() -> float:
    """Seconds since the epoch, by the configured clock."""
    return _source()


def use_system() -> None:
    global _source
    _source = time.time


def use_file(path: str | Path) -> None:
    """Read the time from ``path`` from now on (its content: a number of seconds since the epoch)."""
    global _source
    file = Path(path)
    last: list[float] = []

    def read() -> float:
        try:
            last[:] = [float(file.read_text().strip())]
        except (OSError, ValueError):
            pass  # caught being rewritten: the last reading stands
        return last[0]

    try:
        last.append(float(file.read_text().strip()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"clock file {file} does not hold a time: {exc}") from None
    _source = read

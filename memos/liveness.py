"""Is memosd there? A quick look at its socket, so that a client fails at once, and says why,
instead of waiting out its timeouts when no daemon will ever answer.

ZeroMQ connects to an ipc path that does not exist, or whose daemon died, without a word, and
queues requests until someone listens. Before it relies on that, a client asks the kernel:
connecting a plain Unix socket to the path fails at once with "no such file" (no daemon ever
ran there, or it stopped cleanly) or "connection refused" (a stale socket: its daemon was
killed). memosd's lock file beside the socket names the pid that held it. A tcp endpoint
(memos.endpoints) gets a plain TCP connect instead.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from .endpoints import check_tcp, is_tcp
from .errors import Unavailable

HOW_TO_START = "start it with `memosd` (or point MEMOS_SOCKET at the socket of a running one)"


def check_daemon(path: str | os.PathLike[str]) -> None:
    """Return if something listens on the socket ``path``; raise Unavailable saying why not."""
    if is_tcp(path):
        return check_tcp(path)
    path = Path(path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        if restarting(path):
            return  # memosd announced a restart in place (store_compact): it will listen here again soon
        if isinstance(exc, FileNotFoundError):
            raise Unavailable(f"memosd is not running: there is no socket at {path}; {HOW_TO_START}",
                              socket=str(path)) from None
        raise Unavailable(f"memosd is not running: {path} is a stale socket{_dead_pid(path)}; {HOW_TO_START}",
                          socket=str(path)) from None
    except TimeoutError:
        return  # a daemon too busy to accept at once is still there
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EINTR):
            return
        raise Unavailable(f"cannot reach memosd at {path}: {exc.strerror or exc}; {HOW_TO_START}",
                          socket=str(path)) from None
    finally:
        probe.close()


def restart_marker(path: str | os.PathLike[str]) -> Path:
    """The file memosd writes beside its socket while it restarts in place: its pid, and nothing else."""
    return Path(f"{path}.restarting")


def restarting(path: str | os.PathLike[str]) -> bool:
    """Is the process named in the socket's restart marker alive? (A killed restart is no restart.)"""
    try:
        pid = int(restart_marker(path).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _dead_pid(path: Path) -> str:
    """ " (memosd pid N is gone)" from the lock file beside the socket, when it names a dead process."""
    try:
        pid = int(Path(f"{path}.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f" (memosd pid {pid}, named in {path}.lock, is gone)"
    except PermissionError:
        pass
    return ""

"""``memosd``: start the daemon in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import tomllib

import zmq
from pydantic import ValidationError

from memos import config
from memos.errors import MemosError
from memos.storage import hold_at

from .server import Server

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k != "message"})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memosd", description="The memos memory daemon.")
    parser.add_argument("--config", help="TOML config file (default: MEMOS_CONFIG or the packaged etc/memosd.toml)")
    parser.add_argument("--data-dir", help="folder of the LMDB store")
    parser.add_argument("--socket", help="ipc socket path (its folder must be private to this user)")
    parser.add_argument("--listen", action="append", metavar="tcp://HOST:PORT",
                        help="also serve this tcp endpoint, with CURVE (repeatable; docs/security.md)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        daemon: dict = {}
        if args.data_dir:
            daemon["data_dir"] = args.data_dir
        if args.socket:
            daemon["socket"] = args.socket
        if args.listen:
            daemon["listen"] = args.listen
        if args.log_level:
            daemon["log_level"] = args.log_level
        settings = config.load(args.config)
        if daemon:
            settings.daemon = settings.daemon.model_copy(update=daemon)
            settings.daemon = type(settings.daemon).model_validate(settings.daemon.model_dump())
        logging.getLogger().setLevel(settings.daemon.log_level.upper())
        server = Server(settings)
        server.start()
    except MemosError as exc:
        logging.getLogger("memosd").error("cannot start: %s", exc.message, extra={"code": exc.code})
        return 2
    except (ValidationError, tomllib.TOMLDecodeError) as exc:  # a bad file or MEMOS_ variable
        logging.getLogger("memosd").error("cannot start: invalid configuration: %s", exc,
                                          extra={"code": "config_error"})
        return 2
    except (OSError, zmq.ZMQError) as exc:  # unusable folder or socket path
        logging.getLogger("memosd").error("cannot start: %s", exc, extra={"code": "config_error"})
        return 2

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("memosd").info("received %s", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.serve_forever()
    if server.restart_in_place:
        restart_in_place()
    return 0


def restart_in_place() -> None:
    """Run the same command line again in this process (same pid): the store is opened anew, and
    rewritten as it opens (store_compact). Everything was drained and closed by serve_forever."""
    hold_at("compact:restarting")
    logging.getLogger("memosd").info("restarting in place")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


if __name__ == "__main__":
    sys.exit(main())

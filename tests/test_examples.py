"""The examples run against a real memosd and pass their own checks."""

from __future__ import annotations

import subprocess
import sys

from daemon_fixtures import ROOT, Daemon


def test_two_agents_share_memory_and_a_poisoned_memory_is_rolled_back():
    d = Daemon().start()
    try:
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "two_agents.py"), "--socket", str(d.socket)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "all checks passed" in out.stdout
        assert "FAILED" not in out.stdout
        print(out.stdout)  # what happened, in the test log
        d.stop()
    finally:
        d.cleanup()

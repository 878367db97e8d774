"""Runs `feed_v4_main.py` as a real process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
MAIN = str(PROJECT / "feed_v4_main.py")
SERVER_URLS = ("REDIS_URL", "POSTGRES_URL", "DATABASE_URL")


def run_main(env_overrides: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python feed_v4_main.py ARGS` to completion, with only the servers it is given."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_URLS}
    env.update({"BOOT_WAIT_S": "1", **env_overrides})
    return subprocess.run(
        [sys.executable, MAIN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT
    )


class DaemonProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = {k: v for k, v in os.environ.items() if k not in SERVER_URLS}
        self.env.update(env)
        self.log_path = Path(tempfile.mkstemp(prefix="feed_v4_daemon_", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, MAIN],
                env=self.env,
                cwd=PROJECT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye, like a crashed container."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cleanup(self) -> None:
        self.kill()
        if not os.environ.get("KEEP_DAEMON_LOGS"):  # for a post-mortem of a failed scenario
            self.log_path.unlink(missing_ok=True)

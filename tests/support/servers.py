"""What every real server the tests start has in common: a free loopback port, a log file, a
wait until it answers (or a clear error with its log), a quick stop, and a context manager.

Used by s3server (SeaweedFS, Azurite), redisserver and service.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago (held open together)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_process(proc: subprocess.Popen | None) -> None:
    # The data lives in a temporary folder: a clean shutdown buys nothing, so it gets 5 s.
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_up(name: str, proc: subprocess.Popen, answers: Callable[[], bool], log_path: Path,
                  *, timeout_s: float, since: float | None = None, poll_s: float = 0.1) -> None:
    """Until `answers()` is true (an exception counts as not yet); a RuntimeError with the log's
    tail if the process exits first or `timeout_s` (from `since`, default now) runs out."""
    deadline = (since if since is not None else time.monotonic()) + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if answers():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s:\n{log_tail(log_path)}")
        time.sleep(poll_s)


def launch(cmd: list[str], workdir: Path, log_path: Path) -> subprocess.Popen:
    """`cmd` in `workdir`, its stdout and stderr in `log_path`, no stdin."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)


class Stoppable(Protocol):
    def stop(self) -> None: ...


@contextlib.contextmanager
def running(server: Stoppable) -> Iterator:
    """`with running(start_x(...)) as server:` stops it however the block ends."""
    try:
        yield server
    finally:
        server.stop()

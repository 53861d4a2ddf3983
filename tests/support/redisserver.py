"""A real Redis for integration tests: Debian's redis-server, on 127.0.0.1, in a temporary folder.

Nothing is persisted (`--save ''`, `--appendonly no`): a restart on the same port gives an
empty Redis, which is what a crashed cache without persistence looks like to the service and
the workers. The port is chosen free on 127.0.0.1 and kept across restarts.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import redis

from tests.support.s3server import free_ports

START_TIMEOUT_S = 20


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None)
    if not found:
        raise RuntimeError("redis-server is missing: apt-get install redis-server (make deps does)")
    return found


@dataclass
class RedisServer:
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None
    starts: int = field(default=0)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client for checks that bypass the code under test."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log_path = self.workdir / f"redis-{self.starts}.log"
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
               "--protected-mode", "yes", "--logfile", str(log_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{_tail(log_path)}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S} s:\n{_tail(log_path)}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start on the same port; the data is gone (nothing is persisted)."""
        self.stop()
        self.start()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_redis(workdir: Path) -> RedisServer:
    (port,) = free_ports(1)
    server = RedisServer(port, workdir)
    server.start()
    return server


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = start_redis(workdir)
    try:
        yield server
    finally:
        server.stop()

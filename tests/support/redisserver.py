"""A real Redis for integration tests: Debian's redis-server, on 127.0.0.1, in a temporary folder.

Nothing is persisted (`--save ''`, `--appendonly no`): a restart on the same port gives an
empty Redis, which is what a crashed cache without persistence looks like to the service and
the workers. The port is chosen free on 127.0.0.1 and kept across restarts.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.servers import free_ports, running, stop_process, wait_until_up

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
        client = self.client()
        try:
            wait_until_up("redis-server", self.proc, client.ping, log_path, timeout_s=START_TIMEOUT_S, poll_s=0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)


def start_redis(workdir: Path) -> RedisServer:
    (port,) = free_ports(1)
    server = RedisServer(port, workdir)
    server.start()
    return server


def redis_server(workdir: Path) -> contextlib.AbstractContextManager[RedisServer]:
    return running(start_redis(workdir))

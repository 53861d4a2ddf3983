"""Scale-out: the service hands stamping to `builder worker` processes through a real Redis.

Two workers run as subprocesses exactly as deployed (`python -m builder worker --redis ...
--storage file://... --state ...`). To make a job last long enough to be killed or overlapped
on purpose, the workers' PATH starts with a folder holding an `osslsigncode` shim: it logs each
call and, for `sign`, sleeps BUILDER_TEST_SIGN_DELAY seconds before running the real tool. Only
the baked msi is re-signed, so only its jobs are slow; no code under test knows about the shim.

Tokens are never printed by these tests: leaks are checked as booleans.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from rq.exceptions import NoSuchJobError
from rq.job import Job

from builder.service.app import ServiceSettings, create_app
from builder.enrollment import Enrollment, Secret
from builder.signing.signers import Signers
from builder.service.issuer import Issuer
from builder.service.records import request_id
from builder.service.jobs import QUEUE_NAME
from builder.config import Environment
from builder.service.setup import RELEASES_PREFIX, ServiceOptions, api_keys_from, link_secret_of, make_issuer
from builder.storage import StorageSettings, open_store, publish_release
from tests.support.redisserver import RedisServer, redis_server
from tests.support.service import RELEASE_VERSION, build_release, problem, serve, signers_for, enrollment_key_for

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
API_KEY = secrets.token_hex(24)
ACCOUNT = "acct-workers"
SIGN_DELAY_S = 1.5
WORKER_START_TIMEOUT_S = 60
TOKENS: list[str] = []  # every token this module sends: none may show up in Redis or in a log

SHIM = """#!/bin/sh
# Test shim (tests/integration/test_workers.py): log the call, slow down signing, run the real tool.
printf '%s\\n' "$1" >> "$BUILDER_TEST_SHIM_LOG"
if [ "$1" = sign ]; then sleep "${{BUILDER_TEST_SIGN_DELAY:-0}}"; fi
exec {real} "$@"
"""


def new_token(label: str) -> str:
    token = f"{label}-{secrets.token_urlsafe(24)}"
    TOKENS.append(token)
    return token


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


# -- processes -----------------------------------------------------------------------------------


def start_worker(redis_url: str, storage_url: str, state: Path, env: dict, dev_keys, *, signing: bool = True) -> subprocess.Popen:
    """`builder worker` as deployed; without `signing`, a worker given no code-signing key."""
    state.mkdir(parents=True, exist_ok=True)
    keys = ["--sign-cert", str(dev_keys.sign_cert), "--sign-key", str(dev_keys.sign_key)] if signing else []
    cmd = [sys.executable, "-m", "builder", "worker", "--redis", redis_url, "--storage", storage_url,
           "--state", str(state), *keys, "--ca", str(dev_keys.ca_cert)]
    with open(state / "worker.log", "ab") as log:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # RQ's warm shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_workers(redis: RedisServer, procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """The names the workers registered in Redis, once all of them have."""
    client = redis.client()
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    try:
        while True:
            for proc, log in zip(procs, logs):
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            names = [k.decode().removeprefix("rq:worker:") for k in client.smembers(f"rq:workers:{QUEUE_NAME}")]
            if len(names) >= len(procs):
                return names
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not register within {WORKER_START_TIMEOUT_S} s")
            time.sleep(0.1)
    finally:
        client.close()


def shim_calls(path: Path, command: str = "sign") -> int:
    return path.read_text().split().count(command) if path.exists() else 0


@dataclass
class Cluster:
    redis: RedisServer
    issuer: Issuer
    base_url: str
    workers: list[subprocess.Popen]
    worker_names: list[str]
    worker_logs: list[Path]
    shim_log: Path
    shim_dir: Path

    @property
    def store(self):
        return self.issuer.store

    def keys(self, prefix: str) -> set[str]:
        return {o.key for o in self.store.list(prefix)}

    def post(self, body: dict, timeout: float = 90) -> httpx.Response:
        return httpx.post(self.base_url + "/v1/installers", json=body, headers=auth(), timeout=timeout)

    def job(self, installer_id: str) -> Job:
        return Job.fetch(installer_id, connection=self.issuer.queue.connection)

    def ready(self, answer: httpx.Response) -> httpx.Response:
        return until_ready(self.base_url, answer)


def until_ready(base_url: str, answer: httpx.Response, timeout_s: float = 60) -> httpx.Response:
    """A POST's answer once its installer is ready: after a 202 (no worker took the job at once),
    GET it until it is, as a console does."""
    deadline = time.monotonic() + timeout_s
    while answer.status_code == 202:
        assert time.monotonic() < deadline, f"the installer was not ready within {timeout_s} s"
        time.sleep(0.1)
        answer = httpx.get(f"{base_url}/v1/installers/{answer.json()['id']}", headers=auth(), timeout=30)
    return answer


def worker_environ(queue_key: str, hmac_key: str, extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "BUILDER_QUEUE_KEY": queue_key, "BUILDER_STORAGE_HMAC_KEY": hmac_key,
            "BUILDER_API_KEYS": f"tests:{API_KEY}", **(extra or {})}


def service_for(redis_url: str, storage_url: str, state: Path, environ: dict, dev_keys, **settings):
    issuer = make_issuer(ServiceOptions(storage_url=storage_url, state_dir=state, signers=signers_for(dev_keys),
                                        ca=dev_keys.ca_cert, redis_url=redis_url,
                                        enrollment_key=enrollment_key_for(dev_keys)), Environment.read(environ))
    app = create_app(issuer, ServiceSettings(api_keys=api_keys_from(Environment.read(environ)), link_secret=link_secret_of(issuer), **settings))
    return issuer, app


def make_shim(root: Path) -> tuple[Path, Path, dict]:
    """The `osslsigncode` shim folder, its call log, and the environment that puts it first on PATH."""
    shim_dir, shim_log = root / "shim", root / "shim.log"
    shim_dir.mkdir()
    real = shutil.which("osslsigncode")
    assert real, "osslsigncode is missing (apt-get install osslsigncode)"
    (shim_dir / "osslsigncode").write_text(SHIM.format(real=real))
    (shim_dir / "osslsigncode").chmod(0o755)
    return shim_dir, shim_log, {"PATH": f"{shim_dir}:{os.environ['PATH']}", "BUILDER_TEST_SHIM_LOG": str(shim_log),
                                "BUILDER_TEST_SIGN_DELAY": str(SIGN_DELAY_S)}


def wait_until_started(connection, installer_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Job.fetch(installer_id, connection=connection).get_status() == "started":
                return
        except NoSuchJobError:
            pass
        time.sleep(0.02)
    raise AssertionError("the job was not seen running")


def installer_id_for(issuer: Issuer, group: str, token: str, fmt: str) -> str:
    """The id the service will give this request (it is deterministic)."""
    enrollment = Enrollment(account_id=ACCOUNT, group_id=group, token=Secret(token),
                            console_url=issuer.default_console_url(RELEASE_VERSION))
    return request_id(RELEASE_VERSION, fmt, enrollment)


@pytest.fixture(scope="module")
def release_dir(dev_keys, test_payload, tmp_path_factory) -> Path:
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("workers-release") / "release")


@pytest.fixture(scope="module")
def cluster(release_dir, dev_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    storage_url = (root / "store").as_uri()
    hmac_key, queue_key = secrets.token_hex(32), Fernet.generate_key().decode()
    publish_release(release_dir, open_store(storage_url, StorageSettings()), RELEASES_PREFIX, version=RELEASE_VERSION)

    shim_dir, shim_log, shim_env = make_shim(root)
    environ = worker_environ(queue_key, hmac_key, shim_env)

    with redis_server(root / "redis") as redis:
        workers = [start_worker(redis.url, storage_url, root / f"worker-{i}", environ, dev_keys) for i in range(2)]
        logs = [root / f"worker-{i}" / "worker.log" for i in range(2)]
        try:
            names = wait_for_workers(redis, workers, logs)
            issuer, app = service_for(redis.url, storage_url, root / "service", environ, dev_keys, wait_s=30)
            with serve(app) as server:
                yield Cluster(redis, issuer, server.base_url, workers, names, logs, shim_log, shim_dir)
            issuer.close()
        finally:
            for proc in workers:
                stop_process(proc)


# -- the tests -----------------------------------------------------------------------------------


def post_all(cluster: Cluster, bodies: list[dict]) -> list[httpx.Response]:
    """All requests at once, from as many threads."""
    barrier = threading.Barrier(len(bodies))
    answers: list = [None] * len(bodies)

    def call(i: int) -> None:
        barrier.wait(timeout=30)
        answers[i] = cluster.post(bodies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return answers


def published(cluster) -> set:
    """Installers stored whole (baked MSI) and stamp descriptions (exe, msi-tagged: streamed
    from the release object on local storage)."""
    return cluster.keys("installers") | cluster.keys("stamps")


def test_distinct_groups_are_stamped_by_the_workers(cluster):
    before = published(cluster)
    formats = ["msi", "exe", "msi-tagged", "exe", "msi", "msi-tagged", "exe", "msi-tagged"]
    bodies = [{"account_id": ACCOUNT, "group_id": f"group-w{i}", "token": new_token(f"w{i}"), "format": fmt}
              for i, fmt in enumerate(formats)]
    answers = [cluster.ready(a) for a in post_all(cluster, bodies)]
    assert all(a.status_code == 200 for a in answers), [(a.status_code, a.text[:200]) for a in answers]
    docs = [a.json() for a in answers]
    assert all(d["status"] == "ready" for d in docs) and len({d["id"] for d in docs}) == 8
    assert len(published(cluster) - before) == 8
    done_by = set()
    for doc, body in zip(docs, bodies):
        rec = cluster.issuer.record(doc["id"])
        assert (rec.group_id, rec.format, rec.sha256) == (body["group_id"], body["format"], doc["sha256"])
        job = cluster.job(doc["id"])  # the job id is the installer id
        assert job.get_status() == "finished"
        done_by.add(job.worker_name)
        download = httpx.get(doc["url"], timeout=60)
        assert download.status_code == 200 and len(download.content) == doc["size"]
    # While one worker signs an msi, the other takes the next job: both took part.
    assert done_by == set(cluster.worker_names)


def test_identical_concurrent_requests_enqueue_one_job(cluster):
    queue = cluster.issuer.queue.queue
    original = queue.enqueue_call
    outcomes: list[str] = []
    lock = threading.Lock()

    def counting_enqueue(*args, **kwargs):
        try:
            job = original(*args, **kwargs)
        except Exception as exc:
            with lock:
                outcomes.append(type(exc).__name__)
            raise
        with lock:
            outcomes.append("enqueued")
        return job

    body = {"account_id": ACCOUNT, "group_id": "group-same", "token": new_token("same"), "format": "msi"}
    before, signs = published(cluster), shim_calls(cluster.shim_log)
    queue.enqueue_call = counting_enqueue
    try:
        answers = [cluster.ready(a) for a in post_all(cluster, [body] * 8)]
    finally:
        del queue.enqueue_call
    assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1 and len({a.json()["sha256"] for a in answers}) == 1
    assert outcomes.count("enqueued") == 1, outcomes
    assert len(outcomes) > 1 and set(outcomes) <= {"enqueued", "DuplicateJobError"}, outcomes
    assert shim_calls(cluster.shim_log) - signs == 1, "the msi was signed more than once"
    assert len(published(cluster) - before) == 1
    assert cluster.job(answers[0].json()["id"]).get_status() == "finished"


def redis_blobs(redis: RedisServer) -> list[bytes]:
    """Every key name and value in Redis, zlib-inflated too where it inflates (RQ compresses job data)."""
    client = redis.client()
    blobs: list[bytes] = []
    try:
        for key in client.scan_iter(count=1000):
            blobs.append(key)
            kind = client.type(key).decode()
            if kind == "string":
                values = [client.get(key)]
            elif kind == "hash":
                values = [b for kv in client.hgetall(key).items() for b in kv]
            elif kind == "list":
                values = client.lrange(key, 0, -1)
            elif kind == "set":
                values = list(client.smembers(key))
            elif kind == "zset":
                values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                values = [b for _, fields in client.xrange(key) for kv in fields.items() for b in kv]
            else:
                values = []
            for value in values:
                if value is None:
                    continue
                blobs.append(value)
                try:
                    blobs.append(zlib.decompress(value))
                except zlib.error:
                    pass
    finally:
        client.close()
    return blobs


def test_no_raw_token_in_redis_or_worker_logs(cluster):
    token = new_token("redis")
    body = {"account_id": ACCOUNT, "group_id": "group-redis", "token": token, "format": "msi"}
    answer: list = []
    caller = threading.Thread(target=lambda: answer.append(cluster.post(body)))
    caller.start()
    # Look while the job sits in Redis being worked on, not only afterwards.
    installer_id = installer_id_for(cluster.issuer, body["group_id"], token, "msi")
    wait_until_started(cluster.issuer.queue.connection, installer_id)
    during = redis_blobs(cluster.redis)
    caller.join(timeout=60)
    assert answer and cluster.ready(answer[0]).status_code == 200 and answer[0].json()["id"] == installer_id
    after = redis_blobs(cluster.redis)

    # The scan reads what matters: the job's inflated data names the job function.
    assert any(b"builder.service.jobs.run_job" in blob for blob in during)
    leaked = any(t.encode() in blob for t in TOKENS for blob in during + after)
    assert not leaked, "a raw enrollment token is in Redis"
    logs = b"".join(p.read_bytes() for p in cluster.worker_logs)
    assert b"bake and sign" in logs  # the logs hold the workers' output
    leaked = any(t.encode() in logs for t in TOKENS)
    assert not leaked, "a raw enrollment token is in a worker's log"


def _children_of(pids: set[int]) -> dict[int, int]:
    """pid -> parent pid, for every process whose parent is in `pids`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in pids:
                out[int(entry.name)] = ppid
    return out


def find_signing_helper(cluster: Cluster, timeout_s: float = 30) -> int:
    """The process group of the signing helper (spawned by one of our workers) that is running the shim's sign."""
    shim = str(cluster.shim_dir / "osslsigncode").encode()
    worker_pids = {p.pid for p in cluster.workers}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        helpers = _children_of(worker_pids)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                pgid = os.getpgid(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
            # The signing helper (a child of a worker) leads its own process group; the shim runs in it.
            if shim in argv and b"sign" in argv and pgid in helpers:
                return pgid
        time.sleep(0.02)
    raise AssertionError("no signing helper was seen signing")


def test_killed_signing_helper_is_retried(cluster, dev_keys, tmp_path):
    body = {"account_id": ACCOUNT, "group_id": "group-killed", "token": new_token("killed"), "format": "msi"}
    before, signs = published(cluster), shim_calls(cluster.shim_log)
    answer: list = []
    caller = threading.Thread(target=lambda: answer.append(cluster.post(body)))
    caller.start()
    helper = find_signing_helper(cluster)
    os.killpg(helper, signal.SIGKILL)  # the helper, its shim and the shim's sleep: mid-signing
    caller.join(timeout=90)

    assert answer, "the request did not return"
    ready = cluster.ready(answer[0])
    assert ready.status_code == 200, ready.text[:300]
    doc = ready.json()
    assert doc["status"] == "ready"
    job = cluster.job(doc["id"])
    assert job.get_status() == "finished" and job.retries_left == 2  # one of its three retries was used
    assert shim_calls(cluster.shim_log) - signs == 2  # the killed signing, and the retry's
    assert len(published(cluster) - before) == 1  # the killed attempt published nothing
    path = tmp_path / "killed.msi"
    path.write_bytes(httpx.get(doc["url"], timeout=60).content)
    verified = subprocess.run(["osslsigncode", "verify", "-CAfile", str(dev_keys.ca_cert), "-in", str(path)],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0
    assert all(p.poll() is None for p in cluster.workers)


def test_service_and_worker_survive_a_redis_restart(release_dir, dev_keys, tmp_path):
    """Redis stops while a job runs, stays down a while and comes back empty on the same port.
    Meanwhile: the running job still completes (its record is in storage), new requests get
    503 + Retry-After and leave no audit row. Afterwards: the same service and worker carry on."""
    storage_url = (tmp_path / "store").as_uri()
    publish_release(release_dir, open_store(storage_url, StorageSettings()), RELEASES_PREFIX, version=RELEASE_VERSION)
    _, _, shim_env = make_shim(tmp_path)
    environ = worker_environ(Fernet.generate_key().decode(), secrets.token_hex(32), shim_env)
    with redis_server(tmp_path / "redis") as redis:
        worker = start_worker(redis.url, storage_url, tmp_path / "worker", environ, dev_keys)
        try:
            wait_for_workers(redis, [worker], [tmp_path / "worker" / "worker.log"])
            issuer, app = service_for(redis.url, storage_url, tmp_path / "service", environ, dev_keys, wait_s=30)
            with serve(app) as server:
                def post(group: str, fmt: str = "exe", token: str | None = None) -> httpx.Response:
                    return httpx.post(server.base_url + "/v1/installers", headers=auth(), timeout=90,
                                      json={"account_id": ACCOUNT, "group_id": group, "token": token or new_token(group),
                                            "format": fmt})

                assert post("group-before").status_code == 200
                inflight: list = []
                token = new_token("inflight")
                caller = threading.Thread(target=lambda: inflight.append(post("group-inflight", "msi", token)))
                caller.start()
                wait_until_started(issuer.queue.connection, installer_id_for(issuer, "group-inflight", token, "msi"))
                redis.stop()
                stopped = time.monotonic()  # mid-job: the worker meets the outage when the job ends

                down = post("group-during")
                assert down.status_code == 503 and int(down.headers["retry-after"]) > 0, down.text[:300]
                assert "queue" in down.json()["error"]
                assert httpx.get(f"{server.base_url}/v1/installers/{'0' * 32}", headers=auth(), timeout=30).status_code == 503
                caller.join(timeout=60)
                assert inflight and inflight[0].status_code == 200  # finished without Redis
                time.sleep(1.5)  # the worker, done with its job, now finds Redis gone
                redis.start()
                down_for = time.monotonic() - stopped

                answers = []
                restarted = time.monotonic()
                deadline = restarted + 30
                while not answers or answers[-1].status_code == 503:
                    assert time.monotonic() < deadline, [a.status_code for a in answers]
                    started = time.monotonic()
                    answers.append(post("group-during"))
                    took = time.monotonic() - started
                    if answers[-1].status_code == 503:
                        time.sleep(0.5)
                # A 202 until the worker, back on its feet, has registered and taken the job.
                ready = until_ready(server.base_url, answers[-1], timeout_s=30)
                log = (tmp_path / "worker" / "worker.log").read_text(errors="replace")[-6000:]
                statuses = [a.status_code for a in answers]
                # Recovery is bounded in time, not in attempts: under load a reconnect may take
                # more than one 503 (each answered at once, with Retry-After).
                recovered_in = time.monotonic() - restarted
                assert recovered_in < 15, f"{statuses}: recovered {recovered_in:.1f} s after the restart"
                assert ready.status_code == 200 and ready.json()["status"] == "ready", \
                    f"{statuses}, last took {took:.1f} s, Redis was down {down_for:.1f} s; worker log:\n{log}"
                assert until_ready(server.base_url, post("group-after", "msi")).status_code == 200
                assert worker.poll() is None, "the worker died with the Redis restart"
                requested = [r["group_id"] for r in issuer.audit.rows() if r["action"] in ("issue", "queued")]
                assert requested.count("group-during") == 1  # only the request that was accepted
            issuer.close()
        finally:
            stop_process(worker)


# -- requests the workers cannot serve; no worker at all (issue 12) ------------------------------


def test_with_no_worker_running_a_request_is_answered_202_at_once(release_dir, dev_keys, tmp_path):
    """Redis is up, no worker is: the job is queued and the answer is a 202 naming the format
    and the release `latest` resolved to, without waiting for a worker that is not there (the
    service's wait_s is far longer than the client's timeout). A worker started later does it."""
    storage_url = (tmp_path / "store").as_uri()
    publish_release(release_dir, open_store(storage_url, StorageSettings()), RELEASES_PREFIX, version=RELEASE_VERSION)
    environ = worker_environ(Fernet.generate_key().decode(), secrets.token_hex(32))
    with redis_server(tmp_path / "redis") as redis:
        issuer, app = service_for(redis.url, storage_url, tmp_path / "service", environ, dev_keys, wait_s=300)
        worker = None
        try:
            with serve(app) as server:
                docs = {}
                for fmt in ("exe", "msi"):
                    body = {"account_id": ACCOUNT, "group_id": f"group-noworker-{fmt}", "token": new_token("noworker"),
                            "format": fmt}
                    answer = httpx.post(server.base_url + "/v1/installers", json=body, headers=auth(), timeout=15)
                    assert answer.status_code == 202, answer.text[:300]
                    doc = answer.json()
                    assert (doc["status"], doc["format"], doc["release"]) == ("pending", fmt, RELEASE_VERSION), doc
                    assert Job.fetch(doc["id"], connection=issuer.queue.connection).get_status() == "queued"
                    again = httpx.get(f"{server.base_url}/v1/installers/{doc['id']}", headers=auth(), timeout=15)
                    assert again.status_code == 202 and again.json() == doc
                    docs[fmt] = doc

                worker = start_worker(redis.url, storage_url, tmp_path / "worker", environ, dev_keys)
                for fmt, doc in docs.items():
                    ready = until_ready(server.base_url, httpx.Response(202, json=doc))
                    assert ready.status_code == 200, ready.text[:300]
                    assert (ready.json()["id"], ready.json()["format"], ready.json()["release"]) == (doc["id"], fmt, RELEASE_VERSION)
        finally:
            if worker is not None:
                stop_process(worker)
            issuer.close()


@dataclass
class Bare:
    """A Redis with one worker that holds no code-signing key, and the service's settings."""

    redis: RedisServer
    storage_url: str
    environ: dict
    worker_log: Path
    root: Path


@pytest.fixture(scope="module")
def bare(release_dir, dev_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    storage_url = (root / "store").as_uri()
    publish_release(release_dir, open_store(storage_url, StorageSettings()), RELEASES_PREFIX, version=RELEASE_VERSION)
    environ = worker_environ(Fernet.generate_key().decode(), secrets.token_hex(32))
    with redis_server(root / "redis") as redis:
        worker = start_worker(redis.url, storage_url, root / "worker", environ, dev_keys, signing=False)
        try:
            wait_for_workers(redis, [worker], [root / "worker" / "worker.log"])
            yield Bare(redis, storage_url, environ, root / "worker" / "worker.log", root)
        finally:
            stop_process(worker)


def failed_once(connection, installer_id: str) -> Job:
    """The job, once failed; it must never have been retried (its three retries untouched)."""
    job = Job.fetch(installer_id, connection=connection)
    assert job.get_status() == "failed" and job.retries_left == 3, (job.get_status(), job.retries_left)
    return job


def test_a_request_the_workers_cannot_serve_fails_once_with_the_in_process_answer(bare, dev_keys, tmp_path):
    """A baked msi and workers without a code-signing key: 503 not_configured, the same answer
    as a service without workers gives; the job fails once (no retry, no traceback)."""
    body = {"account_id": ACCOUNT, "group_id": "group-bare", "token": new_token("bare"), "format": "msi"}

    in_process = make_issuer(ServiceOptions(storage_url=bare.storage_url, state_dir=tmp_path / "in-process",
                                            signers=Signers(verify_ca=dev_keys.ca_cert), ca=dev_keys.ca_cert,
                                            enrollment_key=enrollment_key_for(dev_keys)), Environment.read(bare.environ))
    app = create_app(in_process, ServiceSettings(api_keys=api_keys_from(Environment.read(bare.environ)), link_secret=b"k" * 32))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            expected = client.post("/v1/installers", json=body, headers=auth())
    finally:
        in_process.close()
    error = problem(expected, 503, "not_configured", None)
    assert "Authenticode" in error

    issuer, app = service_for(bare.redis.url, bare.storage_url, tmp_path / "service", bare.environ, dev_keys, wait_s=60)
    try:
        with serve(app) as server:
            answer = httpx.post(server.base_url + "/v1/installers", json=body, headers=auth(), timeout=90)
            assert (answer.status_code, answer.json()) == (expected.status_code, expected.json())
            installer_id = installer_id_for(issuer, body["group_id"], body["token"], "msi")
            failed_once(issuer.queue.connection, installer_id)
            looked_up = httpx.get(f"{server.base_url}/v1/installers/{installer_id}", headers=auth(), timeout=30)
            assert (looked_up.status_code, looked_up.json()) == (expected.status_code, expected.json())
            # The formats stamped into their slot need no key: the same worker makes them.
            tagged = until_ready(server.base_url, httpx.post(server.base_url + "/v1/installers", headers=auth(),
                                                             json={**body, "format": "msi-tagged"}, timeout=90))
            assert tagged.status_code == 200
    finally:
        issuer.close()
    log = bare.worker_log.read_text(errors="replace")
    assert f"job {installer_id} failed for good (not_configured)" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    leaked = body["token"] in log
    assert not leaked


def test_a_queue_key_mismatch_is_503_not_configured_and_not_retried(bare, dev_keys, tmp_path):
    """A service whose BUILDER_QUEUE_KEY is not the workers': the worker cannot open the job;
    the client is told what the operators must configure, and RQ does not retry it."""
    environ = {**bare.environ, "BUILDER_QUEUE_KEY": Fernet.generate_key().decode()}
    issuer, app = service_for(bare.redis.url, bare.storage_url, tmp_path / "service", environ, dev_keys, wait_s=60)
    try:
        with serve(app) as server:
            body = {"account_id": ACCOUNT, "group_id": "group-otherkey", "token": new_token("otherkey"), "format": "exe"}
            answer = httpx.post(server.base_url + "/v1/installers", json=body, headers=auth(), timeout=90)
            error = problem(answer, 503, "not_configured", None)
            assert "queue key" in error and "BUILDER_QUEUE_KEY" in error, error
            failed_once(issuer.queue.connection, answer_id := installer_id_for(issuer, body["group_id"], body["token"], "exe"))
            log = bare.worker_log.read_text(errors="replace")
            assert f"job {answer_id} failed for good (not_configured)" in log, log[-3000:]
    finally:
        issuer.close()

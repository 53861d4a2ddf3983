"""Scale-out: stamping jobs on Redis (RQ), done by `builder worker` processes on any machine.

The job id is the installer id, enqueued with `unique=True`: N identical requests enqueue one
job. A killed work-horse's job is retried (Retry). The enrollment travels through Redis
encrypted (Fernet, key in BUILDER_QUEUE_KEY shared by service and workers), so the token is
never in Redis in clear. Whatever runs twice anyway, storage's create-if-absent makes harmless.
"""

from __future__ import annotations

import json
import time

import redis
from cryptography.fernet import Fernet, InvalidToken
from rq import Queue, Retry, Worker
from rq.exceptions import DuplicateJobError, NoSuchJobError, StopRequested
from rq.job import Job

from builder import log
from builder.enrollment import Enrollment
from builder.errors import UsageError
from builder.storage.errors import StorageUnavailableError

QUEUE_NAME = "builder-stamp"
PENDING_STATES = {"queued", "started", "deferred", "scheduled"}
# What the service tells clients (Retry-After) while Redis does not answer.
QUEUE_RETRY_AFTER_S = 5
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# Set by `builder worker` before the RQ worker forks its work-horses, which inherit it.
WORKER_ISSUER = None
WORKER_FERNET: Fernet | None = None


def fernet_from(key: str | None) -> Fernet:
    if not key:
        raise UsageError("BUILDER_QUEUE_KEY is not set", "generate one with `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'` and give it to the service and every worker")
    try:
        return Fernet(key.encode())
    except ValueError:
        raise UsageError("BUILDER_QUEUE_KEY is not a Fernet key (32 url-safe base64 bytes)", "generate a new one") from None


class QueueUnavailableError(StorageUnavailableError):
    """Redis did not answer: like unreachable storage, a 503 with Retry-After, not a 500."""


class _Worker(Worker):
    """RQ's forking worker, kept alive across Redis outages.

    RQ ends its work loop on a Redis connection error met outside its dequeue (checking for
    suspension, heartbeats, registry cleaning) and then raises from its teardown: a Redis
    restart would stop `builder worker` processes at random. Here the loop starts again once
    Redis answers; a stop request (SIGTERM, SIGINT) still ends it."""

    # RQ doubles its wait for Redis up to 60 s: after a long outage a worker would sit idle for
    # up to a minute while jobs queue up. A PING every few seconds costs nothing.
    max_connection_wait_time = 5.0

    def work(self, burst: bool = False, **kwargs) -> bool:
        worked, pause = False, 1.0
        while True:
            try:
                worked = super().work(burst=burst, **kwargs) or worked
            except _REDIS_DOWN as exc:
                self.log.warning("Worker %s: Redis is unreachable (%s)", self.name, type(exc).__name__)
            try:
                if burst or self._stopping():
                    return worked
                self._wait_for_redis()
                time.sleep(pause)  # a loop that keeps failing for another reason must not spin
            except StopRequested:  # SIGTERM while waiting: RQ's handler raises this when idle
                return worked
            if self._stopping():
                return worked
            pause = min(pause * 2, 30.0)
            self.log.warning("Worker %s: starting its work loop again", self.name)

    def _stopping(self) -> bool:
        return self._stop_requested or self._shutdown_requested_date is not None

    def _wait_for_redis(self) -> None:
        while not self._stopping():
            try:
                self.connection.ping()
                break
            except _REDIS_DOWN:
                time.sleep(1)
        for cleanup in (self.register_death, self.unsubscribe):  # what the failed teardown left
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - best effort: a fresh registration follows
                pass


class RedisQueue:
    def __init__(self, redis_url: str, fernet: Fernet, *, name: str = QUEUE_NAME, job_timeout: int = 600):
        self.connection = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10,
                                               retry_on_timeout=True, health_check_interval=10)
        self.queue = Queue(name, connection=self.connection)
        self.fernet = fernet
        self.job_timeout = job_timeout

    def submit(self, installer_id: str, version: str, fmt: str, enrollment: Enrollment) -> None:
        payload = json.dumps({"id": installer_id, "release": version, "format": fmt,
                              "enrollment": enrollment.to_json_bytes().decode()}).encode()
        sealed = self.fernet.encrypt(payload)
        try:
            self._enqueue(installer_id, sealed, fmt, version)
        except _REDIS_DOWN:
            raise self._unavailable("enqueue") from None

    def _unavailable(self, op: str) -> QueueUnavailableError:
        kw = self.connection.connection_pool.connection_kwargs  # host and port only: no password
        return QueueUnavailableError(
            f"the job queue (Redis at {kw.get('host')}:{kw.get('port')}) is not answering ({op}): retry later",
            "check that Redis is up and reachable from the service", retry_after=QUEUE_RETRY_AFTER_S)

    def _enqueue(self, installer_id: str, sealed: bytes, fmt: str, version: str) -> None:
        try:
            self.queue.enqueue_call("builder.service.jobs.run_job", args=(sealed,), job_id=installer_id, unique=True,
                                    retry=Retry(max=3), timeout=self.job_timeout,
                                    result_ttl=600, failure_ttl=86400, description=f"stamp {fmt} {version}")
        except DuplicateJobError:
            job = self._job(installer_id)
            status = job.get_status(refresh=True) if job is not None else None
            if str(getattr(status, "value", status)) in ("failed", "stopped", "canceled"):
                job.delete()  # a finished failure may be tried again by a new request
                self._enqueue(installer_id, sealed, fmt, version)

    def _job(self, installer_id: str) -> Job | None:
        try:
            return Job.fetch(installer_id, connection=self.connection)
        except NoSuchJobError:
            return None

    def is_pending(self, installer_id: str) -> bool:
        try:
            job = self._job(installer_id)
            if job is None:
                return False
            status = job.get_status(refresh=True)
        except _REDIS_DOWN:
            raise self._unavailable("job status") from None
        return str(getattr(status, "value", status)) in PENDING_STATES

    def failure(self, installer_id: str) -> str | None:
        """Why the job for `installer_id` failed for good (retries used up), or None."""
        try:
            job = self._job(installer_id)
            if job is None:
                return None
            status = job.get_status(refresh=True)
            if str(getattr(status, "value", status)) != "failed":
                return None
            last = (job.latest_result().exc_string if job.latest_result() else "") or ""
        except _REDIS_DOWN:
            raise self._unavailable("job status") from None
        lines = [ln.strip() for ln in last.splitlines() if ln.strip()]
        return log.redact(lines[-1]) if lines else "the stamping job failed"

    def worker(self, name: str | None = None) -> Worker:
        try:
            return _Worker([self.queue], connection=self.connection, name=name)
        except _REDIS_DOWN:
            raise self._unavailable("worker start") from None


def run_job(sealed: bytes) -> dict:
    """The RQ job: decrypt, stamp, store, record. Returns the record (no token in it)."""
    if WORKER_ISSUER is None or WORKER_FERNET is None:
        raise RuntimeError("run_job runs inside `builder worker`, which sets up the issuer first")
    try:
        doc = json.loads(WORKER_FERNET.decrypt(sealed))
    except InvalidToken:
        raise RuntimeError("a job sealed with another BUILDER_QUEUE_KEY: give service and workers the same key") from None
    enrollment = Enrollment.from_json_bytes(doc["enrollment"].encode(), "job")
    log.register_secret(enrollment.token.reveal())
    rec = WORKER_ISSUER.produce(doc["id"], doc["release"], doc["format"], enrollment)
    return {"id": rec.id, "sha256": rec.sha256, "key": rec.key}

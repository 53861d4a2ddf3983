"""Scale-out: stamping jobs on Redis (RQ), done by `builder worker` processes on any machine.

The job id is the installer id, enqueued with `unique=True`: N identical requests enqueue one
job. A killed work-horse's job is retried (Retry). The enrollment travels through Redis
encrypted (Fernet, key in BUILDER_QUEUE_KEY shared by service and workers), so the token is
never in Redis in clear. Whatever runs twice anyway, storage's create-if-absent makes harmless.
"""

from __future__ import annotations

import json

import redis
from cryptography.fernet import Fernet, InvalidToken
from rq import Queue, Retry, Worker
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job

from builder import log
from builder.enrollment import Enrollment
from builder.errors import UsageError

QUEUE_NAME = "builder-stamp"
PENDING_STATES = {"queued", "started", "deferred", "scheduled"}

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
            self.queue.enqueue_call("builder.service.jobs.run_job", args=(sealed,), job_id=installer_id, unique=True,
                                    retry=Retry(max=3, interval=[1, 2, 5]), timeout=self.job_timeout,
                                    result_ttl=600, failure_ttl=86400, description=f"stamp {fmt} {version}")
        except DuplicateJobError:
            job = self._job(installer_id)
            status = job.get_status(refresh=True) if job is not None else None
            if str(getattr(status, "value", status)) in ("failed", "stopped", "canceled"):
                job.delete()  # a finished failure may be tried again by a new request
                self.submit(installer_id, version, fmt, enrollment)

    def _job(self, installer_id: str) -> Job | None:
        try:
            return Job.fetch(installer_id, connection=self.connection)
        except NoSuchJobError:
            return None

    def is_pending(self, installer_id: str) -> bool:
        job = self._job(installer_id)
        if job is None:
            return False
        status = job.get_status(refresh=True)
        return str(getattr(status, "value", status)) in PENDING_STATES

    def worker(self, name: str | None = None) -> Worker:
        return Worker([self.queue], connection=self.connection, name=name)


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

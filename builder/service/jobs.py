"""Scale-out: stamping jobs on Redis (RQ), done by `builder worker` processes on any machine.

The job id is the installer id, enqueued with `unique=True`: N identical requests enqueue one
job. The enrollment travels through Redis encrypted (Fernet, key in BUILDER_QUEUE_KEY shared by
service and workers), so the token is never in Redis in clear. Whatever runs twice anyway,
storage's create-if-absent makes harmless.

A worker does not fork per job (RQ's default): a fork, a fresh I/O runtime and a new Redis
connection cost about 20 ms on two cores, more than a slot stamp itself. Slot stamps (exe,
msi-tagged: pure Python, milliseconds, no tool) run in the worker process. Stamps that sign
(baked msi, pkg, dmg: subprocesses, seconds, an HSM) run in one long-lived signing helper
process per worker, spawned at start: when it dies mid-job (killed, out of memory) the job
fails and RQ's Retry runs it again with a new helper; when a job overruns its timeout, the
helper is killed with it. A killed worker's own job is retried by RQ's registry cleanup once
the job's timeout has passed.

A job that fails for a reason retrying will not fix (builder.service.problems: no key for the
format, another BUILDER_QUEUE_KEY, a refused release) is not retried: its problem goes into the
job's meta, RQ marks it failed once (one log line, no traceback), and the service answers the
client with that problem, as it would have in-process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from typing import Callable

import redis
from cryptography.fernet import Fernet, InvalidToken
from rq import Queue, Retry, SimpleWorker
from rq.exceptions import DuplicateJobError, NoSuchJobError, StopRequested
from rq.job import Job, get_current_job
from rq.job_lifecycle import call_exception_handlers

from builder import formats, log
from builder.trust import SignedEnrollment
from builder.errors import BuilderError, QueueError, UsageError
from builder.service.problems import NotConfigured, Problem, StampFailed, describe, unexpected
from builder.storage.errors import StorageUnavailableError

QUEUE_NAME = "builder-stamp"
PENDING_STATES = {"queued", "started", "deferred", "scheduled"}
# What the service tells clients (Retry-After) while Redis does not answer.
QUEUE_RETRY_AFTER_S = 5
# A slot stamp takes milliseconds: a short timeout lets RQ's cleanup retry the job of a killed
# worker soon (RQ counts a job abandoned after timeout + 60 s), and workers clean up that often.
SLOT_JOB_TIMEOUT_S = 30
MAINTENANCE_INTERVAL_S = 60
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# Set by `builder worker` (serve_jobs), and in its signing helper, before the first job: RQ
# calls run_job by name, so what it works with lives here.
WORKER_ISSUER = None
WORKER_FERNET: Fernet | None = None
WORKER_HELPER: "SigningHelper | None" = None


def serve_jobs(issuer, helper: "SigningHelper") -> None:
    """Make this process a worker: run_job stamps with `issuer` (whose queue holds the key that
    opens the jobs) and hands stamps that sign to `helper`."""
    global WORKER_ISSUER, WORKER_FERNET, WORKER_HELPER
    WORKER_ISSUER, WORKER_FERNET, WORKER_HELPER = issuer, issuer.queue.fernet, helper


def fernet_from(key) -> Fernet:
    """The key that seals jobs, from BUILDER_QUEUE_KEY (a Secret, builder.config.Environment)."""
    if key is None or not key.reveal():
        raise UsageError("BUILDER_QUEUE_KEY is not set", "generate one with `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'` and give it to the service and every worker")
    try:
        return Fernet(key.reveal().encode())
    except ValueError:
        raise UsageError("BUILDER_QUEUE_KEY is not a Fernet key (32 url-safe base64 bytes)", "generate a new one") from None


class QueueUnavailableError(QueueError, StorageUnavailableError):
    """Redis did not answer: like unreachable storage, a 503 with Retry-After, not a 500 (exit
    code: the queue's)."""


class _Job(Job):
    """A job that RQ retries only when its failure may go away (builder.service.problems): a
    request the service cannot serve (no signing key, another queue key, a refused release)
    fails once, with its problem in the job's meta for the service to answer with."""

    @property
    def should_retry(self) -> bool:
        problem = self.meta.get("problem") if isinstance(self.meta, dict) else None
        if problem is not None and not problem.get("transient"):
            return False
        return super().should_retry


class _Worker(SimpleWorker):
    """RQ's in-process worker, kept alive across Redis outages.

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

    def handle_exception(self, job: Job, *exc_info) -> None:
        problem = job.meta.get("problem") if isinstance(job.meta, dict) else None
        if problem is not None and not problem.get("transient"):
            # A request the service cannot serve until its operators change something: one line
            # (a traceback is for bugs), and no retry (_Job.should_retry).
            self.log.warning("Worker %s: job %s failed for good (%s): %s", self.name, job.id, problem["code"],
                             problem["message"])
            call_exception_handlers(self._exc_handlers, job, *exc_info)
            return
        super().handle_exception(job, *exc_info)

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
        self.queue = Queue(name, connection=self.connection, job_class=_Job)
        self.fernet = fernet
        self.job_timeout = job_timeout

    def submit(self, installer_id: str, version: str, fmt: str, enrollment: SignedEnrollment) -> None:
        # Signed by the service: workers check it against the release's pins, and hold no key.
        payload = json.dumps({"id": installer_id, "release": version, "format": fmt,
                              "enrollment": enrollment.jws.reveal()}).encode()
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
                                    retry=Retry(max=3), timeout=SLOT_JOB_TIMEOUT_S if formats.kind(fmt).slotted else self.job_timeout,
                                    result_ttl=600, failure_ttl=86400, description=f"stamp {fmt} {version}",
                                    meta={"release": version, "format": fmt})
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

    def has_workers(self) -> bool:
        """Whether any worker is registered for the queue (one killed without deregistering
        still counts, until RQ's cleanup drops it)."""
        try:
            return _Worker.count(connection=self.connection, queue=self.queue) > 0
        except _REDIS_DOWN:
            raise self._unavailable("worker count") from None

    def state(self, installer_id: str) -> str | None:
        """The job's RQ status (queued, started, finished, failed...), None without a job: one
        read, for a request waiting on its job."""
        try:
            status = self.connection.hget(Job.key_for(installer_id), "status")
        except _REDIS_DOWN:
            raise self._unavailable("job status") from None
        return status.decode() if status is not None else None

    def pending(self, installer_id: str) -> tuple[str, str] | None:
        """(release, format) of a job still queued or running, else None."""
        try:
            job = self._job(installer_id)
            if job is None:
                return None
            status = job.get_status(refresh=True)
        except _REDIS_DOWN:
            raise self._unavailable("job status") from None
        if str(getattr(status, "value", status)) not in PENDING_STATES:
            return None
        return job.meta.get("release"), job.meta.get("format")

    def failure(self, installer_id: str) -> Problem | None:
        """Why the job for `installer_id` failed for good (a permanent problem, or retries used
        up), or None: the problem the worker recorded, else a generic one."""
        try:
            job = self._job(installer_id)
            if job is None:
                return None
            status = job.get_status(refresh=True)
            if str(getattr(status, "value", status)) != "failed":
                return None
        except _REDIS_DOWN:
            raise self._unavailable("job status") from None
        recorded = job.meta.get("problem")
        if isinstance(recorded, dict):
            return Problem.from_dict(recorded)
        return unexpected("the worker's job failed")

    def worker(self, name: str | None = None) -> "_Worker":
        try:
            return _Worker([self.queue], connection=self.connection, name=name, job_class=_Job,
                           maintenance_interval=MAINTENANCE_INTERVAL_S)
        except _REDIS_DOWN:
            raise self._unavailable("worker start") from None


def run_job(sealed: bytes) -> dict:
    """The RQ job: decrypt, stamp, store, record. Returns the record (no token in it). Slot
    stamps run here; stamps that sign run in the worker's signing helper. A failure leaves its
    problem in the job's meta: what the service answers, and whether RQ retries it."""
    if WORKER_ISSUER is None or WORKER_FERNET is None or WORKER_HELPER is None:
        raise RuntimeError("run_job runs inside `builder worker`, which sets up the issuer and its helper first")
    try:
        doc = _open(sealed)
        if formats.kind(doc["format"]).slotted:
            return _produce(doc)
        return WORKER_HELPER.run(sealed)  # decrypted again there: the token crosses the pipe sealed
    except BuilderError as exc:
        _note_problem(describe(exc))
        raise


def _note_problem(problem: Problem) -> None:
    job = get_current_job()
    if job is None:
        return
    job.meta["problem"] = problem.as_dict()
    try:
        job.save_meta()
    except _REDIS_DOWN:
        pass  # RQ cannot record the failure either; the job is retried after its timeout


def _open(sealed: bytes) -> dict:
    try:
        return json.loads(WORKER_FERNET.decrypt(sealed))
    except InvalidToken:
        raise NotConfigured("a job reached a worker sealed with another queue key, so the worker cannot read it",
                            "its operators must give the service and every worker the same BUILDER_QUEUE_KEY") from None


def _produce(doc: dict) -> dict:
    enrollment = WORKER_ISSUER.parse_signed(doc["release"], doc["enrollment"])
    log.register_secret(enrollment.token.reveal())
    rec = WORKER_ISSUER.produce(doc["id"], doc["release"], doc["format"], enrollment)
    return {"id": rec.id, "sha256": rec.sha256, "key": rec.key}


class HelperFailed(StampFailed):
    """The signing helper died (RQ retries the job with a new helper), or failed the job with
    `problem`, which says whether RQ retries it."""


class SigningHelper:
    """One spawned process that does the stamps which sign, one at a time, for one worker.

    Spawned, not forked: it starts its own storage I/O runtime and opens its own Redis-free
    issuer from `make_issuer` (a picklable, module-level callable). Jobs reach it still sealed,
    so the token crosses the pipe encrypted. It leads its own process group: a Ctrl-C meant for
    the worker does not cut a signature in half, and the worker ends it on exit."""

    def __init__(self, make_issuer: Callable, log_settings: dict):
        self._make_issuer = make_issuer
        self._log_settings = log_settings
        self._proc = None
        self._conn = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_helper_main, args=(theirs, self._make_issuer, self._log_settings),
                           name="builder-signing-helper", daemon=True)
        proc.start()
        theirs.close()
        self._proc, self._conn = proc, mine
        try:
            kind, value = mine.recv()  # once its issuer is open and its releases are warm
        except (EOFError, OSError):
            kind, value = "error", f"it exited with code {proc.exitcode}"
        if kind != "ready":
            self.stop()
            raise HelperFailed(f"the signing helper did not start: {value}")

    def run(self, sealed: bytes) -> dict:
        if self._proc is None or not self._proc.is_alive():
            self.stop()
            self.start()
        try:
            self._conn.send_bytes(sealed)
            while not self._conn.poll(0.5):
                if not self._proc.is_alive():
                    break
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self.stop()
            raise HelperFailed(f"the signing helper ended mid-job (exit code {code}); the job is retried",
                               problem=unexpected("the worker's signing helper ended mid-job")) from None
        except BaseException:  # RQ's job timeout, a stop request: a half-done signature is of no use
            self.stop(kill=True)
            raise
        if kind != "ok":
            raise HelperFailed(value["detail"], problem=Problem.from_dict(value["problem"]))
        return value

    def stop(self, *, kill: bool = False) -> None:
        """End the helper: an idle one exits when its pipe closes; `kill` ends it at once with
        the tools it is running (its process group)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return
        if not kill:
            proc.join(timeout=5)
        if proc.is_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join(timeout=5)


def _helper_main(conn, make_issuer: Callable, log_settings: dict) -> None:
    global WORKER_ISSUER, WORKER_FERNET
    os.setsid()
    log.setup(**log_settings)
    try:
        WORKER_ISSUER, WORKER_FERNET = make_issuer()
        WORKER_ISSUER.warm()
    except Exception as exc:  # noqa: BLE001 - reported by the worker, which then stops
        conn.send(("error", log.redact(f"{type(exc).__name__}: {exc}")))
        return
    conn.send(("ready", None))
    while True:
        try:
            sealed = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the worker is gone or done
        try:
            reply = ("ok", _produce(_open(sealed)))
        except Exception as exc:  # noqa: BLE001 - the worker re-raises it for RQ to record
            problem = describe(exc) if isinstance(exc, BuilderError) else unexpected("the signing helper failed")
            reply = ("error", {"detail": log.redact(f"{type(exc).__name__}: {exc}"), "problem": problem.as_dict()})
        try:
            conn.send(reply)
        except OSError:
            return  # the worker died while this job ran: RQ's cleanup retries it

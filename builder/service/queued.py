"""Waiting for a job on the Redis queue (builder.service.jobs.RedisQueue): its record, the
failure a worker reported, or, for the HTTP service, nobody taking it."""

from __future__ import annotations

import time
from typing import Callable

from builder.service.problems import StampFailed
from builder.service.records import Record
from builder.storage import StorageUnavailableError

# Waiting for a queued job's record: first look after POLL_FIRST_S, then ever less often.
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.25
FAILURE_CHECK_S = 0.5


def wait_for_job(queue, read_record: Callable[[str], Record | None], installer_id: str, wait_s: float,
                 pickup_s: float | None) -> Record | None:
    """The record of a queued job, up to `wait_s`. With `pickup_s` (the HTTP service), only
    while a worker works on it: None (the caller answers 202) at once when no worker is
    registered, and after `pickup_s` when none has taken the job (all busy, or gone without
    deregistering), so that a request does not hold a connection and a thread for work
    nobody does. A slot stamp is ready in milliseconds, a baked one in seconds: look soon,
    then back off, so that a waiting request costs a few reads, not one every 10 ms."""
    start = time.monotonic()
    deadline, next_failure_check, pause = start + wait_s, start + FAILURE_CHECK_S, POLL_FIRST_S
    # Until a worker is seen with the job, its state is read at every look; then only
    # whether it failed, every FAILURE_CHECK_S.
    taken = pickup_s is None
    if not taken:
        try:
            pickup_s = pickup_s if queue.has_workers() else 0.0
        except StorageUnavailableError:
            taken = True  # cannot tell: the record in storage decides
    while True:
        rec = read_record(installer_id)
        if rec is not None:
            return rec
        now = time.monotonic()
        if not taken:
            try:
                state = queue.state(installer_id)
            except StorageUnavailableError:
                state = "unknown"  # a worker may be finishing it: wait for the record
            if state == "failed":
                raise_if_failed(queue, installer_id)
            taken = state in ("started", "finished", "unknown")
            if not taken and now - start >= pickup_s:
                return read_record(installer_id)
        elif now >= next_failure_check:
            _raise_if_failed_quietly(queue, installer_id)
            next_failure_check = now + FAILURE_CHECK_S
        if now >= deadline:
            break
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, POLL_MAX_S)
    _raise_if_failed_quietly(queue, installer_id)
    return None


def raise_if_failed(queue, installer_id: str) -> None:
    """The failure a worker reported for this request, as the error it would have been
    in-process (same code, status and sentence)."""
    problem = queue.failure(installer_id)
    if problem is not None:
        raise StampFailed(problem.message, problem=problem)


def _raise_if_failed_quietly(queue, installer_id: str) -> None:
    """While waiting for a job already queued: a queue that stops answering is no reason to
    fail the request, since the record in storage is what says the installer is ready."""
    try:
        raise_if_failed(queue, installer_id)
    except StorageUnavailableError:
        pass

"""The worker's signing helper: a spawned process that does the stamps which sign.

A stand-in issuer (module level, so the spawned helper can import it) takes the place of the
real one: these tests are about the process, the pipe and the failures, not about stamping,
which tests/integration/test_workers.py covers with real workers, Redis and osslsigncode.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from builder.enrollment import Enrollment, Secret
from builder.signing.enrollment_key import FileEnrollmentKey
from builder.trust import Trust, verify
from cryptography.hazmat.primitives.asymmetric import ec
from builder.config import Environment
from builder.service import jobs

pytestmark = pytest.mark.timeout(120)


class FakeRecord:
    def __init__(self, installer_id: str, group_id: str):
        self.id, self.sha256, self.key = installer_id, "0" * 64, f"installers/{group_id}"


# A fixed key: the helper is a spawned process and must verify what the test signed.
KEY = FileEnrollmentKey.from_private_key(ec.derive_private_key(0x5EED, ec.SECP256R1()))
TRUST = Trust((KEY.pin,), ("console.example.com",))


class FakeIssuer:
    """produce() by group id: "slow-*" sleeps, "fail-*" raises with the token in the message."""

    def __init__(self, marks: Path):
        self.marks = marks

    def warm(self) -> None:
        pass

    def parse_signed(self, version, jws):
        return verify(jws, TRUST, int(time.time()))

    def produce(self, installer_id, version, fmt, enrollment: Enrollment):
        (self.marks / f"{installer_id}.{os.getpid()}").touch()
        if enrollment.group_id.startswith("slow"):
            time.sleep(60)
        if enrollment.group_id.startswith("fail"):
            raise RuntimeError(f"signing failed for token {enrollment.token.reveal()}")
        return FakeRecord(installer_id, enrollment.group_id)


def fake_issuer(marks: str) -> tuple[FakeIssuer, Fernet]:
    """What `builder worker` hands its helper to call: the issuer, and the key that opens the
    jobs, from the environment the helper reads (as builder.cli._helper_context does)."""
    return FakeIssuer(Path(marks)), jobs.fernet_from(Environment.read().queue_key)


def broken_issuer() -> tuple[FakeIssuer, Fernet]:
    raise RuntimeError("no such storage bucket")


@pytest.fixture
def queue_key(monkeypatch) -> Fernet:
    key = Fernet.generate_key()
    monkeypatch.setenv("BUILDER_QUEUE_KEY", key.decode())  # the helper reads it, as in a worker
    return Fernet(key)


@pytest.fixture
def helper(tmp_path, queue_key):
    h = jobs.SigningHelper(functools.partial(fake_issuer, str(tmp_path)), {"quiet": True})
    h.start()
    yield h
    h.stop()


def sealed(fernet: Fernet, installer_id: str, group: str, token: str) -> bytes:
    enrollment = Enrollment(account_id="acct", group_id=group, token=Secret(token), console_url="https://console.example.com")
    signed = KEY.sign(enrollment, TRUST)
    return fernet.encrypt(json.dumps({"id": installer_id, "release": "1.0.0", "format": "msi",
                                      "enrollment": signed.jws.reveal()}).encode())


def helper_pids(tmp_path: Path, installer_id: str) -> set[int]:
    return {int(p.suffix[1:]) for p in tmp_path.glob(f"{installer_id}.*")}


def wait_for_mark(tmp_path: Path, installer_id: str) -> int:
    deadline = time.monotonic() + 30
    while not helper_pids(tmp_path, installer_id):
        assert time.monotonic() < deadline, "the helper never started the job"
        time.sleep(0.02)
    (pid,) = helper_pids(tmp_path, installer_id)
    return pid


def test_jobs_run_in_one_long_lived_helper(helper, queue_key, tmp_path):
    first = helper.run(sealed(queue_key, "id-1", "group-a", secrets.token_urlsafe(16)))
    second = helper.run(sealed(queue_key, "id-2", "group-b", secrets.token_urlsafe(16)))
    assert first == {"id": "id-1", "sha256": "0" * 64, "key": "installers/group-a"}
    assert second["key"] == "installers/group-b"
    (pid_1,), (pid_2,) = helper_pids(tmp_path, "id-1"), helper_pids(tmp_path, "id-2")
    assert pid_1 == pid_2 != os.getpid()  # the same helper process, not this one
    assert os.getpgid(pid_1) == pid_1  # it leads its own process group


def test_a_failed_job_is_reported_without_its_token(helper, queue_key, tmp_path):
    token = secrets.token_urlsafe(24)
    with pytest.raises(jobs.HelperFailed) as caught:
        helper.run(sealed(queue_key, "id-fail", "fail-group", token))
    assert "RuntimeError: signing failed for token" in str(caught.value)
    assert token not in str(caught.value)
    assert helper.run(sealed(queue_key, "id-after", "group-c", secrets.token_urlsafe(16)))["id"] == "id-after"


def test_a_helper_killed_mid_job_fails_the_job_and_the_next_one_starts_a_new_helper(helper, queue_key, tmp_path):
    import threading

    outcome: list = []

    def call() -> None:
        try:
            helper.run(sealed(queue_key, "id-slow", "slow-group", secrets.token_urlsafe(16)))
        except jobs.HelperFailed as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    pid = wait_for_mark(tmp_path, "id-slow")
    os.killpg(pid, signal.SIGKILL)
    caller.join(timeout=30)
    assert outcome and "ended mid-job" in str(outcome[0])

    assert helper.run(sealed(queue_key, "id-next", "group-d", secrets.token_urlsafe(16)))["id"] == "id-next"
    (new_pid,) = helper_pids(tmp_path, "id-next")
    assert new_pid != pid


def test_a_job_timeout_kills_the_helper(helper, queue_key, tmp_path):
    class Timeout(Exception):
        pass

    def on_alarm(signum, frame):
        raise Timeout()  # what RQ's death penalty does to an overrunning job

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(Timeout):
            helper.run(sealed(queue_key, "id-overrun", "slow-overrun", secrets.token_urlsafe(16)))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    (pid,) = helper_pids(tmp_path, "id-overrun")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, not left signing in the background


def test_a_helper_that_cannot_start_is_a_clear_error(queue_key):
    h = jobs.SigningHelper(broken_issuer, {"quiet": True})
    with pytest.raises(jobs.HelperFailed, match="did not start: RuntimeError: no such storage bucket"):
        h.start()

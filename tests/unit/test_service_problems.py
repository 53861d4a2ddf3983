"""The service's error contract and its waiting rules, in pure code (issue 12).

- every error is described as {error, code, field} with a documented code (the README's table
  is CODES), in service words: no CLI option, no Python class name;
- a worker retries only what may go away (builder.service.jobs._Job);
- a request waits for a queued job only while a worker can take it: none registered, 202 at
  once; registered but nobody took it within PICKUP_S, 202; taken, wait for the record.
Fakes stand in for storage and Redis; tests/integration/test_workers.py runs the real ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from builder.errors import (
    ALL_ERRORS,
    ConfigError,
    EnrollmentError,
    FormatError,
    NotarizationError,
    SigningError,
    SlotError,
    StorageError,
    ToolFailedError,
    ToolMissingError,
    UsageError,
    VerificationError,
)
from builder.signing.signers import Signers
from builder.service import jobs
from builder.service.audit import Audit
from builder.service.issuer import Issuer
from builder.service.records import Record
from builder.service.releases import Damaged, Refusal
from builder.service.problems import (
    CODES,
    FormatNotInRelease,
    NoEnrollmentKey,
    NotConfigured,
    Problem,
    ReleaseRefused,
    Revoked,
    StampFailed,
    UnknownRelease,
    describe,
)
from builder.storage import ObjectNotFoundError
from builder.storage.errors import StorageUnavailableError

README = Path(__file__).resolve().parents[2] / "README.md"
CLI_OPTION = re.compile(r"(?<![\w-])--[a-z]")
PYTHON_CLASS = re.compile(r"\b(?:[A-Z][a-z]+)+(?:Error|Failed|Exception|Refused)\b")


def test_the_readme_table_lists_every_code_with_its_status():
    text = README.read_text()
    section = text[text.index("### Error codes"):]
    rows = re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", section, flags=re.M)
    assert rows, "no table under 'Error codes'"
    assert {code: int(status) for status, code in rows} == {code: status for code, (status, _) in CODES.items()}
    assert len(rows) == len(CODES)  # each once


CASES = [
    # (error, status, code, field, transient)
    (EnrollmentError("{field} has a character outside the allowed set", "use ASCII letters", field="group_id"),
     422, "invalid_field", "group_id", False),
    (EnrollmentError("the enrollment token is empty", "give the group's enrollment token", field="token"),
     422, "invalid_field", "token", False),
    (EnrollmentError("{field} is not allowed by this release: host x is not pinned",
                     "use a pinned console host, or build a release that pins it (--console-host)", field="console_url"),
     422, "invalid_field", "console_url", False),
    (UnknownRelease("release 9.9.9 is not published"), 404, "unknown_release", "release", False),
    (FormatNotInRelease("release 1.0.1 has no pkg installer"), 404, "format_not_in_release", "format", False),
    (ReleaseRefused("release 1.0.2 does not verify on this service"), 503, "release_refused", "release", False),
    (Revoked("this enrollment token was revoked"), 403, "token_revoked", "token", False),
    (NoEnrollmentKey("this service has no enrollment key"), 503, "not_configured", None, False),
    (NotConfigured("a job reached a worker sealed with another queue key"), 503, "not_configured", None, False),
    # A usage error inside the service is a key or option it was started without, never the caller's.
    (UsageError("a baked MSI is signed again: give an Authenticode signing key",
                "--sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11; or stamp --format msi-tagged"),
     503, "not_configured", None, False),
    (ConfigError("no console host is pinned", "set product.console_hosts or give --console-host"), 503, "not_configured", None, False),
    (ToolMissingError("osslsigncode is not installed", "apt-get install osslsigncode"), 503, "not_configured", None, False),
    (SigningError("the signing key does not match the certificate"), 500, "signing_failed", None, True),
    (ToolFailedError("osslsigncode failed (exit 1)"), 500, "stamp_failed", None, True),
    (NotarizationError("the notary service did not answer"), 500, "stamp_failed", None, True),
    (SlotError("the stamp does not fit the slot"), 500, "stamp_failed", None, False),
    (FormatError("not an MSI"), 500, "stamp_failed", None, False),
    (StorageUnavailableError("storage unreachable", retry_after=7), 503, "storage_unavailable", None, True),
    (jobs.QueueUnavailableError("the job queue is not answering", retry_after=5), 503, "queue_unavailable", None, True),
    (StorageError("the bucket refused the write"), 502, "storage_error", None, True),
    (jobs.HelperFailed("the signing helper ended mid-job (exit code -9); the job is retried"), 500, "stamp_failed", None, True),
]


@pytest.mark.parametrize("exc, status, code, field, transient", CASES, ids=[f"{type(c[0]).__name__}-{c[2]}" for c in CASES])
def test_every_error_is_described_with_its_code_status_and_field(exc, status, code, field, transient):
    problem = describe(exc)
    assert (problem.status, problem.code, problem.field, problem.transient) == (status, code, field, transient)
    assert CODES[problem.code][0] == problem.status
    body = problem.body()
    assert set(body) == {"error", "code", "field"} and body["error"]
    assert not CLI_OPTION.search(body["error"]), body["error"]
    assert not PYTHON_CLASS.search(body["error"]), body["error"]
    assert (problem.headers() is not None) == (code in ("storage_unavailable", "queue_unavailable"))


def test_every_class_of_the_hierarchy_has_a_documented_code():
    for cls in ALL_ERRORS:
        assert describe(cls("something went wrong")).code in CODES, cls


def test_a_problem_found_elsewhere_is_answered_as_it_was_found():
    """What a worker or its signing helper found travels as a dict and comes back unchanged."""
    found = describe(NotConfigured("this service cannot make msi installers", "its operators must configure a key"))
    travelled = Problem.from_dict(found.as_dict())
    assert travelled == found
    assert describe(StampFailed(travelled.message, problem=travelled)) == found
    assert describe(jobs.HelperFailed("UsageError: ...", problem=travelled)) == found


def test_fields_are_named_as_the_request_names_them_and_cli_advice_is_dropped():
    problem = describe(EnrollmentError("{field} is not allowed by this release: host a.example is not pinned",
                                       "use a pinned console host, or build a release that pins it (--console-host)",
                                       field="console_url"))
    assert problem.message == ("console_url is not allowed by this release: host a.example is not pinned: "
                               "use a pinned console host, or build a release that pins it")
    usage = describe(UsageError("the MSI needs an Authenticode signing key",
                                "give --sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11, or --no-sign"))
    assert usage.message == "the MSI needs an Authenticode signing key"


# -- retries -----------------------------------------------------------------------------------


def job_with(problem: dict | None, retries_left: int | None = 3) -> jobs._Job:
    job = jobs._Job(id="0" * 32, connection=redis.Redis())  # no connection is made
    job.retries_left = retries_left
    if problem is not None:
        job.meta["problem"] = problem
    return job


def test_a_worker_retries_only_what_may_go_away():
    permanent = describe(NotConfigured("no key")).as_dict()
    transient = describe(ToolFailedError("osslsigncode failed")).as_dict()
    assert job_with(permanent).should_retry is False
    assert job_with(transient).should_retry is True
    assert job_with(None).should_retry is True  # a bug or a timeout: retried as before
    assert job_with(transient, retries_left=0).should_retry is False


# -- refused releases --------------------------------------------------------------------------


def test_a_refusal_says_why_without_naming_paths_of_the_host():
    cases = [
        (VerificationError("release exe: a.exe's signing root is not in --ca /srv/ca.pem (...)", "give --ca the root"), "signature"),
        (VerificationError("release file /srv/cache/a.exe does not match its sha256 in the manifest"), "checksum"),
        (Damaged("incomplete", "release 1.0.2: object dist/x named by its index is missing"), "incomplete"),
        (FormatError("release 1.0.2: index dist/releases/1.0.2/manifest.json is not a release index"), "malformed"),
    ]
    for exc, reason in cases:
        refusal = Refusal.of("1.0.2", exc)
        assert refusal.reason == reason
        error = refusal.error()
        assert isinstance(error, ReleaseRefused) and "/srv" not in error.message and "release 1.0.2" in error.message
        assert str(exc) in refusal.detail  # the whole error, for the log


# -- waiting for a queued job ------------------------------------------------------------------


class FakeStore:
    """No record until `ready_after` reads of it; counts the reads."""

    presigned_links = False

    def __init__(self, ready_after: int | None = None):
        self.ready_after, self.gets = ready_after, 0

    def get(self, key):
        self.gets += 1
        if self.ready_after is not None and self.gets > self.ready_after:
            return Record("0" * 32, "1.0.0", "exe", "stamps/x.json", "0" * 64, 1, "a", "g", "f" * 64).as_json()
        raise ObjectNotFoundError(f"no {key}", key=key)


class FakeQueue:
    def __init__(self, workers: bool, states: list, problem: Problem | None = None):
        self.workers, self.states, self.problem = workers, list(states), problem
        self.submitted = self.looks = 0

    def submit(self, *args):
        self.submitted += 1

    def has_workers(self):
        return self.workers

    def state(self, installer_id):
        self.looks += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(state, Exception):
            raise state
        return state

    def failure(self, installer_id):
        return self.problem


@pytest.fixture
def make_issuer(tmp_path):
    made = []

    def make(store, queue) -> Issuer:
        issuer = Issuer(store, signers=Signers(unsigned=True), cache_dir=tmp_path, audit=Audit(tmp_path / f"a{len(made)}.sqlite"))
        issuer.queue = queue
        made.append(issuer)
        return issuer

    yield make
    for issuer in made:
        issuer.close()


def test_no_worker_registered_is_answered_at_once(make_issuer):
    store, queue = FakeStore(), FakeQueue(workers=False, states=["queued"])
    issuer = make_issuer(store, queue)
    assert issuer._run("0" * 32, "1.0.0", "exe", None, wait_s=300, pickup_s=60) is None
    assert (queue.submitted, queue.looks) == (1, 1)  # one look at the job, no waiting


def test_a_job_no_worker_takes_within_the_pickup_window_is_answered_pending(make_issuer):
    queue = FakeQueue(workers=True, states=["queued"])
    issuer = make_issuer(FakeStore(), queue)
    assert issuer._run("0" * 32, "1.0.0", "exe", None, wait_s=300, pickup_s=0.0) is None
    assert queue.looks == 1


def test_a_taken_job_is_waited_for_with_back_off(make_issuer):
    store = FakeStore(ready_after=6)
    queue = FakeQueue(workers=True, states=["started"])
    issuer = make_issuer(store, queue)
    rec = issuer._run("0" * 32, "1.0.0", "exe", None, wait_s=300, pickup_s=0.0)
    assert rec is not None and rec.id == "0" * 32
    assert store.gets == 7  # 5 ms, then twice as long each time: a handful of reads


def test_without_a_pickup_window_the_caller_waits_for_the_installer(make_issuer):
    """`builder issue --redis` waits for its installer, taken or not."""
    store = FakeStore(ready_after=4)
    queue = FakeQueue(workers=False, states=["queued"])
    issuer = make_issuer(store, queue)
    assert issuer._run("0" * 32, "1.0.0", "exe", None, wait_s=300) is not None


def test_a_queue_that_stops_answering_does_not_end_the_wait(make_issuer):
    """The record in storage says when the installer is ready, Redis or not."""
    store = FakeStore(ready_after=3)
    queue = FakeQueue(workers=True, states=[jobs.QueueUnavailableError("down", retry_after=5)])
    issuer = make_issuer(store, queue)
    assert issuer._run("0" * 32, "1.0.0", "exe", None, wait_s=300, pickup_s=0.0) is not None


def test_a_failed_job_is_the_problem_the_worker_found(make_issuer):
    found = describe(NotConfigured("this service cannot make msi installers", "its operators must configure a key"))
    queue = FakeQueue(workers=True, states=["started", "failed"], problem=found)
    issuer = make_issuer(FakeStore(), queue)
    with pytest.raises(StampFailed) as caught:
        issuer._run("0" * 32, "1.0.0", "msi", None, wait_s=300, pickup_s=0.5)
    assert describe(caught.value) == found

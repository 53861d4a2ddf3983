"""What the service answers when it cannot serve a request, and the service's own errors.

Every error answer is `{"error": one sentence, "code": a stable snake_case code, "field": the
request field concerned or null}`. `describe()` turns any BuilderError into that answer; it is
the one mapping, used by the HTTP app for work done in-process and by `builder worker`s, whose
failures reach the service as these problems (in the job's meta), so a client gets the same
answer either way. The README's table lists CODES; a test holds the two together.

The service's errors below are BuilderErrors like every other (one hierarchy), each under its
kind in builder/errors.py (which gives its exit code): a class's code comes from the table
`_BY_CLASS`, unless the class names its own `code` (a finer one than its kind's); `field` names
the request field concerned.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from builder import log
from builder.errors import (
    BuilderError,
    ConfigError,
    EnrollmentError,
    FormatError,
    PayloadError,
    QueueError,
    RevokedError,
    SigningError,
    SlotError,
    StorageError,
    ToolMissingError,
    UnknownReleaseError,
    UsageError,
    VerificationError,
    WorkerFailedError,
)
from builder.release import UntrustedRelease
from builder.storage.errors import InvalidKeyError, StorageUnavailableError

# code -> (HTTP status, when). The README's "Error codes" table says the same.
CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the request could not be read (HTTP level)"),
    "unauthorized": (401, "no API key, or an unknown one"),
    "token_revoked": (403, "the enrollment token was revoked"),
    "invalid_link": (403, "a download link whose signature does not match"),
    "not_found": (404, "no such path or installer id"),
    "unknown_release": (404, "the release is not published, or is not a version or `latest`"),
    "format_not_in_release": (404, "the release (or, for `latest`, every release that verifies) has no installer of the format"),
    "method_not_allowed": (405, "the path does not take this method"),
    "installer_revoked": (410, "the installer carries a revoked enrollment token"),
    "link_expired": (410, "the download link expired: ask for the installer again"),
    "body_too_large": (413, "the request body is over 64 KiB"),
    "invalid_json": (422, "the body is not JSON"),
    "invalid_field": (422, "a field is missing, unknown or breaks its rule (`field` names it)"),
    "internal_error": (500, "a bug: the service's log has the traceback"),
    "signing_failed": (500, "signing the installer failed (key, password, timestamp server)"),
    "stamp_failed": (500, "the installer could not be made (a tool or a worker failed)"),
    "storage_error": (502, "the storage backend refused an operation"),
    "not_configured": (503, "the service lacks configuration the request needs (a signing key, the enrollment key, the queue key)"),
    "release_refused": (503, "the release is published but does not verify on this service"),
    "storage_unavailable": (503, "the storage backend is not answering (Retry-After)"),
    "queue_unavailable": (503, "the job queue (Redis) is not answering (Retry-After)"),
}

# What a plain HTTP error of the framework (unknown path, wrong method) is called.
CODE_OF_STATUS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                  413: "body_too_large", 422: "invalid_field"}


@dataclass(frozen=True, kw_only=True)
class Problem:
    status: int
    code: str
    message: str
    field: str | None = None
    retry_after: int | None = None
    # True: the same work may succeed when tried again (a tool, storage, a dead helper); a
    # worker retries it. False: it fails the same way until the operator changes something.
    transient: bool = False

    def body(self) -> dict:
        return {"error": log.redact(self.message), "code": self.code, "field": self.field}

    def headers(self) -> dict | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else None

    def as_dict(self) -> dict:
        return {**asdict(self), "message": log.redact(self.message)}

    @classmethod
    def from_dict(cls, doc: dict) -> "Problem":
        return cls(**{k: doc.get(k) for k in ("status", "code", "message", "field", "retry_after")},
                   transient=bool(doc.get("transient")))


# -- the service's errors ---------------------------------------------------------------------


class UnknownRelease(UnknownReleaseError):
    field = "release"


class FormatNotInRelease(UnknownRelease):
    """The release named, or every release that verifies for `latest`, lacks the format."""

    code = "format_not_in_release"
    field = "format"


class ReleaseRefused(VerificationError):
    """A published release that does not verify here: the service serves the others."""

    code = "release_refused"
    field = "release"


class Revoked(RevokedError):
    field = "token"


class NotConfigured(UsageError):
    """The service (or a worker) lacks what the request needs: a signing key, the enrollment
    key, the queue key the service uses. Messages say what the operator must configure."""


class NoEnrollmentKey(NotConfigured):
    """The service was started without an enrollment key: it cannot sign enrollments."""


class StampFailed(WorkerFailedError):
    """A worker could not make the installer (after its retries); nothing was published. It
    carries the problem the worker found, which is what the client is told."""

    def __init__(self, message: str, hint: str | None = None, *, problem: Problem | None = None):
        super().__init__(message, hint)
        self.problem = problem


# -- BuilderError -> Problem -----------------------------------------------------------------

# For the hierarchy's own classes, first match wins. Permanent: the same request fails the same
# way; it is the operator's to fix (configuration) or the release's (a stamp that cannot fit).
_BY_CLASS: tuple[tuple[type[BuilderError], str, bool], ...] = (
    (UntrustedRelease, "release_refused", False),
    (QueueError, "queue_unavailable", True),
    (UnknownReleaseError, "unknown_release", False),
    (RevokedError, "token_revoked", False),
    (WorkerFailedError, "stamp_failed", True),
    (StorageUnavailableError, "storage_unavailable", True),
    (InvalidKeyError, "invalid_field", False),
    (StorageError, "storage_error", True),
    (EnrollmentError, "invalid_field", False),
    # Inside the service a usage error is never the caller's (requests are validated first):
    # it is a key or an option the service was started without.
    (UsageError, "not_configured", False),
    (ConfigError, "not_configured", False),
    (PayloadError, "not_configured", False),
    (ToolMissingError, "not_configured", False),
    (SigningError, "signing_failed", True),
    (FormatError, "stamp_failed", False),
    (VerificationError, "stamp_failed", False),
    (SlotError, "stamp_failed", False),
    (BuilderError, "stamp_failed", True),
)

# A hint may carry CLI advice, "(--console-host)": not something a web caller or operator of the
# service can act on as written. Fields are named by the errors themselves (BuilderError.field)
# in the library's words, which are the request's JSON fields.
_CLI_ADVICE = re.compile(r"\s*\((?:give |use )?--[a-z][^)]*\)")
_CLI_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def service_words(exc: BuilderError) -> str:
    """The error as one sentence for a web caller: fields by their JSON names, and no CLI advice
    (a hint that still names options is dropped)."""
    message, hint = exc.message, _CLI_ADVICE.sub("", exc.hint or "")
    if _CLI_OPTION.search(message):
        message = _CLI_OPTION.sub("a setting", message)
    if hint and not _CLI_OPTION.search(hint):
        return f"{message}: {hint}"
    return message


def describe(exc: BuilderError) -> Problem:
    """The answer for `exc`: its code and status, one sentence, the field, whether to retry."""
    carried = getattr(exc, "problem", None)
    if isinstance(carried, Problem):
        return carried
    code, transient = getattr(exc, "code", None), False
    if code is None:
        code, transient = next((c, t) for cls, c, t in _BY_CLASS if isinstance(exc, cls))
    elif code in ("storage_unavailable", "queue_unavailable", "stamp_failed"):
        transient = True
    retry_after = None
    if code in ("storage_unavailable", "queue_unavailable"):
        retry_after = int(getattr(exc, "retry_after", None) or 5)
    return Problem(status=CODES[code][0], code=code, message=log.redact(service_words(exc)), field=exc.field,
                   retry_after=retry_after, transient=transient)


def unexpected(what: str) -> Problem:
    """A failure that is not a BuilderError (a bug, a timeout): its details stay in the log."""
    return Problem(status=500, code="stamp_failed", transient=True,
                   message=f"the installer could not be made: {what}; the service's operators have the details in its log")

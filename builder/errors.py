"""The one error hierarchy. Every class has its own exit code; messages say what to do next.

The CLI catches only `BuilderError`, so an unexpected exception (a bug) keeps its traceback.
Messages must never contain a secret: callers pass field names and paths, not values.
"""

from __future__ import annotations


class BuilderError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `hint` is the fix, shown after the cause.

    `field` names the input concerned (`account_id`, `console_url`, `release`...), in the
    library's words. A message that names it says `{field}` where the name goes: the CLI puts its
    option there (`--account-id`), the service its JSON field (`account_id`), see `worded`.
    """

    exit_code = 1
    field: str | None = None

    def __init__(self, message: str, hint: str | None = None, *, field: str | None = None):
        self.template = message
        self.hint = hint
        if field is not None:
            self.field = field
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return self.worded(lambda name: name)

    def worded(self, name_of) -> str:
        """The message with the field named by `name_of(field)` (the CLI: its option)."""
        if self.field is None or "{field}" not in self.template:
            return self.template
        return self.template.replace("{field}", name_of(self.field))

    def placed(self, where: str, name_of=None) -> "BuilderError":
        """The same error (class, exit code, attributes) with `where` in front, its field worded
        by `name_of` (as the place names it): not rebuilt through __init__, whose arguments
        differ between classes."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.template = f"{where}: {self.worded(name_of or (lambda name: name))}"
        new.field = None  # worded already
        new.args = (new.message,)
        return new

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class UsageError(BuilderError):
    """An option or argument is wrong or missing (unknown format, conflicting options)."""

    exit_code = 2


class EnrollmentError(BuilderError):
    """An enrollment field breaks its rule (account id, group id, token, console URL)."""

    exit_code = 3


class ConfigError(BuilderError):
    """The product identity file is unreadable or holds an invalid value."""

    exit_code = 4


class PayloadError(BuilderError):
    """The payload folder is missing, empty, or lacks the file a format needs."""

    exit_code = 5


class ToolMissingError(BuilderError):
    """An external program is not installed."""

    exit_code = 6


class ToolFailedError(BuilderError):
    """An external program ran and failed; its output is in the debug log."""

    exit_code = 7


class SigningError(BuilderError):
    """Signing failed: wrong password, unusable key or certificate, unreachable timestamp server."""

    exit_code = 8


class VerificationError(BuilderError):
    """A signature or a file's structure does not verify."""

    exit_code = 9


class FormatError(BuilderError):
    """An input file is not of the format it claims (truncated, not a PE, not an MSI...)."""

    exit_code = 10


class SlotError(BuilderError):
    """A stamp does not fit the release's reserved slot, or the slot is missing."""

    exit_code = 11


class StorageError(BuilderError):
    """The storage backend is unreachable or refused an operation."""

    exit_code = 12


class NotarizationError(BuilderError):
    """Apple notarization was requested and failed."""

    exit_code = 13


class OutputError(BuilderError):
    """The output folder or file cannot be written."""

    exit_code = 14


class UnknownReleaseError(BuilderError):
    """The release asked for is not published (or lacks the format asked for)."""

    exit_code = 15


class RevokedError(BuilderError):
    """The enrollment token was revoked: nothing is issued for it any more."""

    exit_code = 16


class WorkerFailedError(BuilderError):
    """A worker, or its signing helper, could not make the installer; nothing was published."""

    exit_code = 17


class QueueError(BuilderError):
    """The job queue (Redis) is unreachable or refused an operation."""

    exit_code = 18


ALL_ERRORS: tuple[type[BuilderError], ...] = (
    BuilderError,
    UsageError,
    EnrollmentError,
    ConfigError,
    PayloadError,
    ToolMissingError,
    ToolFailedError,
    SigningError,
    VerificationError,
    FormatError,
    SlotError,
    StorageError,
    NotarizationError,
    OutputError,
    UnknownReleaseError,
    RevokedError,
    WorkerFailedError,
    QueueError,
)

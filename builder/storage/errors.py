"""Storage errors: every one is a `StorageError` (exit 12), with what the service needs to map it.

| class                    | service answer          | retry_after            |
| ------------------------ | ----------------------- | ---------------------- |
| InvalidKeyError          | 400 (also a ValueError) | None                   |
| ObjectNotFoundError      | 404                     | None                   |
| StorageUnavailableError  | 503 + Retry-After       | seconds, from settings |
| ReleaseConflictError     | 409                     | None                   |
| StorageError (others)    | 500                     | None                   |

Messages name the store by its display URL, which never carries credentials.
"""

from __future__ import annotations

from builder.errors import StorageError


class InvalidKeyError(StorageError, ValueError):
    """A key (or prefix, or file name) breaks the key rules; hostile input ends here.

    Both a StorageError (so the CLI reports it with exit 12) and a ValueError (so a web layer
    can map it to 400 without knowing storage). Catch it before StorageError.
    """

    retry_after: int | None = None


class ObjectNotFoundError(StorageError):
    retry_after: int | None = None

    def __init__(self, message: str, hint: str | None = None, *, key: str):
        super().__init__(message, hint)
        self.key = key


class StorageUnavailableError(StorageError):
    """The backend did not answer, timed out or answered 5xx: the same call may work later."""

    def __init__(self, message: str, hint: str | None = None, *, retry_after: int):
        super().__init__(message, hint)
        self.retry_after = retry_after


class ReleaseConflictError(StorageError):
    """A release of the same version name, with other content, is already published."""

    retry_after: int | None = None

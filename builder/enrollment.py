"""The enrollment stamped into an installer, and the rules its fields must follow.

Rules are deliberately narrow: each field is either accepted and carried byte-for-byte through
XML (WiX), NSIS strings, shell (postinstall) and JSON, or refused with a message that names the
field and the rule. Nothing is silently rewritten.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import re
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from builder.errors import EnrollmentError, UsageError

MAX_TOKEN_BYTES = 4096
MAX_ID_CHARS = 128
MAX_URL_CHARS = 2048

# Ids are what the console generates (numbers, UUIDs, slugs). ASCII only: Windows Installer
# has no UTF-8 database codepage, so a non-ASCII id could not round-trip through an MSI.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-:@]*$")
# base64url, standard base64 and JWT (three base64url parts joined by dots).
TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-+/.=~]+$")
# RFC 3986 unreserved + reserved characters and percent escapes, less "[" and "]" (MSI
# formatted fields expand [NAME]; IPv6 literals are not supported). No double quotes, spaces,
# backslashes, angle brackets, braces or control characters.
URL_CHARS_RE = re.compile(r"^[A-Za-z0-9\-._~:/?#@!$&'()*+,;=%]+$")


class Secret:
    """A value that must never be printed. `repr` and `str` are masked; `reveal()` is explicit."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A short, stable, non-reversible name for the secret, fit for logs and audits."""
        return "sha256:" + hashlib.sha256(self._value.encode()).hexdigest()[:16]

    def masked(self) -> str:
        return f"******** ({len(self._value)} chars)"

    def __repr__(self) -> str:
        return "Secret(********)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # pickling would copy the value somewhere we do not control
        raise TypeError("Secret values are not picklable")


@dataclass(frozen=True)
class Enrollment:
    account_id: str
    group_id: str
    token: Secret
    console_url: str

    def __post_init__(self) -> None:
        validate_id("account_id", self.account_id)
        validate_id("group_id", self.group_id)
        validate_token(self.token)
        validate_console_url(self.console_url)

    def to_json_bytes(self) -> bytes:
        """The enrollment as the agent reads it (slot payload, sidecar file). Contains the token."""
        doc = {
            "account_id": self.account_id,
            "group_id": self.group_id,
            "console_url": self.console_url,
            "enrollment_token": self.token.reveal(),
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, source: str) -> "Enrollment":
        try:
            doc = json.loads(data.decode("utf-8"))
            return cls(
                account_id=doc["account_id"],
                group_id=doc["group_id"],
                token=Secret(doc["enrollment_token"]),
                console_url=doc["console_url"],
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EnrollmentError(
                f"{source}: the stamped enrollment is not valid JSON with the four fields ({type(exc).__name__})",
                "rebuild or re-stamp the installer",
            ) from None

    def public(self) -> dict:
        """What may be shown: every field but the token, which is masked and fingerprinted."""
        return {
            "account_id": self.account_id,
            "group_id": self.group_id,
            "console_url": self.console_url,
            "token": self.token.masked(),
            "token_fingerprint": self.token.fingerprint(),
        }


def validate_id(field: str, value: str) -> None:
    """`value` of the id `field` (account_id, group_id, release...) follows ID_RE; the error
    names the field, which the CLI and the service each word their own way."""
    if not isinstance(value, str) or not value:
        raise EnrollmentError("{field} is empty", f"give the console's {field.replace('_', ' ')}", field=field)
    if len(value) > MAX_ID_CHARS:
        raise EnrollmentError(f"{{field}} is {len(value)} characters long", f"the limit is {MAX_ID_CHARS}", field=field)
    if not ID_RE.fullmatch(value):
        raise EnrollmentError(
            "{field} has a character outside the allowed set",
            "use ASCII letters, digits and . - : @ _ (starting with a letter or digit)",
            field=field,
        )


def validate_token(token: Secret) -> None:
    value = token.reveal()
    if not value:
        raise EnrollmentError("the enrollment token is empty", "give the group's enrollment token", field="token")
    size = len(value.encode())
    if size > MAX_TOKEN_BYTES:
        raise EnrollmentError(f"the enrollment token is {size} bytes", f"the limit is {MAX_TOKEN_BYTES} bytes", field="token")
    if not TOKEN_RE.fullmatch(value):
        # Never echo the value: name the rule only.
        raise EnrollmentError(
            "the enrollment token has a character outside base64/base64url/JWT",
            "allowed are A-Z a-z 0-9 - _ + / . = ~",
            field="token",
        )


def validate_console_url(value: str) -> None:
    def refuse(message: str, hint: str):
        raise EnrollmentError(message, hint, field="console_url")

    if not value:
        refuse("{field} is empty", "give the console's https URL")
    if len(value) > MAX_URL_CHARS:
        refuse(f"{{field}} is {len(value)} characters long", f"the limit is {MAX_URL_CHARS}")
    if not URL_CHARS_RE.fullmatch(value):
        refuse("{field} has a character not allowed here (space, double quote, backslash, <, >, [, ], braces or non-ASCII)",
               "percent-encode it")
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        refuse("{field} must be an https:// URL with a host", f"got scheme '{parts.scheme}'")
    # What agents refuse (builder.trust.console_url_problem), refused before anything is signed:
    # a user@ part hides the real host from a reader; an IP literal pins nothing.
    if "@" in parts.netloc or "%" in parts.netloc:
        refuse("{field} must not carry user information or percent-escapes in its host", "give https://host[:port]/path")
    if re.fullmatch(r"[0-9.]+", parts.hostname):
        refuse("{field} must name a host, not an IP address", "agents only talk to console host names pinned in the release")


def read_token(token_file: str | None, token_env: str | None, environ: dict | None = None, *,
               regular_only: bool = False) -> Secret:
    """The token from a file, standard input (`-`) or an environment variable, never from argv.
    With `regular_only`, the file must be a regular file named by itself: a link (checked as it
    is opened, O_NOFOLLOW, so it cannot be swapped in after a check), FIFO or device is refused."""
    if (token_file is None) == (token_env is None):
        raise UsageError("give exactly one of --token-file and --token-env", "the token is never taken as an option value")
    if token_env is not None:
        env = os.environ if environ is None else environ
        if token_env not in env:
            raise UsageError(f"environment variable {token_env} (--token-env) is not set", "export it first")
        raw = env[token_env]
    else:
        # At most the largest token and a line end, plus one byte to tell that the file holds
        # more: `--token-file /dev/zero` must not read without end.
        limit = MAX_TOKEN_BYTES + len("\r\n")
        try:
            if token_file == "-":
                stdin = getattr(sys.stdin, "buffer", None)
                data = stdin.read(limit + 1) if stdin is not None else sys.stdin.read(limit + 1).encode()
            else:
                nofollow = os.O_NOFOLLOW | os.O_NONBLOCK if regular_only else 0
                with os.fdopen(os.open(token_file, os.O_RDONLY | os.O_CLOEXEC | nofollow), "rb") as fh:
                    if regular_only and not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                        raise OSError(errno.ELOOP, "not a regular file")
                    data = fh.read(limit + 1)
        except OSError as exc:
            if regular_only and exc.errno == errno.ELOOP:
                raise UsageError(f"--token-file {token_file} is a link or not a regular file",
                                 "name the token file itself") from None
            raise UsageError(f"--token-file {token_file}: cannot read it ({exc.__class__.__name__})", "check the path") from None
        if len(data) > limit:
            raise EnrollmentError(f"--token-file {token_file}: more than {MAX_TOKEN_BYTES} bytes",
                                  f"the token is at most {MAX_TOKEN_BYTES} bytes")
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--token-file {token_file}: cannot read it ({exc.__class__.__name__})", "check the path") from None
    # A trailing newline from `echo` or an editor is not part of the token.
    return Secret(raw.strip("\r\n"))

"""Object keys: the one place that decides which names may reach a store.

A key is a relative path of segments made of `[A-Za-z0-9._-]`, joined by `/`. No empty
segment, no segment starting with `.` (so no `.` or `..`, and `.tmp/` stays free for the local
store's staging files), no leading or trailing `/`, no backslash, no control character, at most
512 characters. Hostile ids (`../x`, `%2e%2e`, `a\\b`, `a\x00`) are refused, never rewritten.
"""

from __future__ import annotations

import re

from builder.storage.errors import InvalidKeyError

MAX_KEY_CHARS = 512
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SUFFIX_RE = re.compile(r"(\.[A-Za-z0-9]{1,16}){0,3}")


def validate_key(key: object, what: str = "key") -> str:
    """`key` unchanged if it follows the rules; InvalidKeyError otherwise (the key is shown escaped)."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"{what} must be a non-empty string", "use letters, digits, '.', '_', '-' and '/'")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidKeyError(f"{what} is {len(key)} characters long, more than {MAX_KEY_CHARS}")
    for segment in key.split("/"):
        if not _SEGMENT_RE.fullmatch(segment):
            raise InvalidKeyError(
                f"{what} {key[:80]!r} has an empty segment, a segment starting with '.', or a "
                "character outside [A-Za-z0-9._-/]",
                "object keys are relative paths such as releases/1.2.3/index.json",
            )
    return key


def is_valid_key(key: object) -> bool:
    """Whether `key` follows the rules (validate_key), for a caller with its own error."""
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def validate_prefix(prefix: str, what: str = "prefix") -> str:
    """A prefix is a key, or "" for the store's root."""
    return "" if prefix == "" else validate_key(prefix, what)


def join_key(*parts: str) -> str:
    """Join validated parts with `/`, skipping empty ones."""
    key = "/".join(p for p in parts if p)
    return validate_key(key)


def content_key(prefix: str, sha256: str, suffix: str = "") -> str:
    """`prefix/ab/abcdef...<suffix>`: the key of an object named by its content's SHA-256.

    Two fan-out characters keep local directories small. Same content, same key: a second
    publisher of the same bytes finds the object present and loses the create race harmlessly.
    """
    if not _SHA256_RE.fullmatch(sha256 or ""):
        raise InvalidKeyError("sha256 must be 64 lower-case hex characters")
    if not _SUFFIX_RE.fullmatch(suffix):
        raise InvalidKeyError(f"suffix {suffix[:40]!r} must look like '.exe' or '.tar.gz'")
    return join_key(validate_prefix(prefix), sha256[:2], sha256 + suffix)

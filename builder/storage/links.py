"""Expiring download links, signed with HMAC-SHA256, for stores without presigned URLs (local disk).

A link is `<route>/<key>?exp=<unix seconds>&sig=<hex>`, the signature covering a version tag,
the key and the expiry; the service's download route (`/v1/download/<installer id>`) serves
them. It checks a link with `check_link` and answers by the status:
OK serves the file, EXPIRED is 410 Gone, INVALID (tampered, malformed, other key) is 403.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from urllib.parse import quote

from builder.storage.errors import InvalidKeyError
from builder.storage.keys import validate_key

_EXP_RE = re.compile(r"[0-9]{1,12}")
_SIG_RE = re.compile(r"[0-9a-f]{64}")


class LinkStatus(enum.Enum):
    OK = 200
    INVALID = 403
    EXPIRED = 410

    @property
    def http_status(self) -> int:
        return self.value


def _signature(secret: bytes, key: str, exp: int) -> str:
    message = f"builder-link-v1\n{key}\n{exp}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_link(secret: bytes, key: str, expires_at: int, route: str) -> str:
    validate_key(key)
    if not isinstance(expires_at, int) or isinstance(expires_at, bool) or not 0 < expires_at < 10**12:
        raise ValueError("expires_at must be a Unix time in whole seconds")
    # Keys hold only URL-safe characters; quote() is a second guard, not a transformation.
    return f"{route.rstrip('/')}/{quote(key, safe='/')}?exp={expires_at}&sig={_signature(secret, key, expires_at)}"


def check_link(secret: bytes, key: object, exp: object, sig: object, now: float) -> LinkStatus:
    """OK, EXPIRED or INVALID; never raises for hostile input. The signature is checked first
    (constant time), so an expiry is only reported for a link this service really issued."""
    try:
        validate_key(key)
    except InvalidKeyError:
        return LinkStatus.INVALID
    if isinstance(exp, int) and not isinstance(exp, bool):
        exp = str(exp)
    if not isinstance(exp, str) or not _EXP_RE.fullmatch(exp) or not isinstance(sig, str) or not _SIG_RE.fullmatch(sig):
        return LinkStatus.INVALID
    expected = _signature(secret, key, int(exp))
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return LinkStatus.INVALID
    if now >= int(exp):
        return LinkStatus.EXPIRED
    return LinkStatus.OK

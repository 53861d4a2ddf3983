"""Builder's own enrollment signing in tests: a key, the pins of a release, a signed enrollment."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from builder.enrollment import Enrollment
from builder.signing.enrollment_key import FileEnrollmentKey
from builder.trust import SignedEnrollment, Trust

HOSTS = ("console.example.com",)


def new_key() -> FileEnrollmentKey:
    return FileEnrollmentKey.from_private_key(ec.generate_private_key(ec.SECP256R1()))


# One key per test process: what a release of the suite pins unless a test says otherwise.
KEY = new_key()


def trust_of(*keys: FileEnrollmentKey, hosts=HOSTS) -> Trust:
    return Trust(tuple(k.pin for k in (keys or (KEY,))), tuple(hosts))


def signed(enrollment: Enrollment, key: FileEnrollmentKey = KEY, trust: Trust | None = None, **kw) -> SignedEnrollment:
    """`enrollment` signed as `builder stamp` signs it, for a release pinned to `trust`."""
    return key.sign(enrollment, trust or trust_of(key, hosts=HOSTS + (_host_of(enrollment.console_url),)), **kw)


def _host_of(url: str) -> str:
    authority = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return authority

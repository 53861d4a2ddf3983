"""What an agent trusts, and the signed enrollments it accepts: pure code, no I/O.

A slot, an msiexec property, a dmg sidecar and a config file are bytes no code-signing
signature covers. So an enrollment is a JWS (RFC 7515 compact serialization, ES256) signed by an
enrollment key, and the installer's own signature covers the pins: the public keys it accepts
and the console hosts it may talk to (`trust.json`, installed beside the agent). This module is
the one place builder checks both, with exactly the rules the agents apply (payload/README.md),
so that `builder verify` says what an agent would do with the same bytes.

Why JWS and not a format of our own: the header, payload and r||s signature are what Windows
CNG (BCryptVerifySignature over SHA-256, P-256) and `cryptography` verify as they are; the
string is base64url and dots only, so it passes unescaped through an msiexec command line, a
registry value, an NSIS string, a shell word and JSON; any JOSE library can read it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from builder.enrollment import Enrollment, Secret
from builder.errors import ConfigError, EnrollmentError

TRUST_FILE = "trust.json"
TRUST_VERSION = 1
JWS_TYPE = "enrollment+jws"
MAX_JWS_CHARS = 16384
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_PATTERN_RE = re.compile(rf"(\*\.)?({_LABEL}(?:\.{_LABEL})*)(?::([0-9]{{1,5}}))?")
_IP_LIKE_RE = re.compile(r"[0-9.]+")


# ---------------------------------------------------------------------------------------------
# base64url and keys


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise EnrollmentError(f"the signed enrollment's {what} is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise EnrollmentError(f"the signed enrollment's {what} is not base64url") from None


@dataclass(frozen=True)
class PinnedKey:
    """A P-256 public key as a JWK, with its RFC 7638 thumbprint as key id."""

    x: str
    y: str

    @classmethod
    def from_public_key(cls, key) -> "PinnedKey":
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("an enrollment key must be an EC P-256 (secp256r1) key",
                              "make one with `builder dev-keys` or `openssl ecparam -name prime256v1 -genkey`")
        nums = key.public_numbers()
        return cls(b64encode(nums.x.to_bytes(32, "big")), b64encode(nums.y.to_bytes(32, "big")))

    @property
    def kid(self) -> str:
        canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": self.x, "y": self.y},
                               separators=(",", ":"), sort_keys=True)
        return b64encode(hashlib.sha256(canonical.encode()).digest())

    def jwk(self) -> dict:
        return {"crv": "P-256", "kid": self.kid, "kty": "EC", "x": self.x, "y": self.y}

    def pem(self) -> str:
        return self.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode().strip()

    def public_key(self) -> ec.EllipticCurvePublicKey:
        x = int.from_bytes(b64decode(self.x, "key x"), "big")
        y = int.from_bytes(b64decode(self.y, "key y"), "big")
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


# ---------------------------------------------------------------------------------------------
# Console host patterns and URLs


def normalise_host_pattern(pattern: str) -> str:
    """`host`, `*.domain` or either with `:port`, lower-cased; refused when it could match an
    IP literal, carries a path, userinfo or anything but DNS labels."""
    value = pattern.strip().lower() if isinstance(pattern, str) else ""
    match = _HOST_PATTERN_RE.fullmatch(value)
    if not match or _IP_LIKE_RE.fullmatch(match.group(2)) or (match.group(3) and not 0 < int(match.group(3)) < 65536):
        raise ConfigError(f"console host {pattern!r} is not a host name, *.domain or either with :port",
                          "for example --console-host console.example.com --console-host '*.example.net:8443'")
    return value


def console_url_problem(url: str, patterns) -> str | None:
    """Why an agent pinned to `patterns` would refuse `url`, or None when it may talk to it.

    The agents' rule (payload/README.md): https, no userinfo, no IP literal, no percent-escape
    in the authority; the host equal to a pattern or under a `*.` pattern's domain; the port
    the pattern names, else none or 443.
    """
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        return "it has whitespace, a control character or a backslash"
    if url[:8].lower() != "https://":
        return "it is not https"
    rest = url[8:]
    end = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])
    authority = rest[:end]
    if "@" in authority:
        return "it carries user information (user@ or user:password@)"
    if "%" in authority or "[" in authority:
        return "its host is percent-encoded or an IP literal"
    host, sep, port_text = authority.partition(":")
    port = None
    if sep:
        if not port_text.isdigit() or not port_text.isascii() or not 0 < int(port_text) < 65536:
            return "its port is not a number from 1 to 65535"
        port = int(port_text)
    host = host.lower()
    if not host or _IP_LIKE_RE.fullmatch(host):
        return "its host is empty or an IP address"
    for pattern in patterns:
        p_host, _, p_port = pattern.partition(":")
        if p_host.startswith("*."):
            host_ok = host.endswith(p_host[1:]) and len(host) > len(p_host) - 1
        else:
            host_ok = host == p_host
        port_ok = port == int(p_port) if p_port else port in (None, 443)
        if host_ok and port_ok:
            return None
    return f"its host {authority} is not among the pinned console hosts ({', '.join(patterns)})"


# ---------------------------------------------------------------------------------------------
# The trust file


@dataclass(frozen=True)
class Trust:
    """The pins a release puts in signed bytes: enrollment public keys and console hosts."""

    keys: tuple[PinnedKey, ...]
    console_hosts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("no enrollment public key is pinned",
                              "give --enrollment-key or --enrollment-public-key (see `builder dev-keys`)")
        if not self.console_hosts:
            raise ConfigError("no console host is pinned", "set product.console_hosts or give --console-host")
        object.__setattr__(self, "keys", tuple(dict.fromkeys(self.keys)))
        object.__setattr__(self, "console_hosts",
                           tuple(dict.fromkeys(normalise_host_pattern(h) for h in self.console_hosts)))

    def key(self, kid: str) -> PinnedKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    @property
    def kids(self) -> list[str]:
        return [k.kid for k in self.keys]

    def to_json_bytes(self) -> bytes:
        doc = {"console_hosts": list(self.console_hosts), "keys": [k.jwk() for k in self.keys],
               "version": TRUST_VERSION}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def as_dict(self) -> dict:
        return {"console_hosts": list(self.console_hosts), "key_ids": self.kids}

    @classmethod
    def from_json_bytes(cls, data: bytes, source: str) -> "Trust":
        try:
            doc = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
            if not isinstance(doc, dict) or doc.get("version") != TRUST_VERSION:
                raise ValueError("version")
            keys = []
            for jwk in doc["keys"]:
                if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
                    raise ValueError("key type")
                key = PinnedKey(jwk["x"], jwk["y"])
                if len(b64decode(key.x, "x")) != 32 or len(b64decode(key.y, "y")) != 32:
                    raise ValueError("key size")
                key.public_key()  # a point on the curve
                keys.append(key)
            hosts = doc["console_hosts"]
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ValueError("hosts")
            return cls(tuple(keys), tuple(hosts))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, EnrollmentError, ConfigError) as exc:
            raise ConfigError(f"{source}: the trust file is malformed ({type(exc).__name__})",
                              "rebuild the installer") from None


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("a JSON key appears twice")
    return dict(pairs)


# ---------------------------------------------------------------------------------------------
# Signed enrollments


@dataclass(frozen=True)
class SignedEnrollment:
    """An enrollment with its ES256 signature. `jws` holds the token: it is a Secret."""

    enrollment: Enrollment
    key_id: str
    issued_at: int
    expires_at: int | None
    jws: Secret

    # The fields callers read off an enrollment, so a signed one goes where a plain one went.
    account_id = property(lambda self: self.enrollment.account_id)
    group_id = property(lambda self: self.enrollment.group_id)
    console_url = property(lambda self: self.enrollment.console_url)
    token = property(lambda self: self.enrollment.token)

    def public(self) -> dict:
        return {**self.enrollment.public(), "key_id": self.key_id, "issued_at": self.issued_at,
                "expires_at": self.expires_at}


def signing_input(enrollment: Enrollment, kid: str, issued_at: int, expires_at: int | None) -> bytes:
    header = {"alg": "ES256", "kid": kid, "typ": JWS_TYPE}
    payload = {"account_id": enrollment.account_id, "group_id": enrollment.group_id,
               "console_url": enrollment.console_url, "enrollment_token": enrollment.token.reveal(),
               "key_id": kid, "issued_at": int(issued_at)}
    if expires_at is not None:
        payload["expires_at"] = int(expires_at)
    parts = (json.dumps(header, separators=(",", ":")).encode(),
             json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode())
    return ".".join(b64encode(p) for p in parts).encode("ascii")


def assemble(signing_input_bytes: bytes, signature: bytes) -> Secret:
    if len(signature) != 64:
        raise EnrollmentError(f"an ES256 signature is 64 bytes (r||s), got {len(signature)}")
    return Secret(signing_input_bytes.decode("ascii") + "." + b64encode(signature))


def _field(doc: dict, name: str, kind: type, optional: bool = False):
    value = doc.get(name)
    if value is None and optional and name not in doc:
        return None
    if kind is int:
        if type(value) is not int:
            raise EnrollmentError(f"the signed enrollment's {name} is not a whole number")
    elif not isinstance(value, str) or not value or "\0" in value:
        raise EnrollmentError(f"the signed enrollment's {name} is missing, empty or not a string")
    return value


class EnrollmentRefused(EnrollmentError):
    """A signed enrollment an agent would refuse. `reason` names which check failed, as the
    agents' exit codes do: malformed, untrusted, expired, host."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, "issue the enrollment again with a pinned key and an allowed console",
                         field="console_url" if reason == "host" else None)
        self.reason = reason


def verify(jws: str, trust: Trust, now: int) -> SignedEnrollment:
    """The enrollment in `jws`, when an agent pinned to `trust` would accept it at time `now`.

    Raises EnrollmentRefused, checking in the agents' order: syntax, key and signature, expiry,
    console host. The message never holds the token.
    """
    try:
        if not isinstance(jws, str) or len(jws) > MAX_JWS_CHARS:
            raise EnrollmentError(f"the signed enrollment is longer than {MAX_JWS_CHARS} characters")
        parts = jws.split(".")
        if len(parts) != 3:
            raise EnrollmentError("the signed enrollment is not three base64url parts joined by dots")
        header = _json_object(b64decode(parts[0], "header"), "header")
        payload = _json_object(b64decode(parts[1], "payload"), "payload")
        signature = b64decode(parts[2], "signature")
        if set(header) != {"alg", "kid", "typ"} or header["alg"] != "ES256" or header["typ"] != JWS_TYPE:
            raise EnrollmentError("the signed enrollment's header is not exactly alg ES256, kid and typ " + JWS_TYPE)
        kid = _field(header, "kid", str)
        fields = {name: _field(payload, name, str) for name in
                  ("account_id", "group_id", "console_url", "enrollment_token", "key_id")}
        issued_at = _field(payload, "issued_at", int)
        expires_at = _field(payload, "expires_at", int, optional=True)
    except EnrollmentError as exc:
        raise EnrollmentRefused("malformed", exc.message) from None

    key = trust.key(kid)
    if key is None:
        raise EnrollmentRefused("untrusted", f"the enrollment is signed by key {kid}, which is not pinned "
                                             f"(pinned: {', '.join(trust.kids)})")
    if len(signature) != 64:
        raise EnrollmentRefused("untrusted", "the enrollment's signature is not 64 bytes (r||s)")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.public_key().verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EnrollmentRefused("untrusted", f"the enrollment's signature does not verify with pinned key {kid}") from None
    if fields["key_id"] != kid:
        raise EnrollmentRefused("untrusted", "the enrollment's key_id differs from the key that signed it")
    if expires_at is not None and now >= expires_at:
        raise EnrollmentRefused("expired", f"the enrollment expired at {expires_at} (Unix time)")
    problem = console_url_problem(fields["console_url"], trust.console_hosts)
    if problem:
        raise EnrollmentRefused("host", f"the enrollment's console_url is not allowed: {problem}")
    try:
        enrollment = Enrollment(account_id=fields["account_id"], group_id=fields["group_id"],
                                token=Secret(fields["enrollment_token"]), console_url=fields["console_url"])
    except EnrollmentError as exc:
        raise EnrollmentRefused("malformed", exc.message) from None
    return SignedEnrollment(enrollment, kid, issued_at, expires_at, Secret(jws))


def _json_object(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError):
        raise EnrollmentError(f"the signed enrollment's {what} is not a JSON object") from None
    if not isinstance(doc, dict):
        raise EnrollmentError(f"the signed enrollment's {what} is not a JSON object")
    return doc


STATES = {"malformed": "invalid", "untrusted": "invalid", "expired": "expired", "host": "host not allowed"}


def describe(jws: str, trust: Trust | None, now: int) -> tuple[dict, str | None]:
    """What `verify`/`inspect` show of a stamped enrollment, and the problem when an agent
    would refuse it: (report, problem or None). The report never holds the token."""
    if trust is None:
        return {"state": "invalid"}, "the installer carries no trust.json: its agent would refuse every enrollment"
    if not jws.startswith("eyJ"):
        # Not a JWS at all (an older release's plain JSON, or anything else): nothing signed it.
        return {"state": "unsigned"}, "the stamped enrollment is not signed: agents refuse it"
    try:
        signed = verify(jws, trust, now)
    except EnrollmentRefused as exc:
        return {"state": STATES[exc.reason], "reason": exc.message}, f"the stamped enrollment is refused: {exc.message}"
    return {"state": "valid", **signed.public()}, None

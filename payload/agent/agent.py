"""The reference agent: what a real product ships, frozen per platform by PyInstaller (agent.spec).

It implements the signed-enrollment contract (/work/spec/signed-enrollment.md, issue 8):

    agent enroll-from-installer --installer PATH [--registry-key KEY] --config PATH
    agent enroll-from-registry  --registry-key KEY --config PATH          (Windows)
    agent enroll-from-file      --file PATH [--registry-key KEY] --config PATH
    agent verify-enrollment     --file PATH
    agent service               [--registry-key KEY] --config PATH [--ca-bundle PEM] [--retry-max S]
    agent run                   --config PATH [--ca-bundle PEM]
    agent forget                [--registry-key KEY] --config PATH
    agent --version

Every enrollment it accepts is a JWS (ES256) signed by a key pinned in `trust.json` beside the
agent's executable, names a console host that file allows, and has not expired; anything else is
refused with one line `agent: ...`, a distinct exit code, and nothing written. The installer slot
is read from exactly one place in the Authenticode signature, never found by searching.

Standard library, plus `cryptography` (bundled by agent.spec) for the ECDSA check; on Windows,
when it is missing, Windows CNG (bcrypt.dll) through ctypes does that one check instead.
`--registry-key` is required on Windows and refused elsewhere (there is no registry there).
No secret is ever taken from the command line or printed: the token goes from a verified
enrollment to the config file, and from there into one `Authorization: Bearer` header over
verified TLS.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import mmap
import os
import random
import signal
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:  # written by agent.spec when AGENT_VERSION is set at build time
    from _agent_version import VERSION  # type: ignore[import-not-found]
except ImportError:
    VERSION = "1.0.0"

IS_WINDOWS = sys.platform == "win32"

# Assembled at run time: CPython folds `b"ENRS" + b"LOT1"` into one constant, and the frozen
# agent is embedded in the installers, where a literal copy could be mistaken for the slot.
SLOT_MAGIC = b"".join((b"ENRS", b"LOT1"))
SLOT_HEADER = len(SLOT_MAGIC) + 4  # magic + uint32 little-endian SE length
# DER of OID 1.3.6.1.4.1.32473.1.1, the slot attribute's type (builder/binfmt/pkcs7.py).
SLOT_OID_DER = bytes.fromhex("060A2B0601040181FD590101")
SIGNED_DATA_OID_DER = bytes.fromhex("06092A864886F70D010702")  # 1.2.840.113549.1.7.2
SIGNATURE_STREAM = "\x05DigitalSignature"
MAX_SIGNATURE_BYTES = 1 << 20  # a release's PKCS#7 is a few KiB; anything near this is not one

MAX_SE_CHARS = 16384
MAX_CONFIG_BYTES = MAX_SE_CHARS + 64
MAX_TRUST_BYTES = 1 << 20
SE_HEADER_KEYS = frozenset({"alg", "kid", "typ"})
SE_STRINGS = ("account_id", "group_id", "console_url", "enrollment_token")
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_INT64 = range(-(1 << 63), 1 << 63)

ENROLLMENT_VALUE = "Enrollment"  # REG_SZ: the verified SE, written by the agent
PENDING_VALUE = "PendingEnrollment"  # REG_SZ: the unverified SE, written by the installer

ENROLL_PATH = "/api/v1/enroll"
CONSOLE_CA_FILE = "console-ca.pem"  # optional, beside trust.json: see installed_ca_bundle()
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
FORGET_WAIT_SECONDS = 30.0


# ------------------------------------------------------------------------------------- errors


class AgentError(Exception):
    """Base class; `exit_code` is the process exit code. Messages never contain the token."""

    exit_code = 1


class UsageError(AgentError):
    exit_code = 2


class RegistryValueMissing(AgentError):
    exit_code = 3


class WriteFailed(AgentError):
    exit_code = 4


class NoEnrollment(AgentError):
    exit_code = 5


class MalformedEnrollment(AgentError):
    exit_code = 6


class InstallerUnreadable(AgentError):
    exit_code = 7


class EnrollmentRefused(AgentError):
    """The console answered with a final refusal (401, 403, 404, a redirect...)."""

    exit_code = 8


class ConsoleUnreachable(AgentError):
    """No usable answer after every attempt, or the console's certificate is not trusted."""

    exit_code = 9


class NotPinned(AgentError):
    """Unknown kid, a signature that does not verify, or key_id != kid."""

    exit_code = 10


class Expired(AgentError):
    exit_code = 11


class ConsoleNotAllowed(AgentError):
    exit_code = 12


class TrustUnusable(AgentError):
    exit_code = 13


class SignatureStructure(AgentError):
    """The installer's signature is not one slot in one PKCS#7, as a release writes it."""

    exit_code = 14


# ------------------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class HostPattern:
    """`host`, `*.host`, either with `:PORT`. A pattern that is none of these (a bad port) is
    kept and matches nothing, as in the C agent: only builder writes trust files."""

    host: str  # ASCII lower case; for a wildcard, with its leading "." (".example.com")
    wildcard: bool
    port: int | None  # None: the URL must have no port or 443
    valid: bool = True

    @classmethod
    def parse(cls, pattern: str) -> HostPattern:
        host, colon, port_text = _ascii_lower(pattern).partition(":")
        port = _port(port_text) if colon else None
        wildcard = len(host) > 2 and host.startswith("*.")
        return cls(host[1:] if wildcard else host, wildcard, port, valid=not colon or port is not None)

    def matches(self, host: str, port: int | None) -> bool:
        """`host` is ASCII-lowered; `port` is None when the URL names none."""
        if not self.valid:
            return False
        if self.port is not None and port != self.port:  # the URL must name that exact port
            return False
        if self.port is None and port not in (None, 443):
            return False
        if self.wildcard:  # at least one label must come before the suffix
            return len(host) > len(self.host) and host.endswith(self.host)
        return host == self.host


@dataclass(frozen=True)
class Trust:
    keys: dict[str, tuple[bytes, bytes]]  # kid -> (x, y), 32 bytes each
    hosts: tuple[HostPattern, ...]


def trust_path() -> Path:
    """trust.json beside the agent's own executable; deliberately no option to move it, since
    only the installer's signed bytes may say which keys and hosts the agent trusts."""
    if getattr(sys, "frozen", False):
        here = Path(os.path.dirname(os.path.abspath(sys.executable)))
    else:
        here = Path(os.path.dirname(os.path.abspath(__file__)))
    # Inside a macOS bundle (X.app/Contents/MacOS/agent) the pins lie beside X.app: writing into
    # the bundle would break its code signature's seal.
    if here.name == "MacOS" and here.parent.name == "Contents" and here.parent.parent.suffix == ".app":
        here = here.parent.parent.parent
    return here / "trust.json"


def installed_ca_bundle() -> str | None:
    """console-ca.pem beside trust.json, when the installer put one there (a payload file, so
    inside the installer's signature): the CAs of a console on a private PKI, used instead of
    the system store. None (the system store) when there is none."""
    path = trust_path().with_name(CONSOLE_CA_FILE)
    return str(path) if path.is_file() else None


def _ascii_lower(text: str) -> str:
    # Host names compare ASCII case-insensitively; str.lower() would also fold non-ASCII
    # letters, which the C agent does not.
    return text.translate(_LOWER)


_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _port(text: str) -> int | None:
    """A port of one to five ASCII digits in 1..65535, or None."""
    if not 1 <= len(text) <= 5 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if 1 <= value <= 65535 else None


def _trust_key(key: object) -> tuple[str, bytes, bytes]:
    if not isinstance(key, dict) or key.get("kty") != "EC" or key.get("crv") != "P-256":
        raise ValueError("a key is not an EC P-256 JWK")
    kid = key.get("kid")
    if not _valid_text(kid):
        raise ValueError("a key has no kid")
    coords = []
    for name in ("x", "y"):
        value = key.get(name)
        raw = _b64url_decode(value) if isinstance(value, str) else None
        if raw is None or len(raw) != 32:
            raise ValueError(f"key {kid}: {name} is not 32 bytes of base64url")
        coords.append(raw)
    # Not checked for being on the curve here: like CNG in the C agent, the verifier refuses
    # such a key, so SEs under it are "not signed by a pinned key" while the other pins work.
    return kid, coords[0], coords[1]


def load_trust(path: Path | None = None) -> Trust:
    path = trust_path() if path is None else path
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TRUST_BYTES + 1)
    except OSError as err:
        raise TrustUnusable(f"cannot read the trust file {path}: {err.strerror}") from None
    try:
        if len(data) > MAX_TRUST_BYTES:
            raise ValueError("it is too large")
        obj = _json_object(data)
        version = obj.get("version")
        if type(version) is not int or version != 1:
            raise ValueError("its version is not 1")
        keys, hosts = obj.get("keys"), obj.get("console_hosts")
        if not isinstance(keys, list) or not keys:
            raise ValueError("it pins no keys")
        if not isinstance(hosts, list) or not hosts:
            raise ValueError("it allows no console hosts")
        pinned: dict[str, tuple[bytes, bytes]] = {}
        for key in keys:
            kid, x, y = _trust_key(key)
            pinned.setdefault(kid, (x, y))  # a kid pinned twice: the first wins, as in the C agent
        if not all(_valid_text(p) for p in hosts):
            raise ValueError("a console host is not a non-empty string")
        patterns = tuple(HostPattern.parse(p) for p in hosts)
    except ValueError as err:
        raise TrustUnusable(f"the trust file {path} is malformed: {err}") from None
    return Trust(pinned, patterns)


# ------------------------------------------------------------------------------------- SE


@dataclass(frozen=True)
class Enrollment:
    """A signed enrollment that passed every check; only these are ever used."""

    account_id: str
    group_id: str
    console_url: str
    key_id: str
    issued_at: int
    expires_at: int | None
    enrollment_token: str = field(repr=False)
    se: str = field(repr=False)  # the verified SE itself, exactly as received

    def public(self) -> dict[str, object]:
        """What may be shown or logged: everything but the token, plus its SHA-256."""
        return {
            "account_id": self.account_id,
            "group_id": self.group_id,
            "console_url": self.console_url,
            "key_id": self.key_id,
            "token_sha256": hashlib.sha256(self.enrollment_token.encode()).hexdigest(),
        }


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("a key appears twice")
        obj[key] = value
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # Python's json would accept NaN and Infinity


def _json_object(data: bytes) -> dict[str, object]:
    """A strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity; ValueError otherwise."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError quotes positions only, never input
        raise ValueError(str(err).split(":")[0]) from None
    if not isinstance(obj, dict):
        raise ValueError("it is not a JSON object")
    try:  # a lone surrogate ("\ud800") anywhere, keys and ignored members included
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("it holds a lone UTF-16 surrogate") from None
    return obj


def _b64url_decode(part: str) -> bytes | None:
    """Unpadded base64url in its one canonical spelling, or None.

    Non-canonical spellings (nonzero unused bits in the last character) are refused so that
    exactly one string stands for each signature and each JSON text.
    """
    if not part or len(part) % 4 == 1 or not _B64URL.issuperset(part):
        return None
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == part else None


def _valid_text(value: object) -> bool:
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from "\ud800" in JSON
        return False
    return True


def _int64(value: object) -> bool:
    return type(value) is int and value in _INT64  # bool is an int subclass: not a number here


def check_console_url(url: str, trust: Trust) -> None:
    """The console URL is https:// to a pinned host (spec section 3, check 5)."""
    refused = ConsoleNotAllowed("console host not allowed by the trust file")
    # Space and control characters are the ASCII ones (<= 0x20, 0x7F), as the C agent counts them.
    if any(c == "\\" or ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise refused
    if _ascii_lower(url[:8]) != "https://":
        raise refused
    rest = url[8:]
    authority = rest[:min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))]
    if any(c in authority for c in "@%["):
        raise refused
    host, colon, port_text = authority.partition(":")
    port = _port(port_text) if colon else None
    if (colon and port is None) or not host or all(c in "0123456789." for c in host):
        raise refused
    host = _ascii_lower(host)
    if not any(p.matches(host, port) for p in trust.hosts):
        raise refused


def _verify_es256(x: bytes, y: bytes, signing_input: bytes, signature: bytes) -> bool:
    """ECDSA P-256 / SHA-256 over `signing_input` with a raw r||s signature.

    `cryptography` where it imports (the host; the Windows build bundles 42.0.8); otherwise, on
    Windows, CNG, which has verified ECDSA P-256 since Vista.
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    except ImportError:
        if IS_WINDOWS:
            return _verify_es256_cng(x, y, hashlib.sha256(signing_input).digest(), signature)
        raise AgentError("cannot verify enrollments: the cryptography package is missing") from None
    numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1())
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        numbers.public_key().verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):  # ValueError: the pinned point is not on the curve
        return False
    return True


def _verify_es256_cng(x: bytes, y: bytes, digest: bytes, signature: bytes) -> bool:
    import ctypes
    from ctypes import wintypes

    BCRYPT_ECDSA_PUBLIC_P256_MAGIC = 0x31534345
    bcrypt = ctypes.WinDLL("bcrypt")
    handle_p = ctypes.POINTER(ctypes.c_void_p)
    bcrypt.BCryptOpenAlgorithmProvider.argtypes = [handle_p, wintypes.LPCWSTR, wintypes.LPCWSTR, wintypes.ULONG]
    bcrypt.BCryptImportKeyPair.argtypes = [ctypes.c_void_p, ctypes.c_void_p, wintypes.LPCWSTR, handle_p,
                                           ctypes.c_char_p, wintypes.ULONG, wintypes.ULONG]
    bcrypt.BCryptVerifySignature.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, wintypes.ULONG,
                                             ctypes.c_char_p, wintypes.ULONG, wintypes.ULONG]
    bcrypt.BCryptDestroyKey.argtypes = [ctypes.c_void_p]
    bcrypt.BCryptCloseAlgorithmProvider.argtypes = [ctypes.c_void_p, wintypes.ULONG]
    for fn in ("BCryptOpenAlgorithmProvider", "BCryptImportKeyPair", "BCryptVerifySignature"):
        getattr(bcrypt, fn).restype = ctypes.c_long  # NTSTATUS

    alg, key = ctypes.c_void_p(), ctypes.c_void_p()
    status = bcrypt.BCryptOpenAlgorithmProvider(ctypes.byref(alg), "ECDSA_P256", None, 0)
    if status:
        raise AgentError(f"cannot verify enrollments: CNG has no ECDSA_P256 (0x{status & 0xFFFFFFFF:08X})")
    try:
        blob = struct.pack("<II", BCRYPT_ECDSA_PUBLIC_P256_MAGIC, 32) + x + y  # BCRYPT_ECCKEY_BLOB, X, Y
        status = bcrypt.BCryptImportKeyPair(alg, None, "ECCPUBLICBLOB", ctypes.byref(key), blob, len(blob), 0)
        if status:  # not a point on P-256: nothing verifies under it
            return False
        try:
            status = bcrypt.BCryptVerifySignature(key, None, digest, len(digest), signature, len(signature), 0)
        finally:
            bcrypt.BCryptDestroyKey(key)
    finally:
        bcrypt.BCryptCloseAlgorithmProvider(alg, 0)
    # 0 verifies; STATUS_INVALID_SIGNATURE (0xC000A000) or any other refusal (an r or s out of
    # range may come back as STATUS_INVALID_PARAMETER) does not.
    return status == 0


def verify_se(raw: bytes | str, trust: Trust, source: str, now: int | None = None) -> Enrollment:
    """Checks 2-5 of the spec, in its order; `source` names the SE's origin in errors."""
    def malformed(why: str) -> MalformedEnrollment:
        return MalformedEnrollment(f"the enrollment in {source} is malformed: {why}")

    if len(raw) > MAX_SE_CHARS:
        raise malformed(f"longer than {MAX_SE_CHARS} characters")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise malformed("a character outside base64url") from None
    parts = raw.split(".")
    if len(parts) != 3:
        raise malformed("not three dot-separated parts")
    decoded = [_b64url_decode(p) for p in parts]
    if any(d is None for d in decoded):
        raise malformed("a part is not unpadded base64url (no '=', whitespace or newline allowed)")
    try:
        header, payload = _json_object(decoded[0]), _json_object(decoded[1])
    except ValueError as err:
        raise malformed(f"header or payload: {err}") from None
    signature = decoded[2]
    if set(header) != SE_HEADER_KEYS:
        raise malformed("the header must hold exactly alg, kid and typ")
    if header["alg"] != "ES256" or header["typ"] != "enrollment+jws":
        raise malformed("the header's alg is not ES256 or its typ is not enrollment+jws")
    kid = header["kid"]
    if not _valid_text(kid):
        raise malformed("the header's kid is not a non-empty string without NUL")
    for name in SE_STRINGS:
        if not _valid_text(payload.get(name)):
            raise malformed(f"{name} is not a non-empty string without NUL")
    if not isinstance(payload.get("key_id"), str):
        raise malformed("key_id is not a string")
    if not _int64(payload.get("issued_at")):
        raise malformed("issued_at is not an integer")
    expires_at = payload.get("expires_at")
    if "expires_at" in payload and not _int64(expires_at):
        raise malformed("expires_at is not an integer")
    if len(signature) != 64:
        raise malformed("the signature is not 64 bytes (r || s)")

    pinned = trust.keys.get(kid)
    signing_input = (parts[0] + "." + parts[1]).encode("ascii")
    if pinned is None or not _verify_es256(*pinned, signing_input, signature) or payload["key_id"] != kid:
        raise NotPinned(f"the enrollment in {source} is not signed by a pinned enrollment key")

    now = int(time.time()) if now is None else now
    if expires_at is not None and not now < expires_at:
        raise Expired(f"the enrollment in {source} has expired")

    check_console_url(payload["console_url"], trust)
    return Enrollment(
        account_id=payload["account_id"], group_id=payload["group_id"], console_url=payload["console_url"],
        key_id=kid, issued_at=payload["issued_at"], expires_at=expires_at,
        enrollment_token=payload["enrollment_token"], se=raw,
    )


# ------------------------------------------------------------------------------------- slot
#
# The SE is read from exactly where builder writes it: the first SignerInfo's one slot
# attribute, in the PKCS#7 of the one WIN_CERTIFICATE (EXE) or of the \x05DigitalSignature
# stream (MSI). Nothing else in the file is looked at: bytes outside the signed structure are
# what anyone can append to a validly signed installer.


def _bad(why: str) -> SignatureStructure:
    return SignatureStructure(f"the installer's signature is not as a release writes it ({why})")


def _tlv(buf, pos: int, limit: int) -> tuple[int, int, int]:
    """(tag, contents offset, end) of the DER element at `pos`, which must end by `limit`."""
    if pos + 2 > limit:
        raise _bad("a DER element is cut short")
    tag = buf[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number: base-128 continuation octets
        while pos < limit and buf[pos] & 0x80:
            pos += 1
        pos += 1
    if pos >= limit:
        raise _bad("a DER element is cut short")
    first = buf[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _bad("an indefinite length, which DER does not allow")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > limit:
            raise _bad("an impossible DER length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    if pos + length > limit:
        raise _bad("a DER element runs past its container")
    return tag, pos, pos + length


def _children(buf, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, start, contents offset, end) of each element filling [start, end) exactly."""
    out = []
    while start < end:
        tag, contents, stop = _tlv(buf, start, end)
        out.append((tag, start, contents, stop))
        start = stop
    return out


def slot_from_pkcs7(der: bytes) -> bytes:
    """The slot's bytes: ContentInfo -> SignedData -> first SignerInfo -> [1] -> the one slot
    attribute -> SET { OCTET STRING }. `der` must be exactly one element."""
    tag, contents, end = _tlv(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise _bad("bytes after the PKCS#7" if tag == 0x30 else "not a PKCS#7 ContentInfo")
    info = _children(der, contents, end)
    if len(info) < 2 or der[info[0][1]:info[0][3]] != SIGNED_DATA_OID_DER or info[1][0] != 0xA0:
        raise _bad("not a PKCS#7 SignedData")
    inner = _children(der, info[1][2], info[1][3])
    if len(inner) != 1 or inner[0][0] != 0x30:
        raise _bad("not a PKCS#7 SignedData")
    fields = _children(der, inner[0][2], inner[0][3])
    if len(fields) < 4 or fields[-1][0] != 0x31:
        raise _bad("SignedData has no SignerInfos")
    signers = _children(der, fields[-1][2], fields[-1][3])
    if not signers or signers[0][0] != 0x30:
        raise _bad("no SignerInfo")
    signer = _children(der, signers[0][2], signers[0][3])
    if len(signer) < 5 or signer[-1][0] != 0xA1:
        raise _bad("no unauthenticated attributes, so no slot")
    slots = []
    for tag, _, contents, stop in _children(der, signer[-1][2], signer[-1][3]):
        if tag != 0x30:
            raise _bad("an unauthenticated attribute is not a SEQUENCE")
        parts = _children(der, contents, stop)
        if parts and der[parts[0][1]:parts[0][3]] == SLOT_OID_DER:
            slots.append(parts)
    if len(slots) != 1:
        raise _bad("no slot attribute" if not slots else "more than one slot attribute")
    parts = slots[0]
    values = _children(der, parts[1][2], parts[1][3]) if len(parts) == 2 and parts[1][0] == 0x31 else []
    if len(values) != 1 or values[0][0] != 0x04:
        raise _bad("the slot attribute is not SET { OCTET STRING }")
    return der[values[0][2]:values[0][3]]


def _exe_pkcs7(data) -> bytes:
    """The PKCS#7 DER of the one WIN_CERTIFICATE of a PE, which must end the file."""
    size = len(data)
    if size < 64:
        raise _bad("not a PE file")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 24 > size or data[pe:pe + 4] != b"PE\0\0":
        raise _bad("not a PE file")
    optional_size = struct.unpack_from("<H", data, pe + 20)[0]
    opt = pe + 24
    magic = struct.unpack_from("<H", data, opt)[0] if opt + 2 <= size else 0
    if magic not in (0x10B, 0x20B):  # PE32, PE32+
        raise _bad("not a PE file")
    count_at, directories = (opt + 92, opt + 96) if magic == 0x10B else (opt + 108, opt + 112)
    entry = directories + 8 * 4  # data directory 4: the certificate table (a file offset)
    if entry + 8 > opt + optional_size or entry + 8 > size or struct.unpack_from("<I", data, count_at)[0] <= 4:
        raise _bad("no certificate table")
    table, table_size = struct.unpack_from("<II", data, entry)
    if table == 0 or table_size < 8:
        raise _bad("the file is not signed")
    if table + table_size != size:
        raise _bad("data after the certificate table, or a table past the end of the file")
    length, revision, cert_type = struct.unpack_from("<IHH", data, table)
    if (revision, cert_type) != (0x0200, 0x0002):  # WIN_CERT_REVISION_2_0, PKCS_SIGNED_DATA
        raise _bad("the certificate is not an Authenticode PKCS#7")
    if length != table_size:  # signing tools count the padding in dwLength, so this is one entry
        raise _bad("not exactly one WIN_CERTIFICATE")
    _, _, der_end = _tlv(data, table + 8, size)
    if size - der_end > 7 or any(data[der_end:size]):
        raise _bad("bytes after the PKCS#7 inside its WIN_CERTIFICATE")
    return bytes(data[table + 8:der_end])


def _cfb_stream(data, wanted: str) -> bytes:
    """The bytes of root stream `wanted` of a compound file ([MS-CFB]), read-only.

    Only what locating one stream needs: the header, the DIFAT/FAT, the directory, the mini
    stream. Every sector number and chain is bounds- and loop-checked.
    """
    size = len(data)
    if size < 512:
        raise _bad("a compound file shorter than its header")
    (_, _, _, major, byte_order, shift, mini_shift, _, _, fat_count, first_dir, _, cutoff,
     first_minifat, _, first_difat, difat_count) = struct.unpack_from("<8s16sHHHHH6sIIIIIIIII", data, 0)
    if byte_order != 0xFFFE or (major, shift) not in ((3, 9), (4, 12)) or mini_shift != 6:
        raise _bad("an unsupported compound file header")
    sector_size, per_sector = 1 << shift, (1 << shift) // 4
    max_sectors = size >> shift

    def offset(sector: int) -> int:
        at = (sector + 1) << shift
        if sector > 0xFFFFFFFA or at + sector_size > size:
            raise _bad("a compound file sector outside the file")
        return at

    if fat_count > max_sectors:
        raise _bad("an impossible FAT size")
    fat = list(struct.unpack_from("<109I", data, 76))
    sector, seen = first_difat, set()
    for _ in range(difat_count):
        if len(fat) >= fat_count:
            break
        if sector in seen:
            raise _bad("a DIFAT chain loops")
        seen.add(sector)
        entries = struct.unpack_from(f"<{per_sector}I", data, offset(sector))
        fat += entries[:-1]
        sector = entries[-1]
    if len(fat) < fat_count:
        raise _bad("the DIFAT lists fewer FAT sectors than the header")
    fat = fat[:fat_count]

    def chain(start: int) -> list[int]:
        out, seen, sector = [], set(), start
        while sector != 0xFFFFFFFE:  # ENDOFCHAIN
            index, slot = divmod(sector, per_sector)
            if sector in seen or index >= len(fat):
                raise _bad("a broken sector chain")
            seen.add(sector)
            out.append(sector)
            sector = struct.unpack_from("<I", data, offset(fat[index]) + 4 * slot)[0]
        return out

    directory = chain(first_dir)
    per_dir = sector_size // 128

    def entry(index: int) -> tuple[str, int, int, int, int, int, int]:
        if index >= len(directory) * per_dir:
            raise _bad("a directory entry that does not exist")
        at = offset(directory[index // per_dir]) + index % per_dir * 128
        raw_name, name_len, kind, _, left, right, child = struct.unpack_from("<64sHBBIII", data, at)
        start, length = struct.unpack_from("<IQ", data, at + 116)
        if major == 3:
            length &= 0xFFFFFFFF  # [MS-CFB]: version 3 writers may leave garbage in the high half
        name = raw_name[:min(max(name_len - 2, 0), 62) & ~1].decode("utf-16-le", "surrogatepass")
        return name, kind, left, right, child, start, length

    root = entry(0)
    if root[1] != 5:
        raise _bad("the compound file has no root entry")
    # Every entry of the root's tree is looked at (not a sorted-tree search), and the name must
    # be there exactly once: two streams of that name would leave "which one" to the reader.
    found, todo, seen = [], [root[4]], set()
    while todo:
        index = todo.pop()
        if index == 0xFFFFFFFF:  # NOSTREAM
            continue
        if index in seen:
            raise _bad("the compound file's directory loops")
        seen.add(index)
        item = entry(index)
        if item[0].upper() == wanted.upper():
            found.append(item)
        todo += (item[2], item[3])
    if len(found) != 1 or found[0][1] != 2:
        raise _bad("no signature stream" if not found else "not exactly one signature stream")
    _, _, _, _, _, start, length = found[0]
    if length > MAX_SIGNATURE_BYTES:
        raise _bad("a signature stream too large to be one")
    if length >= cutoff:
        sectors = chain(start)
        if len(sectors) * sector_size < length:
            raise _bad("a stream longer than its sectors")
        return b"".join(data[offset(s):offset(s) + sector_size] for s in sectors)[:length]
    # A small stream lives in 64-byte mini sectors inside the root entry's stream.
    minifat = b"".join(data[offset(s):offset(s) + sector_size] for s in chain(first_minifat))
    containers = chain(root[5])
    per_container = sector_size // 64
    out, seen, mini = [], set(), start
    for _ in range(-(-length // 64)):
        container, within = divmod(mini, per_container)
        if mini in seen or 4 * mini + 4 > len(minifat) or container >= len(containers):
            raise _bad("a broken mini stream chain")
        seen.add(mini)
        at = offset(containers[container]) + within * 64
        out.append(data[at:at + 64])
        mini = struct.unpack_from("<I", minifat, 4 * mini)[0]
    return b"".join(out)[:length]


def read_installer_se(installer: Path) -> bytes:
    """The SE stamped in a signed EXE or MSI (its ASCII bytes, checked later like any SE)."""
    try:
        f = open(installer, "rb")
    except OSError as err:
        raise InstallerUnreadable(f"cannot read installer {installer}: {err.strerror}") from None
    with f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
        except (OSError, ValueError) as err:  # ValueError: not a regular file
            raise InstallerUnreadable(f"cannot read installer {installer}: {getattr(err, 'strerror', None) or err}") from None
        try:
            if data[:2] == b"MZ":
                der = _exe_pkcs7(data)
            elif data[:8] == bytes.fromhex("D0CF11E0A1B11AE1"):
                der = _cfb_stream(data, SIGNATURE_STREAM)
                _, _, end = _tlv(der, 0, len(der))
                if end != len(der):
                    raise _bad("bytes after the PKCS#7 in the signature stream")
            else:
                raise _bad("neither a PE file nor a compound file")
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    slot = slot_from_pkcs7(der)
    if len(slot) < SLOT_HEADER or slot[:len(SLOT_MAGIC)] != SLOT_MAGIC:
        raise _bad("the slot attribute does not hold a slot")
    (length,) = struct.unpack_from("<I", slot, len(SLOT_MAGIC))
    if length == 0:
        raise NoEnrollment(f"installer {installer} carries no enrollment (empty slot)")
    if SLOT_HEADER + length > len(slot):
        raise _bad("the slot's length runs past the slot")
    return bytes(slot[SLOT_HEADER:SLOT_HEADER + length])


# ------------------------------------------------------------------------------------- files


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replaces `path` with `data`; mode 0600 on POSIX whatever the umask.

    On Windows the file inherits the ACL of its folder (ProgramData\\Vendor, which the installer
    creates for SYSTEM and Administrators); the C test agent shows how to set one explicitly.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            if not IS_WINDOWS:
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteFailed(f"cannot write {path}: {err.strerror}") from None


def render_config(e: Enrollment) -> bytes:
    """The config file's exact bytes; the C test agent writes the same for the same SE."""
    return json.dumps({"enrollment": e.se}).encode("ascii")


def read_limited(path: Path, limit: int) -> bytes:
    """Up to limit + 1 bytes (so that "too long" can be told); OSError passes through."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def load_config(path: Path, trust: Trust) -> Enrollment:
    """The config's SE, verified again: the file may have been edited since it was written."""
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise NoEnrollment(f"no config {path}: the agent is not enrolled") from None
    except OSError as err:
        raise MalformedEnrollment(f"cannot read config {path}: {err.strerror}") from None
    try:
        obj = _json_object(data) if len(data) <= MAX_CONFIG_BYTES else None
    except ValueError:
        obj = None
    se = obj.get("enrollment") if obj is not None and set(obj) == {"enrollment"} else None
    # Exactly the bytes an agent writes, so that a config is one SE and nothing else.
    if not isinstance(se, str) or data != json.dumps({"enrollment": se}).encode("utf-8"):
        raise MalformedEnrollment(f"config {path} is not {{\"enrollment\": \"<signed enrollment>\"}}")
    return verify_se(se, trust, f"config {path}")


def write_status(config: Path, state: str, e: Enrollment | None, *, create: bool = True, **extra: object) -> None:
    """status.json beside the config: what the agent is doing, never the token. With
    create=False nothing is written when the folder is gone (after `forget`)."""
    if not create and not config.parent.is_dir():
        return
    obj: dict[str, object] = {"state": state}
    if e is not None:
        obj.update(e.public())
    obj.update(extra)
    write_private_file(config.parent / "status.json", json.dumps(obj, ensure_ascii=False).encode())


# ------------------------------------------------------------------------------------- registry


def _hklm(key: str, access: int):  # noqa: ANN202
    import winreg

    return winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key, 0, access | winreg.KEY_WOW64_64KEY)


def registry_get(key: str, name: str) -> str:
    import winreg

    try:
        with _hklm(key, winreg.KEY_READ) as handle:
            value, kind = winreg.QueryValueEx(handle, name)
    except OSError:
        value, kind = None, None
    if kind != winreg.REG_SZ or not value or len(value) > MAX_SE_CHARS:
        raise RegistryValueMissing(f"registry value {name} is missing, empty, too long or not a REG_SZ "
                                   f"under HKLM\\{key}")
    return value


def registry_set(key: str, name: str, value: str) -> None:
    import winreg

    try:
        with winreg.CreateKeyEx(winreg.HKEY_LOCAL_MACHINE, key, 0, winreg.KEY_SET_VALUE | winreg.KEY_WOW64_64KEY) as h:
            winreg.SetValueEx(h, name, 0, winreg.REG_SZ, value)
    except OSError as err:
        raise WriteFailed(f"cannot write registry value {name} under HKLM\\{key}: {err.strerror}") from None


def registry_delete(key: str, *names: str) -> None:
    """Deletes values; a value or key already gone is fine."""
    import winreg

    try:
        handle = _hklm(key, winreg.KEY_SET_VALUE)
    except FileNotFoundError:
        return
    except OSError as err:
        raise WriteFailed(f"cannot open HKLM\\{key} to delete values: {err.strerror}") from None
    with handle:
        for name in names:
            try:
                winreg.DeleteValue(handle, name)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise WriteFailed(f"cannot delete registry value {name} under HKLM\\{key}: {err.strerror}") from None


def store(e: Enrollment, registry_key: str | None, config: Path) -> None:
    """A verified enrollment: the config file first, then (Windows) its registry copy."""
    write_private_file(config, render_config(e))
    if registry_key is not None:
        registry_set(registry_key, ENROLLMENT_VALUE, e.se)


def enroll_from_registry(registry_key: str, config: Path) -> None:
    """PendingEnrollment -> verify -> store. The pending value is deleted whatever happens:
    it is unverified input, and an old one must never be picked up by a later run."""
    with pending_deleted(registry_key):
        se = registry_get(registry_key, PENDING_VALUE)
        store(verify_se(se, load_trust(), f"registry value {PENDING_VALUE}"), registry_key, config)


def enroll_from_installer(installer: Path, registry_key: str | None, config: Path) -> None:
    """The installer's slot -> verify -> store. A release MSI stages an empty PendingEnrollment
    (it has no ENROLLMENT property): deleted whatever happens, as enroll-from-registry does."""
    with pending_deleted(registry_key):
        data = read_installer_se(installer)
        store(verify_se(data, load_trust(), str(installer)), registry_key, config)


@contextlib.contextmanager
def pending_deleted(registry_key: str | None) -> Iterator[None]:
    """Deletes PendingEnrollment after the body, whether it failed or not; a failure to delete
    is reported only when the body succeeded (otherwise the first failure is the one to report)."""
    done = False
    try:
        yield
        done = True
    finally:
        if registry_key is not None:
            try:
                registry_delete(registry_key, PENDING_VALUE)
            except WriteFailed:
                if done:
                    raise


# ------------------------------------------------------------------------------------- console


@dataclass(frozen=True)
class ConsoleOptions:
    ca_bundle: str | None = None  # None: the system's trust store
    attempts: int = 6
    backoff: float = 2.0  # seconds before the 2nd attempt, doubled each time, jittered
    max_backoff: float = 60.0
    timeout: float = 30.0
    retry_max: float = 300.0  # service: the longest wait between enrollment rounds


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


def enroll_url(console_url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(console_url)
        parts.port  # noqa: B018 (raises ValueError for a port urllib cannot use)
    except ValueError:  # e.g. a non-ASCII host that NFKC-normalises to a delimiter
        raise MalformedEnrollment("console_url is not a URL urllib can use") from None
    if parts.scheme != "https" or not parts.hostname:
        raise MalformedEnrollment("console_url must be an https:// URL with a host")
    return urllib.parse.urlunsplit(
        ("https", parts.netloc, parts.path.rstrip("/") + ENROLL_PATH, parts.query, "")
    )


def enroll(
    e: Enrollment,
    opts: ConsoleOptions,
    *,
    sleep: Callable[[float], object] = time.sleep,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, object]:
    """POSTs the account and group with the token as a bearer; returns the console's JSON answer.

    `e` is a verified enrollment, so console_url is a pinned host. Retries connection failures,
    timeouts and 408/425/429/5xx with jittered exponential backoff; any other HTTP status is
    final. Redirects are not followed (the bearer would go along).
    """
    url = enroll_url(e.console_url)
    try:
        context = ssl.create_default_context(cafile=opts.ca_bundle)  # verifies chain and host name
    except (OSError, ssl.SSLError) as err:  # the service retries: the bundle may be put back
        raise ConsoleUnreachable(f"cannot load the CA bundle {opts.ca_bundle}: {err}") from None
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())
    body = json.dumps({"account_id": e.account_id, "group_id": e.group_id}).encode()
    headers = {
        "Authorization": f"Bearer {e.enrollment_token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"example-agent/{VERSION}",
    }
    last = "no attempt made"
    for attempt in range(1, opts.attempts + 1):
        if stopping():
            raise ConsoleUnreachable("stopped before enrollment completed")
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=opts.timeout) as response:
                raw = response.read(MAX_CONFIG_BYTES)
            try:
                answer = json.loads(raw) if raw.strip() else {}
            except ValueError:
                answer = {}
            return answer if isinstance(answer, dict) else {}
        except urllib.error.HTTPError as err:
            err.close()
            if err.code not in RETRYABLE_HTTP:
                raise EnrollmentRefused(f"console refused enrollment: HTTP {err.code}") from None
            last = f"HTTP {err.code}"
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise ConsoleUnreachable(
                    f"console certificate not trusted ({err.reason.verify_message}); "
                    "pass --ca-bundle if it uses a private CA"
                ) from None
            last = f"{type(err.reason).__name__}: {err.reason}"
        # OSError: reset, timeout, TLS alert mid-stream; HTTPException: a garbled answer
        # (BadStatusLine, IncompleteRead), which urllib does not wrap;
        # UnicodeError: a host name IDNA cannot encode.
        except (OSError, http.client.HTTPException, UnicodeError) as err:
            last = type(err).__name__
        if attempt < opts.attempts:
            delay = min(opts.max_backoff, opts.backoff * 2 ** (attempt - 1))
            sleep(delay * random.uniform(0.5, 1.0))
    raise ConsoleUnreachable(f"console unreachable after {opts.attempts} attempts; last error: {last}")


def round_delay(failures: int, opts: ConsoleOptions) -> float:
    """The service's wait after `failures` failed rounds in a row: doubling from --backoff
    (at least 0.1 s, so that it never spins), capped at retry_max, jittered so that a fleet
    refused at once does not come back at once."""
    base = max(opts.backoff, 0.1)
    return min(opts.retry_max, base * 2 ** min(failures - 1, 32)) * random.uniform(0.5, 1.0)


def _note(config: Path, state: str, e: Enrollment, **extra: object) -> None:
    """A status update that must not take the service down (a full disk heals; a dead service
    does not)."""
    try:
        write_status(config, state, e, create=False, **extra)
    except WriteFailed as err:
        print(f"agent: {err}", file=sys.stderr)


def serve(
    config: Path,
    opts: ConsoleOptions,
    stop: threading.Event,
    on_running: Callable[[], None] = lambda: None,
) -> int:
    """The long-running agent: verify the enrollment, report running, enroll until done, idle.

    Shared by the Windows service and the POSIX foreground service (systemd, launchd). A console
    that refuses (401, 403...) or cannot be reached is asked again after a capped, jittered
    backoff; the reason is in status.json. Nothing is ever sent to an unverified console.
    """
    try:
        e = load_config(config, load_trust())
        enroll_url(e.console_url)  # a URL urllib cannot use fails now, not inside the loop
    except AgentError as err:
        write_status(config, "error", None, create=False, exit_code=err.exit_code, reason=str(err))
        raise
    write_status(config, "running", e)
    on_running()
    failures = 0
    while not stop.is_set():
        try:
            enroll(e, opts, sleep=stop.wait, stopping=stop.is_set)
        except (EnrollmentRefused, ConsoleUnreachable) as err:
            if stop.is_set():
                break
            failures += 1
            delay = round_delay(failures, opts)
            state = "refused" if isinstance(err, EnrollmentRefused) else "retrying"
            _note(config, state, e, reason=str(err), failures=failures, retry_in=round(delay, 3))
            stop.wait(delay)
            continue
        _note(config, "enrolled", e)
        break
    stop.wait()
    if config.exists():  # after `forget` deleted it, the service leaves no status behind
        _note(config, "stopped", e)
    return 0


def run_windows_service(body: Callable[[threading.Event, Callable[[], None]], int]) -> int:
    """Hands the process to the service control manager (SERVICE_WIN32_OWN_PROCESS)."""
    import ctypes
    from ctypes import wintypes

    SERVICE_WIN32_OWN_PROCESS = 0x10
    STOPPED, START_PENDING, STOP_PENDING, RUNNING = 1, 2, 3, 4
    CONTROL_STOP, CONTROL_INTERROGATE, CONTROL_SHUTDOWN = 1, 4, 5
    ACCEPT_STOP, ACCEPT_SHUTDOWN = 1, 4
    ERROR_SERVICE_SPECIFIC_ERROR, ERROR_CALL_NOT_IMPLEMENTED = 1066, 120
    ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063

    class SERVICE_STATUS(ctypes.Structure):
        _fields_ = [(name, wintypes.DWORD) for name in (
            "dwServiceType", "dwCurrentState", "dwControlsAccepted", "dwWin32ExitCode",
            "dwServiceSpecificExitCode", "dwCheckPoint", "dwWaitHint")]

    HANDLER_EX = ctypes.WINFUNCTYPE(wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.LPVOID, wintypes.LPVOID)
    SERVICE_MAIN = ctypes.WINFUNCTYPE(None, wintypes.DWORD, ctypes.POINTER(wintypes.LPWSTR))

    class SERVICE_TABLE_ENTRYW(ctypes.Structure):
        _fields_ = [("lpServiceName", wintypes.LPWSTR), ("lpServiceProc", SERVICE_MAIN)]

    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    advapi32.RegisterServiceCtrlHandlerExW.argtypes = [wintypes.LPCWSTR, HANDLER_EX, wintypes.LPVOID]
    advapi32.RegisterServiceCtrlHandlerExW.restype = wintypes.HANDLE
    advapi32.SetServiceStatus.argtypes = [wintypes.HANDLE, ctypes.POINTER(SERVICE_STATUS)]
    advapi32.SetServiceStatus.restype = wintypes.BOOL
    advapi32.StartServiceCtrlDispatcherW.argtypes = [ctypes.POINTER(SERVICE_TABLE_ENTRYW)]
    advapi32.StartServiceCtrlDispatcherW.restype = wintypes.BOOL

    stop = threading.Event()
    status = SERVICE_STATUS(dwServiceType=SERVICE_WIN32_OWN_PROCESS)
    handle = wintypes.HANDLE()
    result = {"code": 0}

    def report(state: int, specific: int = 0, wait_hint: int = 0) -> None:
        status.dwCurrentState = state
        status.dwControlsAccepted = ACCEPT_STOP | ACCEPT_SHUTDOWN if state == RUNNING else 0
        status.dwWin32ExitCode = ERROR_SERVICE_SPECIFIC_ERROR if specific else 0
        status.dwServiceSpecificExitCode = specific
        status.dwWaitHint = wait_hint
        status.dwCheckPoint = 0 if state in (RUNNING, STOPPED) else status.dwCheckPoint + 1
        advapi32.SetServiceStatus(handle, ctypes.byref(status))

    @HANDLER_EX
    def handler(control, event_type, event_data, context):  # noqa: ANN001
        if control in (CONTROL_STOP, CONTROL_SHUTDOWN):
            report(STOP_PENDING, wait_hint=10_000)
            stop.set()
            return 0
        return 0 if control == CONTROL_INTERROGATE else ERROR_CALL_NOT_IMPLEMENTED

    @SERVICE_MAIN
    def service_main(argc, argv):  # noqa: ANN001
        handle.value = advapi32.RegisterServiceCtrlHandlerExW("", handler, None)  # name ignored: own process
        if not handle.value:
            return
        report(START_PENDING, wait_hint=10_000)
        code = 1  # a bug: ctypes prints the traceback, and the SCM must still hear STOPPED
        try:
            code = body(stop, lambda: report(RUNNING))
        except AgentError as err:
            code = err.exit_code
        finally:
            result["code"] = code
            report(STOPPED, specific=code)

    table = (SERVICE_TABLE_ENTRYW * 2)(SERVICE_TABLE_ENTRYW("", service_main), SERVICE_TABLE_ENTRYW(None, SERVICE_MAIN()))
    if not advapi32.StartServiceCtrlDispatcherW(table):
        if ctypes.get_last_error() == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
            raise UsageError("the service command is run by the service control manager, not by hand")
        raise AgentError(f"service dispatcher failed (error {ctypes.get_last_error()})")
    return result["code"]


def run_posix_service(body: Callable[[threading.Event, Callable[[], None]], int]) -> int:
    """Foreground service for systemd and launchd: SIGTERM or SIGINT stops it cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return body(stop, lambda: None)


def wait_for_other_instances(seconds: float) -> None:
    """Windows: waits, at most `seconds`, until no other process runs this agent's executable.

    An uninstaller runs `forget` right after stopping the service, whose process may still be
    exiting; a running image cannot be deleted, so RemoveFiles would leave agent.exe behind until
    a reboot. (The C agent does the same with the same calls.) On POSIX a running executable can
    be deleted: nothing to wait for. Unfrozen, the executable is python itself: not ours to wait on.
    """
    if not IS_WINDOWS or not getattr(sys, "frozen", False):
        return
    import ctypes
    from ctypes import wintypes

    PROCESS_QUERY_LIMITED_INFORMATION, SYNCHRONIZE = 0x1000, 0x00100000
    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    k32.GetModuleFileNameW.argtypes = [wintypes.HMODULE, wintypes.LPWSTR, wintypes.DWORD]
    k32.GetModuleFileNameW.restype = wintypes.DWORD
    k32.K32EnumProcesses.argtypes = [ctypes.POINTER(wintypes.DWORD), wintypes.DWORD, ctypes.POINTER(wintypes.DWORD)]
    k32.K32EnumProcesses.restype = wintypes.BOOL
    k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.QueryFullProcessImageNameW.argtypes = [wintypes.HANDLE, wintypes.DWORD, wintypes.LPWSTR,
                                               ctypes.POINTER(wintypes.DWORD)]
    k32.QueryFullProcessImageNameW.restype = wintypes.BOOL
    k32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    k32.WaitForSingleObject.restype = wintypes.DWORD
    k32.CloseHandle.argtypes = [wintypes.HANDLE]

    size = 32768
    own = ctypes.create_unicode_buffer(size)
    n = k32.GetModuleFileNameW(None, own, size)
    if not n or n >= size:
        return
    me = own.value.upper()  # Windows compares paths case-insensitively
    # PyInstaller's one-file bootloader runs this same executable as our parent and waits for us.
    skip = {0, os.getpid(), os.getppid()}
    deadline = time.monotonic() + seconds
    while True:
        pids, needed = (wintypes.DWORD * 4096)(), wintypes.DWORD()
        if not k32.K32EnumProcesses(pids, ctypes.sizeof(pids), ctypes.byref(needed)):
            return
        seen = False  # another instance was found: it has exited, or time is up
        for pid in pids[: needed.value // ctypes.sizeof(wintypes.DWORD)]:
            if pid in skip:
                continue
            handle = k32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, False, pid)
            if not handle:
                continue
            try:
                image, length = ctypes.create_unicode_buffer(size), wintypes.DWORD(size)
                if k32.QueryFullProcessImageNameW(handle, 0, image, ctypes.byref(length)) and image.value.upper() == me:
                    left = deadline - time.monotonic()
                    if left > 0:
                        k32.WaitForSingleObject(handle, int(left * 1000))
                    seen = True
            finally:
                k32.CloseHandle(handle)
        # Look again after an exit (one more may have started); give up when time is up.
        if not seen or time.monotonic() >= deadline:
            return


def forget(config: Path, registry_key: str | None) -> None:
    """Uninstall: the config holds the token, so it goes with the agent; so do the registry's
    Enrollment and PendingEnrollment values, status.json, and their folder when left empty.
    Anything already gone is fine: uninstall must not fail on a half-installed agent."""
    failure: AgentError | None = None
    if registry_key is not None:
        try:
            registry_delete(registry_key, ENROLLMENT_VALUE, PENDING_VALUE)
        except WriteFailed as err:
            failure = err
    try:
        config.unlink(missing_ok=True)
    except OSError as err:
        failure = failure or WriteFailed(f"cannot delete {config}: {err.strerror}")
    # A service told to stop just before may still write its last status (it looked for the
    # config a moment before it was deleted): once it has exited, nothing writes there.
    wait_for_other_instances(FORGET_WAIT_SECONDS)
    (config.parent / "status.json").unlink(missing_ok=True)
    # A write cut short (a service killed at shutdown) leaves its temporary file
    # (write_private_file): it goes too, or the folder would stay.
    for name in (config.name, "status.json"):
        for leftover in config.parent.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
    try:
        config.parent.rmdir()
    except OSError:
        pass
    if failure is not None:
        raise failure


# ------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("allow_abbrev", False)  # the C agent knows only full option names
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, our exit code
        raise UsageError(f"{message} (see agent --help)")


class _Once(argparse.Action):
    """The contract allows each option once; argparse would let a second one win silently."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string} given twice")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agent", description="Example Agent (reference implementation).")
    parser.add_argument("--version", action="version", version=VERSION)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str, *, registry: bool, config: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text)
        if registry:
            p.add_argument("--registry-key", action=_Once, help="HKLM key in the 64-bit view (Windows only)")
        if config:
            p.add_argument("--config", action=_Once, required=True, type=Path, help="full path of the config file")
        return p

    p = command("enroll-from-installer", "verify the enrollment stamped in a signed installer", registry=True)
    p.add_argument("--installer", action=_Once, required=True, type=Path)
    command("enroll-from-registry", "verify the installer's PendingEnrollment registry value (Windows)",
            registry=True)
    p = command("enroll-from-file", "verify the enrollment in a file (the macOS sidecar)", registry=True)
    p.add_argument("--file", action=_Once, required=True, type=Path)
    p = command("verify-enrollment", "check the enrollment in a file or an installer's slot, print its public fields",
                registry=False, config=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", action=_Once, type=Path)
    # The EXE's own check before it touches an installed agent (templates/nsis/installer.nsi.j2).
    source.add_argument("--installer", action=_Once, type=Path)
    command("forget", "delete the config, status and registry enrollment (uninstall)", registry=True)
    for name, help_text in (("run", "enroll with the console once"), ("service", "run as the agent service")):
        p = command(name, help_text, registry=name == "service")
        p.add_argument("--ca-bundle", action=_Once, help="PEM file of CAs to trust instead of the system store "
                                                         "(default: $AGENT_CA_BUNDLE)")
        p.add_argument("--attempts", action=_Once, type=int, default=ConsoleOptions.attempts)
        p.add_argument("--backoff", action=_Once, type=float, default=ConsoleOptions.backoff)
        if name == "service":
            p.add_argument("--retry-max", action=_Once, type=float, default=ConsoleOptions.retry_max,
                           help="longest wait in seconds between enrollment rounds (default 300)")
    return parser


def _check_registry_key(args: argparse.Namespace) -> str | None:
    key = getattr(args, "registry_key", None)
    if IS_WINDOWS and key is None and args.command not in ("run", "verify-enrollment"):
        raise UsageError(f"{args.command} needs --registry-key on Windows")
    if not IS_WINDOWS and (key is not None or args.command == "enroll-from-registry"):
        raise UsageError("--registry-key and enroll-from-registry exist only on Windows")
    return key


def read_se_file(path: Path) -> bytes:
    """An SE file's bytes, which must be the SE exactly (no newline)."""
    try:
        data = read_limited(path, MAX_SE_CHARS)
    except OSError as err:
        raise InstallerUnreadable(f"cannot read enrollment file {path}: {err.strerror}") from None
    if len(data) > MAX_SE_CHARS:
        raise MalformedEnrollment(f"the enrollment in {path} is longer than {MAX_SE_CHARS} characters")
    return data


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    try:
        args = build_parser().parse_args(argv)
        key = _check_registry_key(args)
        config: Path | None = getattr(args, "config", None)
        if config is not None and not config.is_absolute():
            raise UsageError("--config must be a full path")
        if args.command == "forget":
            forget(config, key)
        elif args.command == "verify-enrollment":
            # The source is read first, then trust.json (check 1), then the SE: the C agent's order.
            where = args.file if args.file is not None else args.installer
            data = read_se_file(args.file) if args.file is not None else read_installer_se(args.installer)
            e = verify_se(data, load_trust(), str(where))
            fields = {"account_id": e.account_id, "group_id": e.group_id, "console_url": e.console_url,
                      "key_id": e.key_id, "issued_at": e.issued_at}
            if e.expires_at is not None:
                fields["expires_at"] = e.expires_at
            # UTF-8 bytes and one "\n" whatever the console's code page, as the C agent prints it.
            sys.stdout.flush()
            sys.stdout.buffer.write(json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n")
            sys.stdout.buffer.flush()
        elif args.command == "enroll-from-registry":
            enroll_from_registry(key, config)
        elif args.command == "enroll-from-installer":
            enroll_from_installer(args.installer, key, config)
        elif args.command == "enroll-from-file":
            data = read_se_file(args.file)
            store(verify_se(data, load_trust(), str(args.file)), key, config)
        else:
            if args.attempts < 1 or args.backoff < 0 or getattr(args, "retry_max", 1) <= 0:
                raise UsageError("--attempts must be >= 1, --backoff >= 0 and --retry-max > 0")
            opts = ConsoleOptions(
                ca_bundle=args.ca_bundle or environ.get("AGENT_CA_BUNDLE") or installed_ca_bundle(),
                attempts=args.attempts,
                backoff=args.backoff,
                retry_max=getattr(args, "retry_max", ConsoleOptions.retry_max),
            )
            if args.command == "run":
                try:
                    e = load_config(config, load_trust())
                except AgentError as err:
                    write_status(config, "error", None, create=False, exit_code=err.exit_code, reason=str(err))
                    raise
                enroll(e, opts)
                write_status(config, "enrolled", e)
                print("enrolled")
            else:
                body = lambda stop, on_running: serve(config, opts, stop, on_running)  # noqa: E731
                return (run_windows_service if IS_WINDOWS else run_posix_service)(body)
    except AgentError as err:
        print(f"agent: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The enrollment key: signs each group's enrollment (ES256) so that agents accept it.

A file key is an EC P-256 private key in PEM (PKCS#8 or SEC1), encrypted or not; the password
comes from the environment, never from argv. An HSM key is a PKCS#11 URI (RFC 7512: token=,
object= or id=, optionally module-path=), opened with python-pkcs11; the PIN comes from the
same environment variable. Signing happens in-process: a slot stamp stays a few milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from builder.enrollment import Enrollment, Secret
from builder.errors import ConfigError, EnrollmentError, SigningError, UsageError
from builder.trust import PinnedKey, SignedEnrollment, Trust, assemble, console_url_problem, signing_input
from builder.signing.authenticode import DEFAULT_PKCS11_MODULE

DEV_KEY_NAME = "enrollment.key"
DEV_PUBLIC_NAME = "enrollment.pub.pem"


class EnrollmentKey:
    """A private enrollment key: its pin (public key and kid) and a raw r||s signer."""

    pin: PinnedKey

    def sign_raw(self, data: bytes) -> bytes:
        raise NotImplementedError

    @property
    def kid(self) -> str:
        return self.pin.kid

    def sign(self, enrollment: Enrollment, trust: Trust, *, issued_at: int | None = None,
             expires_at: int | None = None) -> SignedEnrollment:
        """`enrollment` signed, when agents pinned to `trust` (the release's) will accept it:
        this key pinned, the console host allowed. EnrollmentError (naming console_url) else."""
        if trust.key(self.kid) is None:
            raise EnrollmentError(f"the enrollment key {self.kid} is not pinned by this release "
                                  f"(it pins {', '.join(trust.kids)})",
                                  "sign with a pinned key, or build a release that pins this one (--enrollment-public-key)")
        problem = console_url_problem(enrollment.console_url, trust.console_hosts)
        if problem:
            raise EnrollmentError(f"{{field}} is not allowed by this release: {problem}",
                                  "use a pinned console host, or build a release that pins it (--console-host)",
                                  field="console_url")
        issued = int(time.time()) if issued_at is None else int(issued_at)
        if expires_at is not None and expires_at <= issued:
            raise UsageError("the enrollment's expiry is not after its issue time", "give a later expiry")
        data = signing_input(enrollment, self.kid, issued, expires_at)
        return SignedEnrollment(enrollment, self.kid, issued, expires_at, assemble(data, self.sign_raw(data)))


class FileEnrollmentKey(EnrollmentKey):
    @classmethod
    def from_private_key(cls, key: ec.EllipticCurvePrivateKey) -> "FileEnrollmentKey":
        """A key already in memory (tests, benchmarks)."""
        self = cls.__new__(cls)
        self._key = key
        self.pin = PinnedKey.from_public_key(key.public_key())
        return self

    def __init__(self, path: Path, password: Secret | None = None):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"--enrollment-key {path}: cannot read it ({exc.strerror})", "check the path") from None
        try:
            key = serialization.load_pem_private_key(data, password.reveal().encode() if password else None)
        except TypeError:
            raise SigningError(f"--enrollment-key {path} is encrypted",
                               "set BUILDER_ENROLLMENT_KEY_PASSWORD") from None
        except ValueError:
            raise SigningError(f"--enrollment-key {path}: not a PEM private key, or the password is wrong",
                               "check the file and BUILDER_ENROLLMENT_KEY_PASSWORD") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SigningError(f"--enrollment-key {path} is not an EC P-256 key",
                               "enrollment keys are ECDSA P-256 (Windows CNG verifies them natively)")
        self._key = key
        self.pin = PinnedKey.from_public_key(key.public_key())

    def sign_raw(self, data: bytes) -> bytes:
        # RFC 6979: the same enrollment and time give the same bytes (reproducible stamps).
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None
    label: str | None
    key_id: bytes | None
    module: str

    @classmethod
    def parse(cls, uri: str, default_module: str) -> "Pkcs11Uri":
        if not uri.startswith("pkcs11:"):
            raise UsageError(f"--enrollment-key-pkcs11 {uri!r} is not a pkcs11: URI", "for example pkcs11:token=hsm;object=enrollment")
        path, _, query = uri[len("pkcs11:"):].partition("?")
        attrs = {}
        for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
            name, sep, value = part.partition("=")
            if not sep:
                raise UsageError(f"--enrollment-key-pkcs11: {name!r} has no value", "use name=value pairs")
            if name in ("pin-value", "pin-source"):
                raise UsageError("--enrollment-key-pkcs11 must not carry the PIN", "set BUILDER_ENROLLMENT_KEY_PASSWORD")
            attrs[name] = unquote(value)
        if "object" not in attrs and "id" not in attrs:
            raise UsageError("--enrollment-key-pkcs11 names no key", "add object=LABEL or id=%01")
        key_id = unquote(attrs["id"]).encode("latin-1") if "id" in attrs else None
        return cls(attrs.get("token"), attrs.get("object"), key_id, attrs.get("module-path", default_module))


class Pkcs11EnrollmentKey(EnrollmentKey):
    """An EC P-256 key inside an HSM; one session kept open for the process's life."""

    def __init__(self, uri: str, pin: Secret | None, module: str = DEFAULT_PKCS11_MODULE):
        import pkcs11  # only HSM users pay for loading it
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

        spec = Pkcs11Uri.parse(uri, module)
        self._mechanism = Mechanism.ECDSA
        try:
            lib = pkcs11.lib(spec.module)
            token = lib.get_token(token_label=spec.token) if spec.token else next(
                s.get_token() for s in lib.get_slots(token_present=True))
            self._session = token.open(user_pin=pin.reveal() if pin else None)
            query = {"key_type": KeyType.EC}
            if spec.label:
                query["label"] = spec.label
            if spec.key_id:
                query["id"] = spec.key_id
            self._key = self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, **query)
            public = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, **query)
            point = public[Attribute.EC_POINT]
        except (StopIteration, RuntimeError, OSError) as exc:
            raise SigningError(f"--enrollment-key-pkcs11: the HSM key could not be opened ({type(exc).__name__})",
                               "check the URI, the module and BUILDER_ENROLLMENT_KEY_PASSWORD (the PIN)") from None
        except pkcs11.PKCS11Error as exc:
            raise SigningError(f"--enrollment-key-pkcs11: the HSM refused ({type(exc).__name__})",
                               "check the URI, the module and BUILDER_ENROLLMENT_KEY_PASSWORD (the PIN)") from None
        # CKA_EC_POINT is a DER OCTET STRING around the uncompressed point (04 || X || Y).
        raw = point[2:] if len(point) == 67 and point[0] == 0x04 else point
        try:
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(raw))
        except ValueError:
            raise SigningError("--enrollment-key-pkcs11: the key is not EC P-256",
                               "enrollment keys are ECDSA P-256") from None
        self.pin = PinnedKey.from_public_key(public_key)

    def sign_raw(self, data: bytes) -> bytes:
        # CKM_ECDSA over our own SHA-256 digest: every HSM has it; the result is r||s already.
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        return bytes(self._key.sign(digest.finalize(), mechanism=self._mechanism))


def load_public_key(path: Path) -> PinnedKey:
    """A pin from a PEM public key (or a private key, whose public half is taken)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--enrollment-public-key {path}: cannot read it ({exc.strerror})", "check the path") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"--enrollment-public-key {path}: not a PEM public key",
                          "give the SubjectPublicKeyInfo PEM (`openssl ec -pubout`)") from None
    return PinnedKey.from_public_key(key)


def create_dev_key(folder: Path) -> Path:
    """A DEVELOPMENT enrollment key pair in `folder` (0600 private key). Returns the key path."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / DEV_KEY_NAME
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    (folder / DEV_PUBLIC_NAME).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path

"""Authenticode signing and verification of PE (EXE) and MSI files with osslsigncode.

Passwords and PINs go to osslsigncode on stdin (`-readpass -`), never on its command line.
osslsigncode writes to a new file only; callers sign `src` into a temporary `dst` in the
output folder and rename it once verified, so no unsigned or half-signed file is ever left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from builder import log
from builder.config import SIGN_PASSWORD_ENV
from builder.enrollment import Secret
from builder.errors import SigningError, ToolFailedError, UsageError, VerificationError
from builder.tools import runner

DEFAULT_PKCS11_ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True, kw_only=True)
class OfflineTSA:
    """osslsigncode's built-in RFC 3161 responder, for offline tests: no network involved."""

    certs: Path
    key: Path
    time: int


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    """One of: a PEM cert+key, a PKCS#12, or a PKCS#11 URI (with its cert as PEM)."""

    cert: Path | None = None
    key: Path | None = None
    pkcs12: Path | None = None
    pkcs11_uri: str | None = None
    pkcs11_module: str = DEFAULT_PKCS11_MODULE
    pkcs11_engine: str = DEFAULT_PKCS11_ENGINE
    password: Secret | None = None
    timestamp_url: str | None = None
    test_tsa: OfflineTSA | None = None
    description: str | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        chosen = [bool(self.pkcs12), bool(self.pkcs11_uri), bool(self.key and not self.pkcs11_uri)]
        if sum(chosen) != 1:
            raise UsageError(
                "give exactly one signing key: --sign-cert with --sign-key, --sign-pkcs12, or --sign-pkcs11",
                "or --no-sign for an unsigned development build",
            )
        if (self.key or self.pkcs11_uri) and not self.cert:
            raise UsageError("--sign-key and --sign-pkcs11 need --sign-cert PEM (the certificate chain)")
        for label, path in (("--sign-cert", self.cert), ("--sign-key", self.key), ("--sign-pkcs12", self.pkcs12)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{label} {path}: no such file", "check the path")
        if self.cert:
            check_code_signing_cert(Path(self.cert))
        if self.password:
            log.register_secret(self.password.reveal(), permanent=True)

    @property
    def kind(self) -> str:
        return "pkcs12" if self.pkcs12 else "pkcs11" if self.pkcs11_uri else "pem"

    def args(self, signing_time: int | None = None) -> list[str]:
        """osslsigncode's options for this key. `signing_time` (Unix seconds) fixes the PKCS#7
        signingTime, so the same inputs sign to the same bytes; it is clamped into the
        certificate's validity (SOURCE_DATE_EPOCH may predate a new certificate)."""
        # Absolute paths: NSIS runs osslsigncode for the uninstaller from its own folder.
        absolute = lambda p: str(Path(p).resolve())  # noqa: E731
        if self.pkcs12:
            out = ["-pkcs12", absolute(self.pkcs12)]
        elif self.pkcs11_uri:
            out = ["-pkcs11engine", self.pkcs11_engine, "-pkcs11module", self.pkcs11_module, "-certs", absolute(self.cert), "-key", self.pkcs11_uri]
        else:
            out = ["-certs", absolute(self.cert), "-key", absolute(self.key)]
        if self.password is not None:
            out += ["-readpass", "-"]
        out += ["-h", "sha256"]
        if self.description:
            out += ["-n", self.description]
        if self.url:
            out += ["-i", self.url]
        if self.timestamp_url:
            out += ["-ts", self.timestamp_url]
        if self.test_tsa:
            out += ["-TSA-certs", absolute(self.test_tsa.certs), "-TSA-key", absolute(self.test_tsa.key), "-TSA-time", str(self.test_tsa.time)]
        if signing_time is not None:
            out += ["-time", str(self.clamp_time(signing_time))]
        return out

    def clamp_time(self, when: int) -> int:
        try:
            cert = self.certificate()
        except SigningError:
            return when  # osslsigncode reports the unreadable key itself, with its own words
        if cert is None:
            return when
        low = int(cert.not_valid_before_utc.timestamp()) + 1
        high = int(cert.not_valid_after_utc.timestamp()) - 1
        return min(max(when, low), high)

    def certificate(self) -> "x509.Certificate | None":
        """The signer's certificate: from --sign-cert, or the PKCS#12's own."""
        if self.cert:
            return x509.load_pem_x509_certificates(Path(self.cert).read_bytes())[0]
        if self.pkcs12:
            from cryptography.hazmat.primitives.serialization import pkcs12

            try:
                loaded = pkcs12.load_pkcs12(Path(self.pkcs12).read_bytes(), self.password.reveal().encode() if self.password else None)
            except ValueError:
                raise SigningError(f"--sign-pkcs12 {self.pkcs12}: cannot be opened: wrong password or not a PKCS#12",
                                   "check BUILDER_SIGN_PASSWORD") from None
            return loaded.cert.certificate if loaded.cert else None
        return None

    def stdin(self) -> bytes | None:
        return None if self.password is None else self.password.reveal().encode()


def check_code_signing_cert(path: Path) -> None:
    """Refuse a certificate without the codeSigning usage: osslsigncode would sign, Windows would not trust it."""
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (ValueError, IndexError, OSError):
        raise SigningError(f"--sign-cert {path}: not a PEM certificate", "give the code-signing certificate in PEM form") from None
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU extension means any usage
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise SigningError(f"--sign-cert {path}: the certificate lacks the codeSigning extended key usage", "use a code-signing certificate")


def check_key_matches(key: SigningKey) -> None:
    """Open the key before any tool runs: a wrong password, or a PEM key that is not the
    certificate's, is named here instead of failing inside osslsigncode. A PKCS#12 is opened by
    certificate() (its key and certificate come as a pair); an HSM key by osslsigncode's engine."""
    from cryptography.hazmat.primitives import serialization

    leaf = key.certificate()  # a PKCS#12's wrong password: SigningError naming the file
    if key.kind != "pem" or leaf is None:
        return
    password = key.password.reveal().encode() if key.password else None
    data = Path(key.key).read_bytes()
    try:
        try:
            private = serialization.load_pem_private_key(data, password)
        except TypeError:  # encrypted without a password, or a password for a plain key
            if password is None:
                raise SigningError(f"--sign-key {key.key} is encrypted", f"set {SIGN_PASSWORD_ENV}") from None
            private = serialization.load_pem_private_key(data, None)
    except ValueError:
        raise SigningError(f"--sign-key {key.key} could not be opened: wrong password or not a PEM key",
                           f"check {SIGN_PASSWORD_ENV} and the file") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise SigningError(f"--sign-key {key.key} is not the key of the certificate ({leaf.subject.rfc4514_string()})",
                           "give the key that belongs to the certificate")


def sign(key: SigningKey, src: Path, dst: Path, *, signing_time: int | None = None) -> None:
    """Sign `src` into the new file `dst` (which must not exist)."""
    result = runner.run("osslsigncode", ["sign", *key.args(signing_time), "-in", src, "-out", dst], stdin=key.stdin(), check=False)
    if result.returncode == 0 and dst.is_file():
        return
    dst.unlink(missing_ok=True)
    out = result.text()
    if "Wrong password" in out or "mac verify failure" in out or "bad decrypt" in out:
        raise SigningError("the signing key could not be opened: wrong password or PIN", "check BUILDER_SIGN_PASSWORD")
    if "timestamping failed" in out.lower() or "HTTP failure" in out or "Failed to get data" in out:
        raise SigningError(f"the timestamp server {key.timestamp_url} did not answer", "check --timestamp-url and the network, or leave it out")
    if "PKCS#11" in out or "pkcs11" in out.lower() and "load" in out.lower():
        raise SigningError("the PKCS#11 key could not be used", "check --sign-pkcs11 URI, the module and the PIN")
    if "Failed to read key or certificates" in out:
        raise SigningError("the signing key or certificate could not be read", "check the files, their format (PEM/PKCS#12) and the password")
    raise SigningError(f"osslsigncode could not sign {src.name}: {runner.last_line(out)}", "run with -v for the full output")


@dataclass(frozen=True)
class Verification:
    ok: bool
    signer: str | None
    timestamp: str | None  # only a timestamp that verified
    detail: str
    timestamp_problem: str | None = None  # a timestamp is present and does not verify: why
    # Failed only because a chain ends at a root not in the CA file: the file's digest matches.
    root_missing: bool = False

    def as_dict(self) -> dict:
        return {"ok": self.ok, "signer": self.signer, "timestamp": self.timestamp, "detail": self.detail,
                "timestamp_problem": self.timestamp_problem, "root_missing": self.root_missing}


_SUBJECT_RE = re.compile(r"^\s*Signer #0:\s*\n\s*Subject:\s*(.+)$", re.MULTILINE)
_TS_RE = re.compile(r"Timestamp time:\s*(.+)$", re.MULTILINE)
_TS_RESULT = "Timestamp Server Signature verification: "
_VERIFY_TIME_RE = re.compile(r"^Signature verification time:\s*(.+)$", re.MULTILINE)
_ERROR_RE = re.compile(r"^\s*Error:\s*(.+)$", re.MULTILINE)
_ANY_ERROR_RE = re.compile(r"(?:^\s*Error:|Verify error:)\s*(.+)$", re.MULTILINE)
# PE: "Current/Calculated message digest"; MSI: "Current/Calculated DigitalSignature".
_DIGESTS_RE = re.compile(r"^Current (message digest|DigitalSignature)\s*:\s*(\S+)\s*\nCalculated \1\s*:\s*(\S+)", re.MULTILINE)
# OpenSSL's words for a chain that cannot reach a trusted root.
_NO_ROOT = ("unable to get local issuer certificate", "self-signed certificate in certificate chain",
            "self signed certificate in certificate chain", "unable to get issuer certificate")


def _only_root_missing(out: str) -> bool:
    digests = _DIGESTS_RE.findall(out)
    errors = _ANY_ERROR_RE.findall(out)
    return (bool(digests) and all(current == calculated for _, current, calculated in digests) and "MISMATCH" not in out
            and bool(errors) and all(any(words in e for words in _NO_ROOT) for e in errors))


def _timestamp_problem(out: str, when: str) -> str | None:
    """Why osslsigncode's "Timestamp Server Signature verification" failed, from its output
    (2.9 prints the reason in the lines before that verdict): None when it says ok."""
    at = out.find(_TS_RESULT)
    if at < 0:
        return f"timestamp {when}: osslsigncode did not check it"
    if out[at + len(_TS_RESULT):].startswith("ok"):
        return None
    section = out[:at]
    section = section[section.find("Countersignatures:"):] if "Countersignatures:" in section else section
    if "Hash value mismatch" in section or "message digest verification: failed" in section:
        reason = "its message imprint does not match this signature (a timestamp of another signature)"
    else:
        errors = _ERROR_RE.findall(section)
        error = errors[-1].strip() if errors else "no reason given"
        if "not yet valid" in error or "expired" in error:
            reason = f"the TSA certificate is not valid at that time ({error})"
        else:
            reason = f"the TSA certificate chain does not verify ({error})"
    return f"timestamp {when} does not verify: {reason}"


def verify(path: Path, ca: Path | None = None, tsa_ca: Path | None = None) -> Verification:
    """osslsigncode verify against `ca` (default: the system's trusted roots).

    osslsigncode 2.9 exits 0 and says "Succeeded" when a timestamp is present but fails (TSA
    chain, validity at its time, message imprint); that is read from its output and fails the
    verification here. A timestamp is reported only when it verified."""
    ca_file = str(ca) if ca else SYSTEM_CA_BUNDLE
    args = ["verify", "-CAfile", ca_file, "-TSA-CAfile", str(tsa_ca or ca_file), "-in", path]
    try:
        result = runner.run("osslsigncode", args, check=False)
    except ToolFailedError as exc:  # timeouts
        raise VerificationError(f"{path}: {exc.message}") from None
    out = result.text()
    subject = _SUBJECT_RE.search(out)
    ts = _TS_RE.search(out)
    when = ts.group(1).strip() if ts else None
    problem = _timestamp_problem(out, when) if when else None
    ok = result.returncode == 0 and "Signature verification: ok" in out and problem is None
    if ok:
        detail = "signature ok" + (f", timestamp {when} verified" if when else "")
    elif ("No signature found" in out or "does not contain any signature" in out.lower()
          or "Unable to extract existing signature" in out):
        detail = "not signed"
    elif "MISMATCH" in out:
        detail = "content changed after signing (digest mismatch)"
    elif problem:
        detail = problem
    elif (at := _VERIFY_TIME_RE.search(out)) and "Signature verification: failed" in out:
        errors = _ERROR_RE.findall(out[at.end():])
        reason = errors[0].strip() if errors else runner.last_line(out)
        detail = f"the signer's certificate is not valid at the timestamp time {at.group(1).strip()} ({reason})"
    else:
        detail = runner.last_line(out)
    return Verification(ok, oneline_to_rfc4514(subject.group(1).strip()) if subject else None,
                        when if ok or not problem else None,
                        detail, problem, root_missing=not ok and _only_root_missing(out))


_ONELINE_SPLIT = re.compile(r"/(?=[A-Za-z][A-Za-z0-9.]*=)")


def oneline_to_rfc4514(subject: str) -> str:
    """osslsigncode's `/CN=a/O=b` (OpenSSL's oneline form, RDNs in order) as RFC 4514 `O=b,CN=a`,
    the form the build summary and the manifest use, so that one signer reads the same everywhere."""
    if not subject.startswith("/"):
        return subject
    rdns = [part for part in _ONELINE_SPLIT.split(subject[1:]) if part]
    escaped = [name + "=" + re.sub(r'([,+"\\<>;])', r"\\\1", value) for name, _, value in (r.partition("=") for r in rdns)]
    return ",".join(reversed(escaped))


def signer_subject(key: SigningKey) -> str | None:
    cert = key.certificate()
    return cert.subject.rfc4514_string() if cert is not None else None


def add_enrollment_slot(signed: Path, dst: Path, kind: str, size: int) -> None:
    """Copy `signed` to `dst` with an empty enrollment slot of `size` bytes in its signature.

    The slot is an unauthenticated attribute of the PKCS#7 (builder/binfmt/pkcs7.py), so the
    signature stays valid and later stamps change only the slot's bytes. It must be the last
    change to the signature: a timestamp added afterwards would re-encode the PKCS#7.
    """
    from builder.binfmt import pe, pkcs7

    data = signed.read_bytes()
    if kind == "exe":
        dst.write_bytes(pe.with_signature(data, pkcs7.add_slot(pe.pkcs7_of(data, str(signed)), size), str(signed)))
        return
    if kind != "msi":
        raise UsageError(f"no enrollment slot for {kind!r} files", "slots exist for exe and msi")
    # An MSI's signature is a stream of the compound file; osslsigncode rewrites the container.
    work = dst.parent
    sig, unsigned = work / f".{dst.name}.sig", work / f".{dst.name}.unsigned"
    try:
        runner.run("osslsigncode", ["extract-signature", "-in", signed, "-out", sig])
        sig.write_bytes(pkcs7.add_slot(sig.read_bytes(), size))
        runner.run("osslsigncode", ["remove-signature", "-in", signed, "-out", unsigned])
        # Without -CAfile attach-signature exits 1 after writing a valid file, so the output's
        # existence is checked rather than the exit code; `verify` afterwards is the real check.
        runner.run("osslsigncode", ["attach-signature", "-sigin", sig, "-CAfile", SYSTEM_CA_BUNDLE, "-in", unsigned, "-out", dst], check=False)
        if not dst.is_file():
            raise SigningError(f"{signed.name}: osslsigncode could not attach the signature with its slot", "run with -v for its output")
    finally:
        sig.unlink(missing_ok=True)
        unsigned.unlink(missing_ok=True)


def remove_signature(signed: Path, dst: Path) -> None:
    """`signed` without its Authenticode signature, as the new file `dst`."""
    result = runner.run("osslsigncode", ["remove-signature", "-in", signed, "-out", dst], check=False)
    if result.returncode != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise SigningError(f"{signed.name}: its signature could not be removed: {runner.last_line(result.text())}",
                           "check that it is a signed PE or MSI")

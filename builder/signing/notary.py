"""Apple notarization: Apple's Notary REST API (submit, upload, wait, log) and stapling.

Written from Apple's documentation of the Notary API ("Submitting software for notarization
over the web"):
- every call carries a JWT (ES256) made from an App Store Connect API key: header alg ES256, kid
  = key id; claims iss = issuer id, iat, exp (at most 20 minutes later), aud
  "appstoreconnect-v1";
- POST {api}/submissions {"submissionName", "sha256"} answers with a submission id and
  temporary S3 credentials, bucket and object; the file is uploaded there with boto3;
- GET {api}/submissions/{id} gives the status ("In Progress", "Accepted", "Invalid",
  "Rejected"); GET {api}/submissions/{id}/logs gives a developerLogUrl whose JSON lists the
  issues;
- the ticket is fetched from Apple's public ticket lookup (CloudKit) by the file's record name
  and stapled (builder.binfmt.ticket).

apple-platform-py's notarize module has the same calls but fixed Apple URLs, so it cannot be
pointed at a stand-in; this small client can (`NotaryService.api_url` and friends). Live
notarization has not been run from this project's CI: the tests use a stand-in on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from builder import log
from builder.binfmt import ticket as ticketfmt
from builder.binfmt import xar
from builder.binfmt.macho import KOLY_SIZE, koly_code_signature, parse_code_directory, superblob_entries
from builder.enrollment import Secret
from builder.errors import FormatError, NotarizationError, UsageError

APPLE_NOTARY_API = "https://appstoreconnect.apple.com/notary/v2"
APPLE_TICKET_LOOKUP = ("https://api.apple-cloudkit.com/database/1/com.apple.gk.ticket-delivery/"
                       "production/public/records/lookup")
S3_REGION = "us-west-2"  # where Apple's submission bucket lives
ISSUER_ENV, KEY_ID_ENV, KEY_ENV = "BUILDER_NOTARY_ISSUER", "BUILDER_NOTARY_KEY_ID", "BUILDER_NOTARY_KEY"
_TERMINAL = ("Accepted", "Invalid", "Rejected")
_KEY_HINT = "give the App Store Connect API key (Users and Access > Integrations): issuer id, key id, AuthKey_<id>.p8"


@dataclass(frozen=True, kw_only=True)
class NotaryCredentials:
    """An App Store Connect API key. The private key is a Secret: never printed or logged."""

    issuer_id: str
    key_id: str
    private_key: Secret = field(repr=False)

    def key(self) -> ec.EllipticCurvePrivateKey:
        text = self.private_key.reveal().strip()
        if "-----BEGIN" not in text:  # rcodesign's JSON holds the DER, base64, without PEM lines
            text = "-----BEGIN PRIVATE KEY-----\n" + text + "\n-----END PRIVATE KEY-----\n"
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise NotarizationError(f"App Store Connect key {self.key_id}: the private key is not a PEM "
                                    "or base64 PKCS#8 key", _KEY_HINT) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise NotarizationError(f"App Store Connect key {self.key_id} is not an EC P-256 key", _KEY_HINT)
        return key


def credentials_from_file(path: Path) -> NotaryCredentials:
    """`--notarize-key FILE`: JSON {"issuer_id", "key_id", "private_key"} (rcodesign's unified key
    file has these names; "issuer" and "key" are taken too). The private key is PEM or base64 DER."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--notarize-key {path}: cannot read it ({exc.strerror})", "check the path") from None
    except ValueError:
        raise UsageError(f"--notarize-key {path} is not JSON", 'give {"issuer_id", "key_id", "private_key"}') from None
    if not isinstance(doc, dict):
        raise UsageError(f"--notarize-key {path} is not a JSON object", 'give {"issuer_id", "key_id", "private_key"}')
    issuer, key_id = doc.get("issuer_id") or doc.get("issuer"), doc.get("key_id")
    private = doc.get("private_key") or doc.get("key")
    missing = [name for name, value in (("issuer_id", issuer), ("key_id", key_id), ("private_key", private))
               if not isinstance(value, str) or not value]
    if missing:
        raise UsageError(f"--notarize-key {path} lacks {', '.join(missing)}", _KEY_HINT)
    log.register_secret(private)
    return NotaryCredentials(issuer_id=issuer, key_id=key_id, private_key=Secret(private))


def credentials_from_env(environ) -> NotaryCredentials | None:
    """BUILDER_NOTARY_ISSUER, BUILDER_NOTARY_KEY_ID, BUILDER_NOTARY_KEY (the key's PEM text, or
    the path of the .p8 file): all three or none."""
    values = {name: environ.get(name) for name in (ISSUER_ENV, KEY_ID_ENV, KEY_ENV)}
    given = [name for name, value in values.items() if value]
    if not given:
        return None
    if len(given) != 3:
        missing = [name for name in values if name not in given]
        raise UsageError(f"notarization needs ${ISSUER_ENV}, ${KEY_ID_ENV} and ${KEY_ENV}; "
                         f"{', '.join('$' + m for m in missing)} missing", _KEY_HINT)
    key = values[KEY_ENV]
    if "-----BEGIN" not in key and os.path.isfile(key):
        key = Path(key).read_text()
    log.register_secret(key)
    return NotaryCredentials(issuer_id=values[ISSUER_ENV], key_id=values[KEY_ID_ENV], private_key=Secret(key))


@dataclass(frozen=True, kw_only=True)
class NotaryService:
    """Where the notary service lives. Apple's by default; `local(url)` for a stand-in that serves
    the API under /notary/v2, S3 under /s3 and the ticket lookup under /ticket/lookup."""

    api_url: str = APPLE_NOTARY_API
    s3_endpoint: str | None = None  # None: Amazon S3 itself
    ticket_url: str = APPLE_TICKET_LOOKUP
    wait_seconds: int = 3600
    poll_seconds: float = 15.0
    timeout: float = 60.0

    @classmethod
    def local(cls, base: str, **kw) -> "NotaryService":
        base = base.rstrip("/")
        return cls(api_url=f"{base}/notary/v2", s3_endpoint=f"{base}/s3", ticket_url=f"{base}/ticket/lookup",
                   **{"poll_seconds": 0.2, "wait_seconds": 60, "timeout": 10.0, **kw})


@dataclass(frozen=True, kw_only=True)
class Notary:
    """What `Signers.notary` holds: the key and the service."""

    credentials: NotaryCredentials
    service: NotaryService = NotaryService()


@dataclass(frozen=True)
class NotaryResult:
    notarized: bool
    reason: str
    stapled: bool = False
    submission_id: str | None = None
    status: str | None = None

    def as_dict(self) -> dict:
        return {"notarized": self.notarized, "stapled": self.stapled, "reason": self.reason,
                "submission_id": self.submission_id, "status": self.status}


# ------------------------------------------------------------------------------------------
# HTTP


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(credentials: NotaryCredentials, now: int | None = None) -> str:
    """An ES256 JWT for the App Store Connect API, valid 15 minutes (Apple allows at most 20)."""
    now = int(time.time()) if now is None else now
    header = {"alg": "ES256", "kid": credentials.key_id, "typ": "JWT"}
    claims = {"iss": credentials.issuer_id, "iat": now, "exp": now + 900, "aud": "appstoreconnect-v1"}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    r, s = decode_dss_signature(credentials.key().sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    token = signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    log.register_secret(token)
    return token


def _apple_errors(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return "; ".join(f"{e.get('code') or e.get('status')}: {e.get('detail') or e.get('title')}"
                         for e in doc.get("errors", [])) or body[:200].decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def _call(method: str, url: str, service: NotaryService, *, token: str | None = None, body: dict | None = None,
          what: str) -> dict:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=service.timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise NotarizationError(f"{what}: the notary service answered {exc.code} ({_apple_errors(exc.read())})",
                                "check the App Store Connect API key (issuer id, key id, key)"
                                if exc.code in (401, 403) else "try again later; see Apple's system status") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotarizationError(f"{what}: cannot reach {url.split('/', 3)[2]} ({reason})",
                                "check the network (the notary service needs HTTPS to Apple)") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise NotarizationError(f"{what}: the notary service answered something that is not JSON",
                                "try again later") from None


def _upload(path: Path, attributes: dict, service: NotaryService, what: str) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    secret = attributes.get("awsSecretAccessKey", "")
    token = attributes.get("awsSessionToken", "")
    for value in (secret, token):
        if value:
            log.register_secret(value)
    config = Config(region_name=S3_REGION, retries={"max_attempts": 3}, connect_timeout=service.timeout,
                    read_timeout=service.timeout, request_checksum_calculation="when_required",
                    s3={"addressing_style": "path"} if service.s3_endpoint else {})
    client = boto3.client("s3", endpoint_url=service.s3_endpoint, aws_access_key_id=attributes.get("awsAccessKeyId"),
                          aws_secret_access_key=secret, aws_session_token=token, config=config)
    try:
        with open(path, "rb") as fh:
            client.put_object(Bucket=attributes["bucket"], Key=attributes["object"], Body=fh)
    except (BotoCoreError, ClientError, KeyError, OSError) as exc:
        raise NotarizationError(f"{what}: the upload to Apple's storage failed ({type(exc).__name__}: {exc})",
                                "check the network and try again") from None


# ------------------------------------------------------------------------------------------
# Record names and stapling


def record_name(path: Path) -> str:
    """The ticket's record name for a signed pkg (its TOC checksum) or dmg (its cdhash)."""
    data = Path(path).read_bytes()
    if data[:4] == xar.MAGIC:
        with xar.read_xar(data, name=str(path)) as archive:
            return ticketfmt.xar_record_name(archive.stored_toc_checksum, archive.checksum_style)
    offset, size = koly_code_signature(data, str(path))
    if size == 0:
        raise FormatError(f"{path}: not signed, so it has no notarization record")
    blobs = superblob_entries(data[offset:offset + size], str(path))
    if 0 not in blobs:
        raise FormatError(f"{path}: its signature has no CodeDirectory")
    cd = parse_code_directory(blobs[0], str(path))
    return ticketfmt.dmg_record_name(cd.hash(blobs[0]), cd.hash_type)


def staple(path: Path, ticket: bytes) -> None:
    """Write `ticket` into the pkg or dmg at `path`, in place (through a file beside it)."""
    path = Path(path)
    data = path.read_bytes()
    stapled = (data + ticketfmt.xar_trailer(ticket) if data[:4] == xar.MAGIC
               else ticketfmt.dmg_with_ticket(data, ticket, str(path)))
    partial = path.with_name(f".{path.name}.stapling")
    partial.write_bytes(stapled)
    os.replace(partial, path)


def stapled_ticket(path: Path) -> bytes | None:
    """The ticket stapled to a pkg or dmg, read the way the stapler writes it; None without one."""
    data = Path(path).read_bytes()
    if data[:4] == xar.MAGIC:
        return ticketfmt.xar_ticket(data)
    if len(data) >= KOLY_SIZE and data[-KOLY_SIZE:-KOLY_SIZE + 4] == b"koly":
        try:
            return ticketfmt.dmg_ticket(data, str(path))
        except FormatError:
            return None
    return None


def _lookup_ticket(name: str, service: NotaryService, what: str) -> bytes:
    doc = _call("POST", service.ticket_url, service, body={"records": [{"recordName": name}]},
                what=f"{what}: ticket lookup")
    for record in doc.get("records", []):
        if record.get("recordName") != name:
            continue
        field_ = (record.get("fields") or {}).get("signedTicket") or {}
        if field_.get("type") == "BYTES" and field_.get("value"):
            return base64.b64decode(field_["value"])
        raise NotarizationError(f"{what}: no ticket for record {name} ({record.get('serverErrorCode')}: "
                                f"{record.get('reason')})", "wait a minute and staple again")
    raise NotarizationError(f"{what}: the ticket lookup did not answer for record {name}", "try again later")


# ------------------------------------------------------------------------------------------
# The whole path


def log_summary(submission: str, token: str, service: NotaryService, what: str) -> str:
    """Apple's log for a submission, cut to its status summary and first issues."""
    try:
        info = _call("GET", f"{service.api_url}/submissions/{submission}/logs", service, token=token,
                     what=f"{what}: log")
        url = info["data"]["attributes"]["developerLogUrl"]
        doc = _call("GET", url, service, what=f"{what}: log")
    except (NotarizationError, KeyError, TypeError):
        return "no log could be fetched"
    issues = [f"{i.get('path') or ''}: {i.get('message')}".lstrip(": ") for i in doc.get("issues") or []]
    parts = [str(doc.get("statusSummary") or doc.get("status") or "")] + issues[:5]
    return "; ".join(p for p in parts if p)


def notarize(path: Path, notary: Notary, *, staple_ticket: bool = True) -> NotaryResult:
    """Submit `path` (a signed pkg or dmg), upload it, wait for Apple's verdict with a progress
    line, and staple the ticket. NotarizationError (exit 13) on any failure, with Apple's log
    summary when Apple rejected it."""
    path, service, credentials = Path(path), notary.service, notary.credentials
    what = f"notarizing {path.name}"
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    # A stamp notarizes its output before renaming it into place (".group.pkg.partial"):
    # Apple's records show the name it will have.
    name = path.name[1:-len(".partial")] if path.name.startswith(".") and path.name.endswith(".partial") else path.name
    token = make_jwt(credentials)
    created = _call("POST", f"{service.api_url}/submissions", service, token=token,
                    body={"submissionName": name, "sha256": digest.hexdigest()}, what=what)
    try:
        submission = created["data"]["id"]
        attributes = created["data"]["attributes"]
    except (KeyError, TypeError):
        raise NotarizationError(f"{what}: the notary service's answer has no submission", "try again later") from None
    with log.step(f"Notarizing {path.name}: upload (submission {submission})"):
        _upload(path, attributes, service, what)
    status, started, last = "In Progress", time.monotonic(), None
    with log.step(f"Notarizing {path.name}: waiting for Apple's verdict (submission {submission})"):
        while True:
            token = make_jwt(credentials)  # a wait can outlast one token
            doc = _call("GET", f"{service.api_url}/submissions/{submission}", service, token=token, what=what)
            status = ((doc.get("data") or {}).get("attributes") or {}).get("status") or "unknown"
            elapsed = time.monotonic() - started
            if status != last:
                log.info(f"  notarization {submission}: {status} after {elapsed:.0f}s")
                last = status
            if status in _TERMINAL:
                break
            if elapsed > service.wait_seconds:
                raise NotarizationError(f"{what}: no verdict within {service.wait_seconds}s (submission {submission}, "
                                        f"status {status})", "check it later; the submission goes on at Apple")
            time.sleep(service.poll_seconds)
    if status != "Accepted":
        raise NotarizationError(f"{what}: Apple says {status} (submission {submission}): "
                                f"{log_summary(submission, token, service, what)}",
                                "fix what the notary log names, sign again and rebuild")
    stapled = False
    if staple_ticket:
        name = record_name(path)
        with log.step(f"Stapling the ticket to {path.name}"):
            staple(path, _lookup_ticket(name, service, what))
        stapled = True
    return NotaryResult(notarized=True, stapled=stapled, reason="accepted" + (", ticket stapled" if stapled else ""),
                        submission_id=submission, status=status)

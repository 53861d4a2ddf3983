"""A test console: the enroll endpoint a real console serves, with the checks it makes.

HTTPS on 127.0.0.1 with a development certificate for `localhost` (and 127.0.0.1) issued by a CA
made here with `cryptography`; an agent trusts that CA through its configuration (`--ca-bundle`,
`AGENT_CA_BUNDLE`), never the system store.

    POST /api/v1/enroll  (any path prefix, like a console URL with a tenant path)
    Authorization: Bearer <token>
    {"account_id": "...", "group_id": "...", "device": {...}}      ("device" optional)

- 200 `{"device_id", "account_id", "group_id"}`: the device is recorded in that account and group
  (`devices(...)`, and `GET /api/v1/devices?account_id=&group_id=`). A device that names itself
  (`device.id`, else `device.hostname`) and enrolls again keeps its record; one that does not
  is a new device each time (today's reference agent sends no device).
- 401 `unknown_token` / `token_revoked` / `missing_token`, 403 `wrong_scope` (a token is
  registered for one account and group) and `device_limit` (the account already has `device_cap`
  devices, 10,000 by default: the product's limit), 400 `malformed`. Every refusal is JSON
  `{"error": code, "reason": sentence}` and is kept in `refusals`.

Tokens are registered by the test with `add_token(account, group)`, which returns the token.
"""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import json
import secrets
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ENROLL = "/api/v1/enroll"
DEVICES = "/api/v1/devices"
PRODUCT_DEVICE_CAP = 10_000
MAX_BODY = 64 * 1024


@dataclass
class Token:
    account_id: str
    group_id: str
    revoked: bool = False


@dataclass
class Device:
    device_id: str
    account_id: str
    group_id: str
    device: dict
    enrollments: int = 1


@dataclass
class Refusal:
    status: int
    error: str
    reason: str


@dataclass
class ConsoleState:
    """What the console knows; every method is safe from the server's threads and the test's."""

    device_cap: int = PRODUCT_DEVICE_CAP
    tokens: dict[str, Token] = field(default_factory=dict)  # by SHA-256 of the token: never kept in clear
    records: dict[tuple[str, str], Device] = field(default_factory=dict)  # (account, device key)
    refusals: list[Refusal] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_token(self, account_id: str, group_id: str, token: str | None = None) -> str:
        token = token or "enr_" + secrets.token_urlsafe(24)
        with self.lock:
            self.tokens[_digest(token)] = Token(account_id, group_id)
        return token

    def revoke(self, token: str) -> None:
        with self.lock:
            self.tokens[_digest(token)].revoked = True

    def add_devices(self, account_id: str, group_id: str, count: int) -> None:
        """Devices enrolled earlier (an account near its limit), without going through HTTP."""
        with self.lock:
            for _ in range(count):
                key = "pre-" + secrets.token_hex(8)
                self.records[(account_id, key)] = Device(key, account_id, group_id, {"id": key})

    def devices(self, account_id: str, group_id: str | None = None) -> list[Device]:
        with self.lock:
            return [d for (acct, _), d in self.records.items()
                    if acct == account_id and (group_id is None or d.group_id == group_id)]

    def enroll(self, authorization: str | None, body: bytes) -> tuple[int, dict]:
        """The console's decision for one request: (HTTP status, JSON answer)."""
        with self.lock:
            self.requests += 1
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return self._refuse(401, "missing_token", "an Authorization: Bearer <enrollment token> header is required")
            known = self.tokens.get(_digest(token.strip()))
            if known is None:
                return self._refuse(401, "unknown_token", "the enrollment token is not known to this console")
            if known.revoked:
                return self._refuse(401, "token_revoked", "the enrollment token was revoked")
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            account, group = (obj.get("account_id"), obj.get("group_id")) if isinstance(obj, dict) else (None, None)
            device = obj.get("device", {}) if isinstance(obj, dict) else None
            if not isinstance(account, str) or not isinstance(group, str) or not isinstance(device, dict):
                return self._refuse(400, "malformed", "the body must be a JSON object with string account_id and "
                                                      "group_id, and an object device if any")
            if (account, group) != (known.account_id, known.group_id):
                return self._refuse(403, "wrong_scope", "the enrollment token belongs to another account or group")
            key = device.get("id") or device.get("hostname")
            key = str(key) if key else "dev-" + secrets.token_hex(8)
            existing = self.records.get((account, key))
            if existing is not None:  # the same device enrolling again: not a new device
                existing.group_id, existing.device = group, device
                existing.enrollments += 1
                return 200, _answer(existing)
            count = sum(1 for acct, _ in self.records if acct == account)
            if count >= self.device_cap:
                return self._refuse(403, "device_limit",
                                    f"the account already has {count} devices, its limit is {self.device_cap}")
            record = self.records[(account, key)] = Device(key, account, group, device)
            return 200, _answer(record)

    def _refuse(self, status: int, error: str, reason: str) -> tuple[int, dict]:
        self.refusals.append(Refusal(status, error, reason))
        return status, {"error": error, "reason": reason}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _answer(d: Device) -> dict:
    return {"device_id": d.device_id, "account_id": d.account_id, "group_id": d.group_id}


# ------------------------------------------------------------------------------------ TLS


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a one-day development CA and its certificate for
    `localhost` and 127.0.0.1 (ECDSA P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Console Development CA")])

    def base(subject, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1)))

    ca = (base(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "console-ca.pem", directory / "console.pem", directory / "console.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


# ------------------------------------------------------------------------------------ server


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if not path.endswith(ENROLL):
            self._send(404, {"error": "not_found", "reason": f"no such endpoint {path}"})
            return
        if length > MAX_BODY:
            self._send(413, {"error": "too_large", "reason": f"the body is larger than {MAX_BODY} bytes"})
            return
        self._send(*self.server.state.enroll(self.headers.get("Authorization"), self.rfile.read(length)))

    def do_GET(self) -> None:  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if not url.path.endswith(DEVICES) or "account_id" not in query:
            self._send(404, {"error": "not_found", "reason": "GET /api/v1/devices?account_id=...[&group_id=...]"})
            return
        devices = self.server.state.devices(query["account_id"][0], query.get("group_id", [None])[0])
        self._send(200, {"devices": [{**_answer(d), "device": d.device} for d in devices]})

    def _send(self, status: int, answer: dict) -> None:
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # the test's output stays readable
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: ConsoleState


@dataclass
class TestConsole:
    state: ConsoleState
    port: int
    ca_pem: Path  # what the agent is told to trust
    _server: _Server
    _thread: threading.Thread

    __test__ = False  # not a pytest class

    @property
    def url(self) -> str:
        """The console URL an installer carries: the host name the certificate names."""
        return f"https://localhost:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_console(workdir: Path, *, device_cap: int = PRODUCT_DEVICE_CAP) -> TestConsole:
    """Serves on 127.0.0.1 (a free port) until `stop()`; `servers.running(...)` stops it for you."""
    ca, cert, key = make_tls(workdir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.state = ConsoleState(device_cap=device_cap)
    thread = threading.Thread(target=server.serve_forever, name="test-console", daemon=True)
    thread.start()
    return TestConsole(server.state, server.server_address[1], ca, server, thread)

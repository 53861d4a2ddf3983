"""A stand-in for Apple's notary service on 127.0.0.1, written from Apple's Notary API
documentation, plus the S3 upload it hands out and the public ticket lookup (CloudKit).

- POST /notary/v2/submissions   {"submissionName", "sha256"} -> data.id + data.attributes
                                (awsAccessKeyId, awsSecretAccessKey, awsSessionToken, bucket, object)
- PUT  /s3/<bucket>/<object>    the upload (path-style S3 PutObject); checks the access key id in
                                the SigV4 Authorization header, the session token and the payload hash
- GET  /notary/v2/submissions/<id>        data.attributes.status: "In Progress" for `polls`
                                          requests, then "Accepted" or "Invalid"
- GET  /notary/v2/submissions/<id>/logs   data.attributes.developerLogUrl
- GET  /logs/<id>.json          the developer log (status, statusSummary, issues[])
- POST /ticket/lookup           {"records": [{"recordName"}]} -> records[].fields.signedTicket

Every /notary call needs `Authorization: Bearer <JWT>`, checked as Apple documents it: ES256,
`kid` a known key id, `iss` its issuer, `aud` "appstoreconnect-v1", `exp` after now and at most
20 minutes after `iat`. A submission is accepted only when the uploaded bytes hash to the sha256
given at submission and `reject` is off. The record name of an accepted upload is computed here
from the bytes (xar: TOC checksum, read with struct; dmg: cdhash of its CodeDirectory).

Bounded: one ThreadingHTTPServer on 127.0.0.1, an ephemeral port, stopped by `close()`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from builder.binfmt.macho import koly_code_signature, parse_code_directory, superblob_entries


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def record_name_of(data: bytes) -> str:
    if data[:4] == b"xar!":
        _, header_size, _, toc_length, _, algorithm = struct.unpack(">4sHHQQI", data[:28])
        digest_type, size = {1: (1, 20), 3: (2, 32)}.get(algorithm, (1, 20))
        heap = header_size + toc_length
        return f"2/{digest_type}/{data[heap:heap + 20].hex()}"
    offset, size = koly_code_signature(data, "upload")
    blobs = superblob_entries(data[offset:offset + size], "upload")
    cd = parse_code_directory(blobs[0], "upload")
    return f"2/{cd.hash_type}/{cd.hash(blobs[0])[:20].hex()}"


@dataclass
class Submission:
    id: str
    name: str
    sha256: str
    access_key: str
    secret_key: str
    token: str
    bucket: str = "notary-submissions-prod"
    object: str = ""
    uploaded: bytes | None = None
    polls: int = 0
    status: str = "In Progress"


@dataclass
class NotaryStandIn:
    keys: dict[str, tuple[str, ec.EllipticCurvePublicKey]] = field(default_factory=dict)  # kid -> (issuer, key)
    polls: int = 2  # status requests answered "In Progress" before the verdict
    reject: bool = False
    submissions: dict[str, Submission] = field(default_factory=dict)
    tickets: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    jwt_claims: list[dict] = field(default_factory=list)

    def start(self) -> "NotaryStandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, doc: dict | None = None) -> None:
                body = json.dumps(doc or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                standin.requests.append(("POST", self.path))
                body = self._body()
                if self.path == "/ticket/lookup":
                    return self._send(200, standin.lookup(json.loads(body)))
                if self.path != "/notary/v2/submissions":
                    return self._send(404, {"errors": [{"status": "404", "code": "NOT_FOUND"}]})
                problem = standin.check_jwt(self.headers.get("Authorization", ""))
                if problem:
                    return self._send(401, {"errors": [{"status": "401", "code": "NOT_AUTHORIZED", "detail": problem}]})
                doc = json.loads(body)
                sub = Submission(id=str(uuid.uuid4()), name=doc["submissionName"], sha256=doc["sha256"],
                                 access_key="ASIA" + secrets.token_hex(8).upper(), secret_key=secrets.token_urlsafe(30),
                                 token=secrets.token_urlsafe(60))
                sub.object = f"prod/{sub.id}"
                standin.submissions[sub.id] = sub
                self._send(200, {"data": {"type": "newSubmissions", "id": sub.id, "attributes": {
                    "awsAccessKeyId": sub.access_key, "awsSecretAccessKey": sub.secret_key,
                    "awsSessionToken": sub.token, "bucket": sub.bucket, "object": sub.object}}, "meta": {}})

            def do_PUT(self) -> None:
                standin.requests.append(("PUT", self.path))
                body = self._body()
                sub = next((s for s in standin.submissions.values()
                            if self.path == f"/s3/{s.bucket}/{s.object}"), None)
                if sub is None:
                    return self._send(404)
                auth = self.headers.get("Authorization", "")
                declared = self.headers.get("x-amz-content-sha256")
                if (f"Credential={sub.access_key}/" not in auth or not auth.startswith("AWS4-HMAC-SHA256")
                        or self.headers.get("x-amz-security-token") != sub.token
                        or declared not in ("UNSIGNED-PAYLOAD", hashlib.sha256(body).hexdigest())):
                    return self._send(403)
                sub.uploaded = body
                self.send_response(200)
                self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')  # noqa: S324 - S3's ETag
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                standin.requests.append(("GET", self.path))
                if self.path.startswith("/logs/"):
                    sub = standin.submissions.get(self.path[len("/logs/"):-len(".json")])
                    return self._send(200, standin.developer_log(sub)) if sub else self._send(404)
                problem = standin.check_jwt(self.headers.get("Authorization", ""))
                if problem:
                    return self._send(401, {"errors": [{"status": "401", "code": "NOT_AUTHORIZED", "detail": problem}]})
                parts = self.path.split("/")  # "", notary, v2, submissions, id[, logs]
                sub = standin.submissions.get(parts[4]) if len(parts) >= 5 else None
                if sub is None:
                    return self._send(404, {"errors": [{"status": "404", "code": "NOT_FOUND"}]})
                if len(parts) == 6 and parts[5] == "logs":
                    return self._send(200, {"data": {"id": sub.id, "type": "submissionsLog", "attributes": {
                        "developerLogUrl": f"{standin.url}/logs/{sub.id}.json"}}, "meta": {}})
                standin.advance(sub)
                self._send(200, {"data": {"id": sub.id, "type": "submissions", "attributes": {
                    "status": sub.status, "name": sub.name, "createdDate": "2026-01-01T00:00:00.000Z"}}, "meta": {}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -- the service's rules
    def check_jwt(self, header: str) -> str | None:
        if not header.startswith("Bearer "):
            return "no bearer token"
        try:
            head_b64, claims_b64, sig_b64 = header[len("Bearer "):].split(".")
            head, claims = json.loads(_unb64(head_b64)), json.loads(_unb64(claims_b64))
            sig = _unb64(sig_b64)
        except ValueError:
            return "malformed token"
        if head.get("alg") != "ES256" or head.get("kid") not in self.keys:
            return "unknown key or algorithm"
        issuer, public_key = self.keys[head["kid"]]
        try:
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            public_key.verify(der, f"{head_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return "signature does not verify"
        now = time.time()
        if (claims.get("iss") != issuer or claims.get("aud") != "appstoreconnect-v1"
                or not claims.get("iat", 0) - 60 <= now < claims.get("exp", 0)
                or claims["exp"] - claims["iat"] > 1200):
            return "claims rejected"
        self.jwt_claims.append(claims)
        return None

    def advance(self, sub: Submission) -> None:
        if sub.status != "In Progress":
            return
        sub.polls += 1
        if sub.polls <= self.polls:
            return
        good = sub.uploaded is not None and hashlib.sha256(sub.uploaded).hexdigest() == sub.sha256
        if good and not self.reject:
            sub.status = "Accepted"
            name = record_name_of(sub.uploaded)
            self.tickets[name] = b"s8ch" + struct.pack("<I", 1) + hashlib.sha256(name.encode()).digest() + secrets.token_bytes(64)
        else:
            sub.status = "Invalid"

    def developer_log(self, sub: Submission) -> dict:
        issues = []
        if sub.status == "Invalid":
            issues = [{"severity": "error", "code": None, "path": sub.name,
                       "message": "The binary is not signed with a valid Developer ID certificate.",
                       "docUrl": None, "architecture": "x86_64"},
                      {"severity": "error", "code": None, "path": sub.name,
                       "message": "The signature does not include a secure timestamp.", "docUrl": None,
                       "architecture": "x86_64"}]
        return {"logFormatVersion": 1, "jobId": sub.id, "status": sub.status,
                "statusSummary": "Archive contains critical validation errors" if issues else "Ready for distribution",
                "statusCode": 4000 if issues else 0, "archiveFilename": sub.name, "uploadDate": "2026-01-01T00:00:00Z",
                "sha256": sub.sha256, "ticketContents": None, "issues": issues or None}

    def lookup(self, doc: dict) -> dict:
        records = []
        for record in doc.get("records", []):
            name = record.get("recordName")
            if name in self.tickets:
                records.append({"recordName": name, "recordType": "DeveloperIDTicket", "deleted": False,
                                "fields": {"signedTicket": {"type": "BYTES",
                                                            "value": base64.b64encode(self.tickets[name]).decode()}}})
            else:
                records.append({"recordName": name, "reason": "Record not found", "serverErrorCode": "NOT_FOUND"})
        return {"records": records}

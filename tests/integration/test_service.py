"""The installer service over HTTP, as the console calls it: a real uvicorn on 127.0.0.1 serving
`create_app` built the way `builder serve` builds it (`make_issuer`, API keys from a file), with a
signed test release published to local disk or to a real S3 server (SeaweedFS).

Tokens are never printed by these tests: leaks are checked as booleans.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from builder.errors import UsageError
from builder.signing.signers import Signers
from builder.service.app import ServiceSettings, create_app
from builder.service.issuer import Issuer
from builder.service.revocations import token_fingerprint
from builder.config import Environment
from builder.service.setup import RELEASES_PREFIX, ServiceOptions, api_keys_from, link_secret_of, make_issuer
from builder.signing import devca
from builder.signing.enrollment_key import DEV_KEY_NAME, FileEnrollmentKey, create_dev_key
from builder.release import Release
from builder.trust import verify as verify_signed
from builder.enrollment import Secret
from builder.signing.authenticode import SigningKey
from builder.storage import StorageSettings, open_store, publish_release
from builder.storage.links import sign_link
from tests.support.s3server import seaweedfs
from tests.support.servers import free_ports, stop_process
from tests.support.service import RELEASE_VERSION, build_release, problem, serve, signers_for

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
CONSOLE_KEY = secrets.token_hex(24)
OPS_KEY = secrets.token_hex(24)
ACCOUNT = "acct-svc-1"
SUFFIX = {"exe": ".exe", "msi": ".msi", "msi-tagged": ".msi"}


def new_token(label: str) -> str:
    """A fresh enrollment token (base64url characters), unique per use."""
    return f"{label}-{secrets.token_urlsafe(24)}"


def auth(key: str = CONSOLE_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- the service under test ----------------------------------------------------------------------


@dataclass
class Service:
    app: object
    issuer: Issuer
    settings: ServiceSettings
    state: Path
    base_url: str
    client: httpx.Client
    stops: list = field(default_factory=list)

    @property
    def store(self):
        return self.issuer.store

    def keys(self, prefix: str = "") -> set[str]:
        return {o.key for o in self.store.list(prefix)}

    def audit(self, **match) -> list[dict]:
        return [r for r in self.issuer.audit.rows() if all(r[k] == v for k, v in match.items())]

    def post(self, body: dict, key: str = CONSOLE_KEY) -> httpx.Response:
        return self.client.post("/v1/installers", json=body, headers=auth(key))

    def close(self) -> None:
        self.client.close()
        for stop in reversed(self.stops):
            stop()
        self.issuer.close()


def write_keys_file(folder: Path) -> Path:
    path = folder / "api-keys"
    path.write_text(f"# the console and the operators\nconsole:{CONSOLE_KEY}\nops:{OPS_KEY}\n")
    path.chmod(0o600)
    return path


def start_service(root: Path, storage_url: str, environ: dict, *, signers: Signers, ca: Path, publish: Path | None,
                  served: bool = True, enrollment_key="dev", **settings) -> Service:
    """The service as `builder serve` assembles it; `publish` uploads a release folder first.
    It signs enrollments with the development enrollment key beside `ca` unless told otherwise."""
    environ = {"BUILDER_API_KEYS_FILE": str(write_keys_file(root)), **environ}
    if enrollment_key == "dev":
        enrollment_key = FileEnrollmentKey(ca.parent / DEV_KEY_NAME)
    issuer = make_issuer(ServiceOptions(storage_url=storage_url, state_dir=root / "state", signers=signers, ca=ca,
                                        enrollment_key=enrollment_key), Environment.read(environ))
    if publish is not None:
        publish_release(publish, issuer.store, RELEASES_PREFIX, version=RELEASE_VERSION)
    service_settings = ServiceSettings(api_keys=api_keys_from(Environment.read(environ)), link_secret=link_secret_of(issuer), **settings)
    app = create_app(issuer, service_settings)
    stops = []
    if served:
        server = serve(app)
        running = server.__enter__()
        stops.append(lambda: server.__exit__(None, None, None))
        base_url = running.base_url
        client = httpx.Client(base_url=base_url, timeout=60)
    else:
        client = TestClient(app, base_url="http://testserver", raise_server_exceptions=False)
        base_url = "http://testserver"
    return Service(app, issuer, service_settings, root / "state", base_url, client, stops)


@pytest.fixture(scope="module")
def release_dir(dev_keys, test_payload, tmp_path_factory) -> Path:
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("service-release") / "release")


@pytest.fixture(scope="module")
def hmac_key() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def local(release_dir, dev_keys, hmac_key, tmp_path_factory):
    root = tmp_path_factory.mktemp("service-local")
    service = start_service(root, (root / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": hmac_key},
                            signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=release_dir)
    yield service
    service.close()


# -- helpers -------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def osslsigncode_verify(path: Path, ca: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["osslsigncode", "verify", "-CAfile", str(ca), "-in", str(path)],
                          capture_output=True, text=True, timeout=60)


def builder_verify(path: Path, ca: Path) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "builder", "verify", "--ca", str(ca), "--json", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, (json.loads(proc.stdout)[0] if proc.stdout.strip().startswith("[") else {})


def check_download(data: bytes, doc: dict, fmt: str, group: str, token: str, ca: Path, folder: Path) -> None:
    """Bytes as announced, signed by the development key, with the group stamped in."""
    assert sha256(data) == doc["sha256"] and len(data) == doc["size"]
    path = folder / f"{fmt}-{doc['id']}{SUFFIX[fmt]}"
    path.write_bytes(data)
    signed = osslsigncode_verify(path, ca)
    assert signed.returncode == 0, signed.stdout[-2000:] + signed.stderr[-2000:]
    proc, report = builder_verify(path, ca)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["enrollment"]["group_id"] == group and report["enrollment"]["account_id"] == ACCOUNT
    leaked = token in proc.stdout or token in proc.stderr
    assert not leaked, "builder verify printed the enrollment token"


def link_parts(url: str) -> tuple[str, dict]:
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


# -- end to end ----------------------------------------------------------------------------------


def test_end_to_end_on_local_storage(local, dev_keys, tmp_path):
    releases = local.client.get("/v1/releases", headers=auth())
    assert releases.status_code == 200
    assert releases.json() == {"releases": [RELEASE_VERSION], "latest": RELEASE_VERSION, "refused": {},
                               "latest_by_format": {"exe": RELEASE_VERSION, "msi": RELEASE_VERSION, "msi-tagged": RELEASE_VERSION}}

    token, group = new_token("e2e"), "group-e2e"
    ids = set()
    for fmt in ("exe", "msi", "msi-tagged"):
        body = {"account_id": ACCOUNT, "group_id": group, "token": token, "format": fmt}
        first = local.post(body)  # release defaults to "latest"
        assert first.status_code == 200, first.text
        doc = first.json()
        assert doc["status"] == "ready" and doc["release"] == RELEASE_VERSION and doc["format"] == fmt
        assert len(doc["sha256"]) == 64 and doc["size"] > 0
        ids.add(doc["id"])

        # The same request (with "latest" spelled out) is the same installer, not a new one.
        again = local.post({**body, "release": RELEASE_VERSION})
        assert again.status_code == 200
        assert (again.json()["id"], again.json()["sha256"]) == (doc["id"], doc["sha256"])
        assert link_parts(again.json()["url"])[0] == link_parts(doc["url"])[0]
        looked_up = local.client.get(f"/v1/installers/{doc['id']}", headers=auth())
        assert looked_up.status_code == 200
        assert {k: looked_up.json()[k] for k in ("id", "status", "sha256", "size")} == \
            {k: doc[k] for k in ("id", "status", "sha256", "size")}

        rec = local.issuer.record(doc["id"])
        assert rec.sha256 == doc["sha256"] and local.store.exists(rec.key)
        # On local storage the slot formats are streamed from the release object (a stamp
        # description is stored, not a 30 MB copy); a baked MSI is a stored installer.
        assert rec.streamed == (fmt in ("exe", "msi-tagged"))
        assert rec.key.startswith("stamps/" if rec.streamed else "installers/") and doc["sha256"] in rec.key

        # The download link needs no API key (a browser follows it): its HMAC is the credential.
        download = httpx.get(doc["url"], timeout=60)
        assert download.status_code == 200, download.text[:300]
        assert f"-{group}{SUFFIX[fmt]}" in download.headers["content-disposition"]
        check_download(download.content, doc, fmt, group, token, dev_keys.ca_cert, tmp_path)
    assert len(ids) == 3


def test_concurrent_identical_requests_stamp_once(local):
    token, group = new_token("race"), "group-race"
    body = {"account_id": ACCOUNT, "group_id": group, "token": token, "format": "exe"}
    store, issuer = local.store, local.issuer
    original_put, original_request = store.put_if_absent, issuer.request
    lock = threading.Lock()
    counts = {"puts": 0, "inside": 0, "most_inside": 0}

    def slow_put(key, *args, **kwargs):
        if key.startswith("stamps/"):  # the stamp itself (records are written with the same call)
            with lock:
                counts["puts"] += 1
            time.sleep(0.5)  # every other request arrives while the one stamp is still running
        return original_put(key, *args, **kwargs)

    def counting_request(*args, **kwargs):
        with lock:
            counts["inside"] += 1
            counts["most_inside"] = max(counts["most_inside"], counts["inside"])
        try:
            return original_request(*args, **kwargs)
        finally:
            with lock:
                counts["inside"] -= 1

    before = local.keys("stamps")
    n = 16
    barrier = threading.Barrier(n)
    answers: list = [None] * n

    def call(i: int) -> None:
        with httpx.Client(base_url=local.base_url, timeout=60) as client:
            barrier.wait(timeout=30)
            answers[i] = client.post("/v1/installers", json=body, headers=auth())

    store.put_if_absent, issuer.request = slow_put, counting_request
    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
    finally:
        store.put_if_absent, issuer.request = original_put, original_request

    assert all(a is not None and a.status_code == 200 for a in answers), [a and a.status_code for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1 and len({a.json()["sha256"] for a in answers}) == 1
    assert counts["most_inside"] > 1, "the requests did not overlap: the test proved nothing"
    assert counts["puts"] == 1, f"the installer was stamped {counts['puts']} times"
    assert len(local.keys("stamps") - before) == 1
    installer_id = answers[0].json()["id"]
    assert len(local.audit(installer_id=installer_id, action="issue")) == n


# -- authentication ------------------------------------------------------------------------------


def test_every_route_but_healthz_needs_an_api_key(local):
    checked = set()
    bad_headers = [{}, {"Authorization": f"Bearer {secrets.token_hex(24)}"}, {"Authorization": f"Basic {CONSOLE_KEY}"},
                   {"Authorization": "Bearer"}, {"Authorization": CONSOLE_KEY}]
    for route in local.app.routes:
        if not isinstance(route, APIRoute) or route.path == "/healthz" or route.path.startswith(local.settings.download_route):
            continue
        path = route.path.replace("{installer_id}", "0" * 32)
        for method in route.methods:
            for headers in bad_headers:
                # A body that would be valid, and one that would not: neither is looked at first.
                for body in ({"account_id": ACCOUNT, "group_id": "g-auth", "token": new_token("auth"), "format": "exe"}, {"x": 1}):
                    answer = local.client.request(method, path, json=body if method == "POST" else None, headers=headers)
                    problem(answer, 401, "unauthorized", None)
                    assert answer.headers.get("www-authenticate") == "Bearer", (method, path)
            checked.add((method, route.path))
    assert {("GET", "/metrics"), ("POST", "/v1/installers"), ("GET", "/v1/installers/{installer_id}"),
            ("GET", "/v1/releases"), ("POST", "/v1/revocations")} <= checked

    assert local.client.get("/healthz").status_code == 200
    # Both keys of the keys file work, and each is audited under its own name.
    for key, name in ((CONSOLE_KEY, "console"), (OPS_KEY, "ops")):
        assert local.client.get("/v1/releases", headers=auth(key)).status_code == 200
        answer = local.post({"account_id": ACCOUNT, "group_id": f"g-{name}", "token": new_token("k"), "format": "exe"}, key=key)
        assert answer.status_code == 200
        assert [r["caller"] for r in local.audit(installer_id=answer.json()["id"])] == [name]


def test_api_keys_file_rules(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"console:{CONSOLE_KEY}\nshort:abc\n")
    with pytest.raises(UsageError, match="shorter than 16"):
        api_keys_from(Environment.read({"BUILDER_API_KEYS_FILE": str(path)}))
    path.write_text("# nothing but a comment\n")
    with pytest.raises(UsageError, match="no API keys"):
        api_keys_from(Environment.read({"BUILDER_API_KEYS_FILE": str(path)}))
    with pytest.raises(UsageError, match="cannot read"):
        api_keys_from(Environment.read({"BUILDER_API_KEYS_FILE": str(tmp_path / "missing")}))
    keys = api_keys_from(Environment.read({"BUILDER_API_KEYS_FILE": str(write_keys_file(tmp_path))}))
    assert sorted(keys.values()) == ["console", "ops"]
    assert CONSOLE_KEY not in json.dumps(keys)  # only digests are kept


# -- bad input -----------------------------------------------------------------------------------

BAD_TOKEN = new_token("badinput")
GOOD = {"account_id": ACCOUNT, "group_id": "group-bad", "token": BAD_TOKEN, "format": "exe"}
BIG = json.dumps({**GOOD, "console_url": "https://c.example.com/" + "a" * 100_000}).encode()

BAD_POSTS = [
    # (case, body as dict or raw bytes, status, code, field, a word the message must hold)
    ("unknown format", {**GOOD, "format": "rpm"}, 422, "invalid_field", "format", "format"),
    ("format not in the release", {**GOOD, "format": "pkg"}, 404, "format_not_in_release", "format", "pkg"),
    ("format not in the named release", {**GOOD, "format": "dmg", "release": RELEASE_VERSION}, 404,
     "format_not_in_release", "format", RELEASE_VERSION),
    ("unknown release", {**GOOD, "release": "9.9.9"}, 404, "unknown_release", "release", "9.9.9"),
    ("release not a version", {**GOOD, "release": "../1.0.0"}, 404, "unknown_release", "release", "release"),
    ("malformed JSON", b'{"account_id": "a", ', 422, "invalid_json", None, "json"),
    ("JSON not an object", b'["exe"]', 422, "invalid_field", None, "body"),
    ("extra field", {**GOOD, "admin": True}, 422, "invalid_field", "admin", "admin"),
    ("missing token", {k: v for k, v in GOOD.items() if k != "token"}, 422, "invalid_field", "token", "token"),
    ("group with ../", {**GOOD, "group_id": "../../etc"}, 422, "invalid_field", "group_id", "group_id"),
    ("group with /", {**GOOD, "group_id": "a/b"}, 422, "invalid_field", "group_id", "group_id"),
    ("group with backslash", {**GOOD, "group_id": "a\\b"}, 422, "invalid_field", "group_id", "group_id"),
    ("group with unicode", {**GOOD, "group_id": "gruppe-ü"}, 422, "invalid_field", "group_id", "group_id"),
    ("group with NUL", {**GOOD, "group_id": "g\x00x"}, 422, "invalid_field", "group_id", "group_id"),
    ("group with newline", {**GOOD, "group_id": "g\nx"}, 422, "invalid_field", "group_id", "group_id"),
    ("account with ../", {**GOOD, "account_id": "../x"}, 422, "invalid_field", "account_id", "account_id"),
    ("account with control char", {**GOOD, "account_id": "a\x1bb"}, 422, "invalid_field", "account_id", "account_id"),
    ("token with double quotes", {**GOOD, "token": BAD_TOKEN + '"x'}, 422, "invalid_field", "token", "token"),
    ("token with single quote", {**GOOD, "token": BAD_TOKEN + "'x"}, 422, "invalid_field", "token", "token"),
    ("token with space", {**GOOD, "token": BAD_TOKEN + " x"}, 422, "invalid_field", "token", "token"),
    ("token with surrogate", ('{"account_id": "%s", "group_id": "g", "format": "exe", "token": "%s\\ud800"}'
                              % (ACCOUNT, BAD_TOKEN)).encode(), 422, "invalid_field", "token", "token"),
    ("console URL not https", {**GOOD, "console_url": "javascript:alert(1)"}, 422, "invalid_field", "console_url", "console_url"),
    ("100 KB body", BIG, 413, "body_too_large", None, "65536"),
]


@pytest.mark.parametrize("case, body, status, code, field, word", BAD_POSTS, ids=[c[0] for c in BAD_POSTS])
def test_bad_requests_are_refused_and_write_nothing(local, case, body, status, code, field, word):
    before, audited = local.keys(), len(local.issuer.audit.rows())
    if isinstance(body, bytes):
        answer = local.client.post("/v1/installers", content=body,
                                   headers={**auth(), "Content-Type": "application/json"})
    else:
        answer = local.post(body)
    error = problem(answer, status, code, field)
    assert word.lower() in error.lower(), error
    leaked = BAD_TOKEN in answer.text
    assert not leaked, "the error answer carries the token"
    assert local.keys() == before
    # Nothing is written but the refusal's audit row (none when the framework refused the body
    # before the service read it), and that row never holds the token.
    rows = local.issuer.audit.rows()[audited:]
    assert len(rows) <= 1 and all(r["action"] == "refused" and r["detail"] == code for r in rows), rows
    leaked = any(BAD_TOKEN in json.dumps(r) for r in rows)
    assert not leaked, "the audit row carries the token"


def test_refusals_are_audited_and_listed_by_builder_issued(local):
    group = "group-refused"
    answer = local.post({**GOOD, "group_id": group, "console_url": "https://elsewhere.example.org/x"})
    problem(answer, 422, answer.json()["code"], "console_url")
    [row] = [r for r in local.issuer.audit.rows() if r["group_id"] == group]
    assert (row["action"], row["account_id"], row["format"], row["detail"]) == ("refused", ACCOUNT, "exe", answer.json()["code"])
    # A token sent where an id goes is not written to the audit log.
    answer = local.post({**GOOD, "account_id": BAD_TOKEN + " x", "group_id": group})
    assert answer.status_code == 422
    rows = [r for r in local.issuer.audit.rows() if r["action"] == "refused"]
    leaked = any(BAD_TOKEN in json.dumps(r) for r in rows)
    assert not leaked, "an id holding the token reached the audit log"
    listed = subprocess.run([sys.executable, "-m", "builder", "issued", "--state", str(local.state), "--account-id", ACCOUNT,
                             "--group-id", group, "--json"], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert listed.returncode == 0, listed.stderr
    assert [r["action"] for r in json.loads(listed.stdout)] == ["refused"]


def test_oversized_body_without_length_is_refused(local):
    before = local.keys()

    def chunks():
        for _ in range(100):
            yield b" " * 1024  # JSON whitespace: only the size is wrong
        yield json.dumps(GOOD).encode()

    answer = local.client.post("/v1/installers", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
    assert answer.status_code == 413 and "65536" in answer.json()["error"]
    assert local.keys() == before


@pytest.mark.parametrize("installer_id, status", [
    ("not-hex", 404), ("0" * 31 + "g", 404), ("A" * 32, 404), ("0" * 33, 404), ("0" * 32, 404),
    ("..%2F..%2Fetc%2Fpasswd", 404), ("%E2%80%AE" + "0" * 30, 404),
])
def test_bad_installer_ids(local, installer_id, status):
    answer = local.client.get(f"/v1/installers/{installer_id}", headers=auth())
    problem(answer, status, "not_found", None)


# -- token lifecycle -----------------------------------------------------------------------------


def test_revoke_then_rotate(local, tmp_path):
    old, new, group = new_token("old"), new_token("rotated"), "group-rotate"
    body = {"account_id": ACCOUNT, "group_id": group, "token": old, "format": "exe"}
    issued = local.post(body)
    assert issued.status_code == 200
    installer_id, url = issued.json()["id"], issued.json()["url"]
    assert httpx.get(url, timeout=60).status_code == 200

    revoked = local.client.post("/v1/revocations", json={"account_id": ACCOUNT, "group_id": group, "token": old}, headers=auth())
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    old_fp = token_fingerprint(Secret(old))
    assert revoked.json()["token_fingerprint"] == "sha256:" + old_fp[:16]

    gone = local.client.get(f"/v1/installers/{installer_id}", headers=auth())
    assert "revoked" in problem(gone, 410, "installer_revoked", None)
    problem(httpx.get(url, timeout=60), 410, "installer_revoked", None)  # a link handed out before the revocation
    refused = local.post(body)
    assert "revoked" in problem(refused, 403, "token_revoked", "token")
    assert local.post({**body, "format": "msi-tagged"}).status_code == 403  # every format

    rotated = local.post({**body, "token": new})
    assert rotated.status_code == 200 and rotated.json()["id"] != installer_id
    assert httpx.get(rotated.json()["url"], timeout=60).status_code == 200
    # A revoked token is dead everywhere: under another group or account too (issue 10).
    assert local.post({**body, "group_id": "group-rotate-other"}).status_code == 403
    assert local.post({**body, "account_id": ACCOUNT + "-other"}).status_code == 403

    old_actions = [(r["action"], r["caller"]) for r in local.audit(token_fingerprint=old_fp, group_id=group)]
    assert old_actions[0] == ("issue", "console") and ("revoke", "console") in old_actions
    # the GET, both POSTs and the other account's POST for this group id
    assert sum(1 for a, _ in old_actions if a == "refused-revoked") == 4
    new_fp = token_fingerprint(Secret(new))
    assert [r["action"] for r in local.audit(token_fingerprint=new_fp)] == ["issue"]

    # The raw tokens are nowhere in the audit database (nor its WAL), nor in records or revocations.
    audit_bytes = b"".join(p.read_bytes() for p in local.state.glob("audit.sqlite*"))
    assert audit_bytes and old_fp.encode() in audit_bytes  # the check below reads the right bytes
    leaked = any(t.encode() in audit_bytes for t in (old, new))
    assert not leaked, "a raw token is in the audit database"
    kept = b"".join(local.store.get(k) for k in local.keys() if k.startswith(("records/", "revocations/")))
    leaked = any(t.encode() in kept for t in (old, new))
    assert not leaked, "a raw token is in a record or revocation object"


# -- download links ------------------------------------------------------------------------------


def test_download_links_refuse_tampering_and_expire(local):
    answer = local.post({"account_id": ACCOUNT, "group_id": "group-links", "token": new_token("links"), "format": "exe"})
    assert answer.status_code == 200
    installer_id, url = answer.json()["id"], answer.json()["url"]
    path, query = link_parts(url)
    base = local.base_url
    assert httpx.get(url, timeout=60).status_code == 200

    flipped = query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")
    other = local.post({"account_id": ACCOUNT, "group_id": "group-links-2", "token": new_token("links"), "format": "exe"})
    tampered = [
        f"{base}{path}?exp={query['exp']}&sig={flipped}",  # signature changed
        f"{base}{path}?exp={int(query['exp']) + 3600}&sig={query['sig']}",  # expiry pushed back
        f"{base}{path}?exp={query['exp']}",  # no signature
        f"{base}{path}",
        f"{base}{local.settings.download_route}/{other.json()['id']}?exp={query['exp']}&sig={query['sig']}",  # other id
        f"{base}{path}?exp=abc&sig={query['sig']}",
    ]
    for link in tampered:
        refused = httpx.get(link, timeout=60)
        assert problem(refused, 403, "invalid_link", None) == "invalid download link", link

    expired = sign_link(local.settings.link_secret, installer_id, int(time.time()) - 5, route=local.settings.download_route)
    answer = httpx.get(base + expired, timeout=60)
    assert "expired" in problem(answer, 410, "link_expired", None)
    # A link signed with another key is refused as invalid, not reported as expired.
    foreign = sign_link(b"k" * 32, installer_id, int(time.time()) - 5, route=local.settings.download_route)
    assert httpx.get(base + foreign, timeout=60).status_code == 403


def test_short_lived_links_expire(local):
    """A service configured with a 1 s link lifetime: its links stop working after it."""
    settings = ServiceSettings(api_keys=local.settings.api_keys, link_secret=local.settings.link_secret, link_ttl_s=1)
    with TestClient(create_app(local.issuer, settings), raise_server_exceptions=False) as client:
        answer = client.post("/v1/installers", headers=auth(),
                             json={"account_id": ACCOUNT, "group_id": "group-ttl", "token": new_token("ttl"), "format": "exe"})
        assert answer.status_code == 200
        path, query = link_parts(answer.json()["url"])
        assert int(query["exp"]) - time.time() <= 1
        deadline = time.monotonic() + 5
        while client.get(f"{path}?exp={query['exp']}&sig={query['sig']}").status_code == 200:
            assert time.monotonic() < deadline, "the link did not expire"
            time.sleep(0.1)
        assert client.get(f"{path}?exp={query['exp']}&sig={query['sig']}").status_code == 410


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_need_a_key_and_count_requests(local):
    assert local.client.get("/metrics").status_code == 401
    assert local.post({"account_id": ACCOUNT, "group_id": "group-metrics", "token": new_token("m"), "format": "exe"}).status_code == 200
    answer = local.client.get("/metrics", headers=auth())
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert 'builder_http_requests_total{route="/v1/installers",status="200"}' in text
    assert 'builder_http_requests_total{route="/metrics",status="401"}' in text
    assert 'builder_issue_seconds_count{format="exe",status="ready"}' in text
    assert 'builder_issue_seconds_bucket{format="exe",le="0.5",status="ready"}' in text


# -- signing failure -----------------------------------------------------------------------------


def test_signing_failure_is_a_clear_5xx_and_publishes_nothing(release_dir, dev_keys, hmac_key, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    cert, key = keys / "codesign.pem", keys / "codesign.key"
    shutil.copyfile(dev_keys.sign_cert, cert)
    shutil.copyfile(dev_keys.sign_key, key)
    signers = Signers(authenticode=SigningKey(cert=cert, key=key), verify_ca=dev_keys.ca_cert)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")  # broken after start

    service = start_service(tmp_path, (tmp_path / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": hmac_key},
                            signers=signers, ca=dev_keys.ca_cert, publish=release_dir, served=False)
    try:
        token = new_token("sign")
        body = {"account_id": ACCOUNT, "group_id": "group-sign", "token": token, "format": "msi"}
        failed = service.post(body)
        error = problem(failed, 500, "signing_failed", None)
        assert "sign" in error.lower() and "key" in error.lower(), error
        leaked = token in failed.text
        assert not leaked
        assert service.keys("installers") == set() and service.keys("records") == set()
        assert service.audit(action="issue") == []

        # Formats that are not re-signed still work with the broken key ...
        assert service.post({**body, "format": "exe"}).status_code == 200
        # ... and a repaired key works at once: the failure was not remembered.
        shutil.copyfile(dev_keys.sign_key, key)
        fixed = service.post(body)
        assert fixed.status_code == 200 and fixed.json()["status"] == "ready"
    finally:
        service.close()


# -- S3 (SeaweedFS) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3server(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def s3_environ(s3, endpoint: str | None = None) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint or s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": s3.region}


@pytest.fixture(scope="module")
def on_s3(s3server, release_dir, dev_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("service-s3")
    service = start_service(root, s3server.url("svc"), s3_environ(s3server), signers=signers_for(dev_keys),
                            ca=dev_keys.ca_cert, publish=release_dir)
    yield service
    service.close()


def test_end_to_end_on_s3(on_s3, dev_keys, tmp_path):
    assert on_s3.client.get("/v1/releases", headers=auth()).json()["releases"] == [RELEASE_VERSION]
    token, group = new_token("s3"), "group-s3"
    for fmt in ("exe", "msi", "msi-tagged"):
        body = {"account_id": ACCOUNT, "group_id": group, "token": token, "format": fmt}
        first = on_s3.post(body)
        assert first.status_code == 200, first.text
        doc = first.json()
        path, query = link_parts(doc["url"])
        rec = on_s3.issuer.record(doc["id"])
        # A presigned URL of the S3 server itself, for the content-addressed object.
        assert doc["url"].startswith(on_s3.store.settings.s3_endpoint) and path.endswith(rec.key)
        assert "X-Amz-Signature" in query

        again = on_s3.post(body)
        assert (again.json()["id"], again.json()["sha256"]) == (doc["id"], doc["sha256"])
        assert link_parts(again.json()["url"])[0] == path
        assert on_s3.client.get(f"/v1/installers/{doc['id']}", headers=auth()).json()["sha256"] == doc["sha256"]

        download = httpx.get(doc["url"], timeout=60)
        assert download.status_code == 200
        check_download(download.content, doc, fmt, group, token, dev_keys.ca_cert, tmp_path)

        bad = doc["url"].replace(query["X-Amz-Signature"], "0" * len(query["X-Amz-Signature"]))
        assert httpx.get(bad, timeout=60).status_code == 403
    assert len(on_s3.keys("installers")) == 3


def test_expired_presigned_url_is_refused(on_s3):
    settings = ServiceSettings(api_keys=on_s3.settings.api_keys, link_secret=on_s3.settings.link_secret, link_ttl_s=1)
    with TestClient(create_app(on_s3.issuer, settings), raise_server_exceptions=False) as client:
        answer = client.post("/v1/installers", headers=auth(),
                             json={"account_id": ACCOUNT, "group_id": "group-s3-ttl", "token": new_token("s3ttl"), "format": "exe"})
    assert answer.status_code == 200
    url = answer.json()["url"]
    deadline = time.monotonic() + 6
    while httpx.get(url, timeout=60).status_code == 200:
        assert time.monotonic() < deadline, "the presigned URL did not expire"
        time.sleep(0.25)
    refused = httpx.get(url, timeout=60)
    assert refused.status_code == 403 and b"expired" in refused.content.lower()


def test_unreachable_storage_is_503_with_retry_after(s3server, dev_keys, tmp_path):
    (closed,) = free_ports(1)  # nothing listens there
    service = start_service(tmp_path, "s3://test/svc", s3_environ(s3server, f"http://127.0.0.1:{closed}"),
                            signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=None, served=False)
    try:
        body = {"account_id": ACCOUNT, "group_id": "group-down", "token": new_token("down"), "format": "exe"}
        for answer in (service.post(body), service.post({**body, "release": RELEASE_VERSION}),
                       service.client.get("/v1/releases", headers=auth()),
                       service.client.get(f"/v1/installers/{'0' * 32}", headers=auth())):
            assert "unreachable" in problem(answer, 503, "storage_unavailable", None)
            assert int(answer.headers["retry-after"]) > 0
        assert service.issuer.audit.rows() == []
        assert not list((service.state / "cache").glob("releases/*"))
    finally:
        service.close()


def test_storage_going_away_is_503_and_recorded_nowhere(release_dir, dev_keys, tmp_path):
    """A service that has served from S3 loses it: new requests get 503 + Retry-After, no audit row."""
    with seaweedfs(tmp_path / "weed") as s3:
        service = start_service(tmp_path, s3.url("svc"), s3_environ(s3), signers=signers_for(dev_keys),
                                ca=dev_keys.ca_cert, publish=release_dir, served=False)
        try:
            body = {"account_id": ACCOUNT, "group_id": "group-away", "token": new_token("away"), "format": "exe"}
            assert service.post(body).status_code == 200  # the release is now cached by the service
            rows = service.issuer.audit.rows()
            s3.stop()
            for fmt in ("exe", "msi"):
                answer = service.post({**body, "group_id": "group-away-2", "format": fmt})
                problem(answer, 503, "storage_unavailable", None)
                assert int(answer.headers["retry-after"]) > 0, answer.text[:300]
            assert service.issuer.audit.rows() == rows
        finally:
            service.close()


def test_unknown_paths_and_methods_answer_in_the_same_error_format(local):
    for method, path, status, code in (("GET", "/nope", 404, "not_found"), ("GET", "/v1/installers/a/b", 404, "not_found"),
                                       ("PUT", "/v1/installers", 405, "method_not_allowed"),
                                       ("DELETE", f"/v1/installers/{'0' * 32}", 405, "method_not_allowed")):
        problem(local.client.request(method, path, headers=auth()), status, code, None)


# -- signed enrollments (the repointing attacks) ------------------------------------------------


@pytest.mark.parametrize("console_url, why", [
    ("https://attacker.example/", "not among the pinned console hosts"),
    ("https://user:pass@console.example.com/", "user information"),
    ("https://console.example.com@attacker.example/", "user information"),
    ("https://203.0.113.7/", "not an IP address"),
    ("http://console.example.com/", "https"),
    ("https://console.example.com:8443/", "not among the pinned console hosts"),
])
def test_console_urls_the_agents_would_refuse_are_422_naming_console_url(local, console_url, why):
    for fmt in ("exe", "msi"):
        body = {"account_id": ACCOUNT, "group_id": "group-repoint", "token": new_token("repoint"), "format": fmt,
                "console_url": console_url}
        error = problem(local.post(body), 422, "invalid_field", "console_url")
        assert "console_url" in error and why in error
        enrollment = local.client.post("/v1/enrollments", json={k: v for k, v in body.items() if k != "format"},
                                       headers=auth())
        assert "console_url" in problem(enrollment, 422, "invalid_field", "console_url")


def test_the_audit_log_records_the_enrollment_key_that_signed(local, dev_keys):
    body = {"account_id": ACCOUNT, "group_id": "group-audit-kid", "token": new_token("kid"), "format": "exe"}
    assert local.post(body).status_code == 200
    kid = FileEnrollmentKey(dev_keys.folder / DEV_KEY_NAME).kid
    rows = [r for r in local.issuer.audit.rows() if r["group_id"] == "group-audit-kid" and r["action"] == "issue"]
    assert rows and rows[0]["detail"] == f"key_id={kid}"


def test_post_enrollments_gives_a_signed_enrollment_and_the_msiexec_line(local, release_dir, tmp_path):
    token = new_token("generic")
    body = {"account_id": ACCOUNT, "group_id": "group-generic", "token": token}
    answer = local.client.post("/v1/enrollments", json=body, headers=auth())
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    # Verified with the release's own pins, as the agent of that release's MSI will.
    rel = Release.open(release_dir, verify=False)
    signed = verify_signed(doc["enrollment"], rel.trust(), int(time.time()))
    assert (signed.account_id, signed.group_id, signed.token.reveal() == token) == (ACCOUNT, "group-generic", True)
    assert doc["key_id"] == signed.key_id and doc["release"] == RELEASE_VERSION
    assert doc["msiexec"] == f"msiexec /i {rel.file('msi').path.name} ENROLLMENT={doc['enrollment']} /qn"
    # A revoked token gets no enrollment either.
    assert local.client.post("/v1/revocations", json=body, headers=auth()).status_code == 200
    refused = local.client.post("/v1/enrollments", json=body, headers=auth())
    assert refused.status_code == 403


def test_a_service_without_an_enrollment_key_answers_503(release_dir, dev_keys, hmac_key, tmp_path):
    service = start_service(tmp_path, (tmp_path / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": hmac_key},
                            signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=release_dir,
                            served=False, enrollment_key=None)
    try:
        body = {"account_id": ACCOUNT, "group_id": "group-nokey", "token": new_token("nokey"), "format": "exe"}
        answer = service.post(body)
        assert "enrollment key" in problem(answer, 503, "not_configured", None)
        enrollment = service.client.post("/v1/enrollments", json={k: v for k, v in body.items() if k != "format"},
                                         headers=auth())
        assert "enrollment key" in problem(enrollment, 503, "not_configured", None)
    finally:
        service.close()


# -- configuration the service lacks: 503 not_configured, in service terms ------------------------


def test_a_baked_msi_without_a_code_signing_key_is_503_not_configured(release_dir, dev_keys, hmac_key, tmp_path):
    """Issue 12: the service was started without Authenticode keys (what `serve` does with no
    --sign-* options): the baked msi is refused up front, saying what the operator must configure."""
    service = start_service(tmp_path, (tmp_path / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": hmac_key},
                            signers=Signers(verify_ca=dev_keys.ca_cert), ca=dev_keys.ca_cert, publish=release_dir,
                            served=False)
    try:
        token = new_token("nosign")
        body = {"account_id": ACCOUNT, "group_id": "group-nosign", "token": token, "format": "msi"}
        error = problem(service.post(body), 503, "not_configured", None)
        assert "Authenticode" in error and "operators must configure" in error and "msi-tagged" in error, error
        leaked = token in error
        assert not leaked
        assert service.keys("installers") == set() and service.keys("records") == set()
        # The formats stamped into their slot need no key.
        for fmt in ("exe", "msi-tagged"):
            assert service.post({**body, "format": fmt}).status_code == 200
    finally:
        service.close()


def test_a_release_that_does_not_pin_the_services_enrollment_key_is_503_not_configured(release_dir, dev_keys, hmac_key,
                                                                                        tmp_path):
    keys = tmp_path / "other-enrollment-key"
    keys.mkdir()
    service = start_service(tmp_path, (tmp_path / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": hmac_key},
                            signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=release_dir, served=False,
                            enrollment_key=FileEnrollmentKey(create_dev_key(keys)))
    try:
        body = {"account_id": ACCOUNT, "group_id": "group-unpinned", "token": new_token("unpinned")}
        for answer in (service.post({**body, "format": "exe"}),
                       service.client.post("/v1/enrollments", json=body, headers=auth())):
            error = problem(answer, 503, "not_configured", None)
            assert f"release {RELEASE_VERSION} does not pin this service's enrollment key" in error
    finally:
        service.close()


# -- several releases: `latest` per format, a release that does not verify ------------------------


@pytest.fixture(scope="module")
def windows_only_release(dev_keys, test_payload, tmp_path_factory) -> Path:
    """1.0.1: an exe only (a Windows-only patch release)."""
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("release-1.0.1") / "release", formats=("exe",),
                         version="1.0.1")


@pytest.fixture(scope="module")
def foreign_release(dev_keys, test_payload, tmp_path_factory) -> Path:
    """1.0.2: exe and msi signed under another CA than the one the service trusts."""
    other_ca = devca.create(tmp_path_factory.mktemp("other-ca"))
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("release-1.0.2") / "release",
                         formats=("exe", "msi"), version="1.0.2", signed_by=other_ca)


def publish_all(store, *folders: Path) -> None:
    for folder in folders:
        publish_release(folder, store, RELEASES_PREFIX, version=Release.open(folder, verify=False).version)


def test_latest_is_the_newest_release_holding_the_format(release_dir, windows_only_release, dev_keys, hmac_key, tmp_path):
    """Issue 12: after a Windows-only 1.0.1, `latest` still gives the formats 1.0.1 lacks, from
    1.0.0; a named release without the format stays a 404 naming both."""
    service = start_service(tmp_path, (tmp_path / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": hmac_key},
                            signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=None, served=False)
    try:
        publish_all(service.store, release_dir, windows_only_release)
        body = {"account_id": ACCOUNT, "group_id": "group-latest", "token": new_token("latest")}
        for fmt, newest in (("exe", "1.0.1"), ("msi", RELEASE_VERSION), ("msi-tagged", RELEASE_VERSION)):
            answer = service.post({**body, "format": fmt})  # release defaults to latest
            assert answer.status_code == 200, answer.text[:300]
            assert (answer.json()["format"], answer.json()["release"]) == (fmt, newest)
        error = problem(service.post({**body, "format": "msi", "release": "1.0.1"}), 404, "format_not_in_release", "format")
        assert "release 1.0.1 has no msi installer" in error and "exe" in error, error
        releases = service.client.get("/v1/releases", headers=auth()).json()
        assert releases == {"releases": [RELEASE_VERSION, "1.0.1"], "latest": "1.0.1", "refused": {},
                            "latest_by_format": {"exe": "1.0.1", "msi": RELEASE_VERSION, "msi-tagged": RELEASE_VERSION}}
        # An enrollment is for `msiexec /i` the release's MSI: the newest release with one.
        enrollment = service.client.post("/v1/enrollments", json=body, headers=auth())
        assert enrollment.status_code == 200 and enrollment.json()["release"] == RELEASE_VERSION
    finally:
        service.close()


def test_serve_starts_with_a_release_that_does_not_verify_and_serves_the_others(
        release_dir, windows_only_release, foreign_release, dev_keys, hmac_key, tmp_path):
    """Issue 12: `builder serve` over a store where 1.0.2 is signed under another CA starts,
    says so in one log line, in /healthz and in /metrics, refuses requests naming 1.0.2 and
    skips it for `latest`."""
    store_url = (tmp_path / "store").as_uri()
    publish_all(open_store(store_url, StorageSettings()), release_dir, windows_only_release, foreign_release)
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BUILDER_API_KEYS": f"console:{CONSOLE_KEY}",
           "BUILDER_STORAGE_HMAC_KEY": hmac_key, "COLUMNS": "80"}
    cmd = [sys.executable, "-m", "builder", "serve", "--host", "127.0.0.1", "--port", str(port), "--storage", store_url,
           "--state", str(tmp_path / "state"), "--enrollment-key", str(dev_keys.folder / DEV_KEY_NAME),
           "--ca", str(dev_keys.ca_cert)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "serve did not answer /healthz within 60 s"
            try:
                health = httpx.get(f"{base}/healthz", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)

        assert health.status_code == 200
        doc = health.json()
        assert doc["status"] == "degraded" and doc["releases"]["ok"] == [RELEASE_VERSION, "1.0.1"]
        assert list(doc["releases"]["refused"]) == ["1.0.2"]
        refused = doc["releases"]["refused"]["1.0.2"]
        assert refused["reason"] == "signature" and "does not verify" in refused["error"]
        assert str(tmp_path) not in health.text  # no path of the service's host without a key

        # One line at start, naming the release and why (the operator's log may name paths).
        lines = [ln for ln in log_path.read_text().splitlines() if "1.0.2" in ln]
        refusal_lines = [ln for ln in lines if "release 1.0.2 is refused" in ln]
        assert len(refusal_lines) == 1 and "signing root" in refusal_lines[0], log_path.read_text()[-3000:]

        metrics = httpx.get(f"{base}/metrics", headers=auth(), timeout=10).text
        assert 'builder_release_refused{reason="signature",version="1.0.2"} 1.0' in metrics
        assert "builder_releases_verified 2.0" in metrics

        body = {"account_id": ACCOUNT, "group_id": "group-foreign", "token": new_token("foreign"), "format": "exe"}
        named = httpx.post(f"{base}/v1/installers", json={**body, "release": "1.0.2"}, headers=auth(), timeout=60)
        assert "release 1.0.2 does not verify" in problem(named, 503, "release_refused", "release")
        for fmt, served in (("exe", "1.0.1"), ("msi-tagged", RELEASE_VERSION)):
            latest = httpx.post(f"{base}/v1/installers", json={**body, "format": fmt}, headers=auth(), timeout=60)
            assert latest.status_code == 200 and latest.json()["release"] == served, latest.text[:300]
        releases = httpx.get(f"{base}/v1/releases", headers=auth(), timeout=10).json()
        assert releases["releases"] == [RELEASE_VERSION, "1.0.1"] and list(releases["refused"]) == ["1.0.2"]
        leaked = body["token"] in log_path.read_text()
        assert not leaked
    finally:
        stop_process(proc)

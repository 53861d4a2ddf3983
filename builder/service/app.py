"""The HTTP service behind the console's "download installer" button (FastAPI).

Every route but /healthz needs a bearer API key. Every error answer is `{"error": one sentence,
"code": a stable snake_case code, "field": the request field concerned or null}`
(builder.service.problems): bad input is a 4xx, never a 500; storage or queue trouble is a 503
with Retry-After; what the service was not configured for is a 503 `not_configured`. Tokens
arrive in request bodies only and leave the process only inside installers: they are not
logged, audited or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from builder import __version__, log
from builder import enrollment as enrollment_rules
from builder.enrollment import MAX_TOKEN_BYTES, Enrollment, Secret, validate_id, validate_token
from builder.errors import BuilderError, UsageError
from builder.service import installers
from builder.service.issuer import FORMATS, Issuer
from builder.service.problems import CODE_OF_STATUS, CODES, Problem, ReleaseRefused, describe
from builder.service.records import Record
from builder.storage import LinkStatus
from builder.storage.links import check_link, sign_link

MAX_BODY_BYTES = 64 * 1024
_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    # sha256(key) -> caller name: the keys themselves are not kept.
    api_keys: dict[str, str]
    link_secret: bytes
    link_ttl_s: int = 3600
    # How long POST /v1/installers waits for the installer before answering 202 ...
    wait_s: float = 20.0
    # ... and, with workers, for one of them to take the job: an idle worker takes it within
    # milliseconds (and makes an exe or msi-tagged in milliseconds more); with none registered
    # the answer is a 202 at once.
    pickup_s: float = 0.5
    download_route: str = "/v1/download"
    # Lifetime of an enrollment from POST /v1/enrollments (None: it does not expire).
    enrollment_ttl_s: int | None = None
    extra: dict = field(default_factory=dict)

    @staticmethod
    def parse_api_keys(text: str) -> dict[str, str]:
        """Entries separated by commas or newlines: `name:key` or just `key` (named by its hash)."""
        out = {}
        for raw in re.split(r"[,\n]", text):
            raw = raw.strip()
            if not raw or raw.startswith("#"):
                continue
            name, sep, key = raw.partition(":")
            if not sep:
                name, key = "", raw
            if len(key) < 16:
                raise UsageError("an API key is shorter than 16 characters", "use long random keys (openssl rand -hex 32)")
            log.register_secret(key, permanent=True)
            digest = hashlib.sha256(key.encode()).hexdigest()
            out[digest] = name or f"key-{digest[:8]}"
        if not out:
            raise UsageError("no API keys configured", "set BUILDER_API_KEYS or BUILDER_API_KEYS_FILE")
        return out


# The enrollment's rules, stated in the OpenAPI document for the console's developers. Only
# documented here: builder.enrollment checks them, with messages that say what is allowed.
_ID_DOC = {"pattern": enrollment_rules.ID_RE.pattern}
_TOKEN_DOC = {"pattern": enrollment_rules.TOKEN_RE.pattern, "writeOnly": True}
_RELEASE_DOC = {"pattern": r"^(latest|[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,5})$"}
_URL_DOC = {"pattern": "^https://" + enrollment_rules.URL_CHARS_RE.pattern.removeprefix("^")}


class InstallerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account_id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID_DOC)
    group_id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID_DOC)
    token: str = Field(min_length=1, max_length=MAX_TOKEN_BYTES, json_schema_extra=_TOKEN_DOC)
    format: Literal[FORMATS]  # type: ignore[valid-type]
    release: str = Field(default="latest", max_length=32, json_schema_extra=_RELEASE_DOC)
    console_url: str | None = Field(default=None, max_length=2048, json_schema_extra=_URL_DOC)


class EnrollmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account_id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID_DOC)
    group_id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID_DOC)
    token: str = Field(min_length=1, max_length=MAX_TOKEN_BYTES, json_schema_extra=_TOKEN_DOC)
    release: str = Field(default="latest", max_length=32, json_schema_extra=_RELEASE_DOC)
    console_url: str | None = Field(default=None, max_length=2048, json_schema_extra=_URL_DOC)


class EnrollmentResponse(BaseModel):
    enrollment: str = Field(description="The signed enrollment (JWS). It holds the token: treat it as a secret.")
    key_id: str
    release: str
    expires_at: int | None = None
    msiexec: str = Field(description="The command line for a generic MSI of this release (GPO, Intune, SCCM).")


class RevocationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account_id: str = Field(min_length=1, max_length=128)
    group_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=MAX_TOKEN_BYTES)


class InstallerResponse(BaseModel):
    id: str
    status: Literal["ready", "pending"]
    sha256: str | None = None
    url: str | None = None
    format: str | None = Field(default=None, description="The format asked for (also while pending).")
    release: str | None = Field(default=None, description="The version `latest` resolved to (also while pending).")
    size: int | None = None


class ErrorBody(BaseModel):
    """Every error answer (README: "Error codes")."""

    error: str = Field(description="One sentence: what is wrong and what to do.")
    code: Literal[tuple(CODES)] = Field(description="Stable and machine-readable: branch on this, not on `error`.")  # type: ignore[valid-type]
    field: str | None = Field(description="The request field concerned, or null.")


class RefusedRelease(BaseModel):
    reason: Literal["signature", "checksum", "malformed", "incomplete"]
    error: str


class ReleasesHealth(BaseModel):
    ok: list[str] = Field(description="Releases opened and verified by this process.")
    refused: dict[str, RefusedRelease] = Field(description="Published releases that do not verify here, by version.")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="degraded: some published release is refused (the others are served).")
    version: str
    releases: ReleasesHealth


class Releases(BaseModel):
    releases: list[str] = Field(description="Published versions that verify here, oldest first.")
    latest: str | None = Field(description="The newest of them.")
    latest_by_format: dict[str, str] = Field(description="What `latest` means for each format: the newest release that has it.")
    refused: dict[str, RefusedRelease] = Field(description="Published versions this service refuses, and why.")


_ERRORS = {status: {"model": ErrorBody} for status in sorted({s for s, _ in CODES.values()} - {405})}


def _problem(problem: Problem) -> JSONResponse:
    return JSONResponse(problem.body(), status_code=problem.status, headers=problem.headers())


def _refusal(status: int, code: str, message: str, headers: dict | None = None) -> HTTPException:
    """An HTTP-level refusal (auth, ids, links) in the same shape as every other error."""
    return HTTPException(status, Problem(status=status, code=code, message=message), headers=headers)


def _too_large() -> JSONResponse:
    return _problem(Problem(status=413, code="body_too_large", message=f"request body over {MAX_BODY_BYTES} bytes: send at most 64 KiB"))


class _BodyLimit:
    """Refuse request bodies over MAX_BODY_BYTES before they are read into memory."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await _too_large()(scope, receive, send)
        seen, too_large, started = 0, False, False

        async def limited():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    too_large = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            # FastAPI turns an exception met while reading the body into its own 400: a body
            # cut short (chunked, no Content-Length) gets the 413 below instead.
            if too_large and not started:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except _TooLarge:
            pass
        if too_large and not started:
            await _too_large()(scope, receive, send)


class _TooLarge(Exception):
    pass


class _Counting:
    """Counts responses by route and status; pure ASGI (BaseHTTPMiddleware costs a task per request)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            self.counter.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()


class _ReleaseStates:
    """/metrics: the releases this process serves and those it refuses, read at each scrape."""

    def __init__(self, issuer: Issuer):
        self.issuer = issuer

    def collect(self):
        ok, refused = self.issuer.releases.states()
        verified = GaugeMetricFamily("builder_releases_verified", "Published releases this service verified and serves")
        verified.add_metric([], len(ok))
        yield verified
        bad = GaugeMetricFamily("builder_release_refused", "Published releases that do not verify here (1 each), by reason",
                                labels=["version", "reason"])
        for version, refusal in refused.items():
            bad.add_metric([version, refusal.reason], 1)
        yield bad


def _refused_doc(issuer: Issuer) -> dict[str, RefusedRelease]:
    return {v: RefusedRelease(reason=r.reason, error=r.error().message) for v, r in issuer.releases.states()[1].items()}


def create_app(issuer: Issuer, settings: ServiceSettings) -> FastAPI:
    # Every route but /healthz needs a key: the OpenAPI document is served below, behind one,
    # and the interactive docs (which would load scripts from a CDN) are off.
    app = FastAPI(title="builder installer service", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  description="Issues group-specific, signed agent installers for the console's download button. "
                              "Every error answer is {error, code, field}; the README's table lists the codes.")
    app.add_middleware(_BodyLimit)
    registry = CollectorRegistry()
    requests_total = Counter("builder_http_requests_total", "HTTP requests", ["route", "status"], registry=registry)
    issue_seconds = Histogram("builder_issue_seconds", "Time to answer POST /v1/installers", ["format", "status"],
                              registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    issued_total = Counter("builder_installers_total", "Installers requested", ["format", "outcome"], registry=registry)
    registry.register(_ReleaseStates(issuer))
    bearer = HTTPBearer(auto_error=False)
    challenge = {"WWW-Authenticate": "Bearer"}

    async def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise _refusal(401, "unauthorized", "missing bearer API key: send Authorization: Bearer <key>", challenge)
        digest = hashlib.sha256(credentials.credentials.encode()).hexdigest()
        for known, name in settings.api_keys.items():
            if hmac.compare_digest(known, digest):
                return name
        raise _refusal(401, "unauthorized", "unknown API key: use one of the keys the service was configured with", challenge)

    # Starlette's own (404 for an unknown path, 405, 400 for an unreadable body) as well as ours.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        problem = exc.detail if isinstance(exc.detail, Problem) else _framework_problem(exc)
        return JSONResponse(problem.body(), status_code=problem.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(BuilderError)
    async def builder_error(_request, exc: BuilderError):
        return _problem(describe(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return _problem(_validation_problem(exc))

    @app.exception_handler(Exception)
    async def bug(_request, exc: Exception):
        # Starlette logs the traceback after this answer: a bug keeps it, the client gets no
        # class name or message.
        return _problem(Problem(status=500, code="internal_error",
                                message="internal error: the service's operators have the details in its log"))

    app.add_middleware(_Counting, counter=requests_total)

    def url_for(request: Request, rec: Record) -> str:
        if not issuer.store.presigned_links:  # the service serves the download itself
            exp = int(time.time()) + settings.link_ttl_s
            path = sign_link(settings.link_secret, rec.id, exp, route=settings.download_route)
            return str(request.base_url).rstrip("/") + path
        return issuer.store.presigned_url(rec.key, settings.link_ttl_s)

    def answer(request: Request, installer_id: str, rec: Record | None, *, release: str | None = None,
               fmt: str | None = None) -> JSONResponse:
        if rec is None:
            body = InstallerResponse(id=installer_id, status="pending", format=fmt, release=release)
            return JSONResponse(body.model_dump(), status_code=202)
        body = InstallerResponse(id=installer_id, status="ready", sha256=rec.sha256, url=url_for(request, rec),
                                 format=rec.format, release=rec.release, size=rec.size)
        return JSONResponse(body.model_dump())

    @app.get("/healthz", tags=["ops"], response_model=Health)
    def healthz() -> Health:
        """Up, and the releases this process serves and refuses (no key: for load balancers).
        Asks nothing of storage: releases published since start appear once a request opens them."""
        ok, refused = issuer.releases.states()
        return Health(status="degraded" if refused else "ok", version=__version__,
                      releases=ReleasesHealth(ok=ok, refused=_refused_doc(issuer)))

    @app.get("/openapi.json", tags=["ops"], include_in_schema=False)
    async def openapi(_who: str = Depends(caller)) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/metrics", tags=["ops"], response_class=Response, responses=_ERRORS)
    def metrics(_who: str = Depends(caller)) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def audit_refusal(who: str, body, fmt: str, exc: BuilderError) -> None:
        """A refused request in the audit log (`builder issued` lists it): its code, and the ids
        only when they are ids (a client may send anything there, a token included). A transient
        failure (storage, Redis, a tool) is no refusal: the same request may succeed in a moment."""
        problem = describe(exc)
        if problem.transient or problem.retry_after:
            return

        def valid(field_name: str, value: str) -> str | None:
            try:
                validate_id(field_name, value)
            except BuilderError:
                return None
            return value
        issuer.audit.record(who, "refused", fmt=fmt, release=valid("release", body.release),
                            account_id=valid("account_id", body.account_id), group_id=valid("group_id", body.group_id),
                            detail=problem.code)

    @app.post("/v1/installers", response_model=InstallerResponse, responses={**_ERRORS, 202: {"model": InstallerResponse}},
              tags=["installers"])
    def create_installer(body: InstallerRequest, request: Request, who: str = Depends(caller)):
        start = time.perf_counter()
        status = "error"
        try:
            # Registered for redaction by issuer.request once the Enrollment has validated it: a
            # word sent as a token must not be masked in every later message.
            token = Secret(body.token)
            version = issuer.resolve(body.release, body.format)
            enrollment = Enrollment(account_id=body.account_id, group_id=body.group_id, token=token,
                                    console_url=body.console_url or issuer.default_console_url(version))
            installer_id, rec = issuer.request(who, release=version, fmt=body.format, enrollment=enrollment,
                                               wait_s=settings.wait_s, pickup_s=settings.pickup_s)
            status = "ready" if rec else "pending"
            issued_total.labels(body.format, status).inc()
            return answer(request, installer_id, rec, release=version, fmt=body.format)
        except BuilderError as exc:
            audit_refusal(who, body, body.format, exc)
            raise
        finally:
            issue_seconds.labels(body.format, status).observe(time.perf_counter() - start)

    @app.get("/v1/installers/{installer_id}", response_model=InstallerResponse, responses={**_ERRORS, 202: {"model": InstallerResponse}},
             tags=["installers"])
    def get_installer(installer_id: str, request: Request, who: str = Depends(caller)):
        if not _ID_RE.fullmatch(installer_id):
            raise _refusal(404, "not_found", "no such installer id: ids are the 32 hex digits POST /v1/installers gave")
        rec = issuer.record(installer_id)
        if rec is None:
            issuer.raise_if_failed(installer_id)
            pending = issuer.pending(installer_id)
            if pending is not None:
                return answer(request, installer_id, None, release=pending[0], fmt=pending[1])
            raise _refusal(404, "not_found", "no such installer id: POST /v1/installers again to make it")
        if issuer.is_revoked(rec.token_fingerprint):
            issuer.audit.record(who, "refused-revoked", installer_id=rec.id, release=rec.release, fmt=rec.format,
                                account_id=rec.account_id, group_id=rec.group_id, token_fp=rec.token_fingerprint)
            raise _revoked_installer()
        issuer.audit.record(who, "issue-url", installer_id=rec.id, release=rec.release, fmt=rec.format,
                            account_id=rec.account_id, group_id=rec.group_id, token_fp=rec.token_fingerprint, sha256=rec.sha256)
        return answer(request, installer_id, rec)

    @app.post("/v1/enrollments", response_model=EnrollmentResponse, responses=_ERRORS, tags=["installers"])
    def create_enrollment(body: EnrollmentRequest, who: str = Depends(caller)):
        """One group's signed enrollment, for `msiexec /i <the release's msi-tagged or release MSI>
        ENROLLMENT=<it> /qn`: one generic MSI for every group, the group passed as a parameter.
        `latest` is the newest release with an MSI."""
        try:
            # Registered for redaction by issuer.enrollment once the Enrollment has validated it.
            token = Secret(body.token)
            version = issuer.resolve(body.release, "msi")
            enrollment = Enrollment(account_id=body.account_id, group_id=body.group_id, token=token,
                                    console_url=body.console_url or issuer.default_console_url(version))
            version, signed = issuer.enrollment(who, release=version, enrollment=enrollment,
                                                expires_in=settings.enrollment_ttl_s)
        except BuilderError as exc:
            audit_refusal(who, body, "enrollment", exc)
            raise
        jws = signed.jws.reveal()
        body_out = EnrollmentResponse(enrollment=jws, key_id=signed.key_id, release=version, expires_at=signed.expires_at,
                                      msiexec=f"msiexec /i {issuer.releases.msi_name(version)} ENROLLMENT={jws} /qn")
        # Not through _problem/redact: the signed enrollment is what was asked for.
        return JSONResponse(body_out.model_dump())

    @app.get("/v1/releases", tags=["releases"], response_model=Releases, responses=_ERRORS)
    def releases(_who: str = Depends(caller)) -> Releases:
        served, by_format = [], {}
        for version in issuer.releases.versions():
            try:
                formats = issuer.releases.formats_of(version)
            except ReleaseRefused:
                continue
            served.append(version)
            by_format.update(dict.fromkeys(formats, version))  # oldest first: the newest wins
        return Releases(releases=served, latest=served[-1] if served else None, latest_by_format=by_format,
                        refused=_refused_doc(issuer))

    @app.post("/v1/revocations", tags=["tokens"], responses=_ERRORS)
    def revoke(body: RevocationRequest, who: str = Depends(caller)) -> dict:
        validate_id("account_id", body.account_id)
        validate_id("group_id", body.group_id)
        validate_token(Secret(body.token))
        fp = issuer.revoke(who, body.account_id, body.group_id, Secret(body.token))
        return {"revoked": True, "token_fingerprint": "sha256:" + fp[:16]}

    @app.get(settings.download_route + "/{installer_id}", tags=["installers"], response_class=FileResponse, responses=_ERRORS)
    def download(installer_id: str, exp: str = "", sig: str = ""):
        """The download route of stores without presigned links (local disk): an HMAC-signed,
        expiring link per installer."""
        status = check_link(settings.link_secret, installer_id, exp, sig, time.time())
        if status is LinkStatus.EXPIRED:
            raise _refusal(status.http_status, "link_expired", "download link expired: ask for the installer again for a fresh one")
        if status is not LinkStatus.OK:
            raise _refusal(status.http_status, "invalid_link", "invalid download link")
        rec = issuer.record(installer_id) if _ID_RE.fullmatch(installer_id) else None
        if rec is None or issuer.store.presigned_links:  # such a store's clients download from it
            raise _refusal(404, "not_found", "no such installer")
        if issuer.is_revoked(rec.token_fingerprint):
            raise _revoked_installer()
        name = issuer.releases.download_name(rec.release, rec.group_id, rec.format)
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        if rec.streamed:
            # base[0:off] + slot + base[off+len:], read from the release object: no copy stored.
            base_key, pieces = installers.read_stamp_document(issuer.store, rec.key)
            return StreamingResponse(issuer.store.stream_pieces(base_key, pieces), media_type="application/octet-stream",
                                     headers={**headers, "Content-Length": str(rec.size)})
        path = issuer.store.local_path(rec.key)
        return FileResponse(path, media_type="application/octet-stream", filename=name)

    return app


def _revoked_installer() -> HTTPException:
    return _refusal(410, "installer_revoked",
                    "this installer carries a revoked enrollment token: request one with the group's current token")


_FRAMEWORK_WORDS = {404: "no such route: the OpenAPI document at /openapi.json lists them",
                    405: "this route does not take this method: the OpenAPI document at /openapi.json lists them"}


def _framework_problem(exc: StarletteHTTPException) -> Problem:
    """Starlette's own refusals (unknown path, wrong method, unreadable body) as problems."""
    status = exc.status_code
    return Problem(status=status, code=CODE_OF_STATUS.get(status, "bad_request"),
                   message=_FRAMEWORK_WORDS.get(status) or str(exc.detail))


def _validation_problem(exc: RequestValidationError) -> Problem:
    """The first thing wrong with the request. Pydantic's own message names the rule, never the
    value (a token may be the value): field and rule only."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return Problem(status=422, code="invalid_json", message="the body is not valid JSON: send one JSON object")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    field = loc[0] if loc and isinstance(loc[0], str) else None
    where = ".".join(str(p) for p in loc) or "body"
    rule = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        rule = "not a field of this request: remove it"
    return Problem(status=422, code="invalid_field", field=field, message=f"{where}: {rule}")

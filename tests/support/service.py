"""What the service tests share: a signed test release, and the HTTP app served by a real uvicorn
on 127.0.0.1 in a thread of the test process (so tests can look inside the issuer it serves)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import uvicorn

from builder import release
from builder.config import load_product
from builder.signing.signers import Signers
from builder.signing.authenticode import SigningKey
from builder.signing.enrollment_key import DEV_KEY_NAME, FileEnrollmentKey
from builder.trust import Trust
from tests.support.servers import free_ports

RELEASE_VERSION = "1.0.0"
SOURCE_DATE_EPOCH = 1767225600
START_TIMEOUT_S = 20


def signers_for(dev_keys) -> Signers:
    """The development Authenticode key: the service re-signs baked MSIs with it."""
    return Signers(authenticode=SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), verify_ca=dev_keys.ca_cert)


def enrollment_key_for(dev_keys) -> FileEnrollmentKey:
    """The development enrollment key (`builder dev-keys` makes it beside the CA)."""
    return FileEnrollmentKey(dev_keys.folder / DEV_KEY_NAME)


def trust_for(dev_keys) -> Trust:
    """What the suite's releases pin: the development enrollment key, the default console host."""
    return Trust((enrollment_key_for(dev_keys).pin,), ("console.example.com",))


def build_release(dev_keys, payload: Path, out: Path, formats=("exe", "msi"), *, version: str = RELEASE_VERSION,
                  signed_by=None) -> Path:
    """A signed release (base installers with empty slots + manifest.json) in `out`, pinning
    `dev_keys`' enrollment key; signed with `signed_by`'s code-signing key (default: dev_keys')."""
    release.release(format_names=list(formats), product=load_product(), version=version, payload=payload,
                    signers=signers_for(signed_by or dev_keys), trust=trust_for(dev_keys), out=out,
                    source_date_epoch=SOURCE_DATE_EPOCH)
    return out


class UvicornThread:
    """`app` served on a free 127.0.0.1 port until `stop()`."""

    def __init__(self, app):
        (self.port,) = free_ports(1)
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self) -> "UvicornThread":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"uvicorn on 127.0.0.1:{self.port} exited before it started")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn on 127.0.0.1:{self.port} did not start within {START_TIMEOUT_S} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serve(app) -> Iterator[UvicornThread]:
    server = UvicornThread(app).start()
    try:
        yield server
    finally:
        server.stop()


# -- the error contract (README: "Error codes") -------------------------------------------------

_SNAKE = re.compile(r"[a-z]+(?:_[a-z]+)*")
_CLI_OPTION = re.compile(r"(?<![\w-])--[a-z]")
_PYTHON_CLASS = re.compile(r"\b(?:[A-Z][a-z]+)+(?:Error|Failed|Exception|Refused)\b|Traceback")


def problem(answer, status: int, code: str, field=...) -> str:
    """The sentence of an error answer, once its shape is checked: {error, code, field}, the
    status and code expected, no CLI option and no Python class name in the sentence."""
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    doc = answer.json()
    assert set(doc) == {"error", "code", "field"}, doc
    assert doc["code"] == code and _SNAKE.fullmatch(doc["code"]), doc
    if field is not ...:
        assert doc["field"] == field, doc
    error = doc["error"]
    assert isinstance(error, str) and error.strip(), doc
    assert not _CLI_OPTION.search(error), f"CLI advice in an HTTP answer: {error}"
    assert not _PYTHON_CLASS.search(error), f"a Python class name in an HTTP answer: {error}"
    return error

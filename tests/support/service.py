"""What the service tests share: a signed test release, and the HTTP app served by a real uvicorn
on 127.0.0.1 in a thread of the test process (so tests can look inside the issuer it serves)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Iterator

import uvicorn

from builder import release
from builder.config import load_product
from builder.formats.base import Signers
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


def build_release(dev_keys, payload: Path, out: Path, formats=("exe", "msi")) -> Path:
    """A signed release (base installers with empty slots + manifest.json) in `out`."""
    release.release(format_names=list(formats), product=load_product(), version=RELEASE_VERSION, payload=payload,
                    signers=signers_for(dev_keys), trust=trust_for(dev_keys), out=out, source_date_epoch=SOURCE_DATE_EPOCH)
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

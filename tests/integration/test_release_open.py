"""Opening a release: hashes against the manifest always; signatures once per release; a root
that is merely missing (no --ca) does not stop a stamp, a --ca without the release's root does,
naming the format and --ca."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import log, release
from builder.config import load_product
from builder.enrollment import Secret
from builder.errors import VerificationError
from builder.signing.signers import AppleKey, Signers
from builder.signing import devca
from builder.signing.authenticode import SigningKey

REPO = Path(__file__).resolve().parents[2]
EPOCH = 1767225600


@pytest.fixture(scope="module")
def release_dir(test_payload, dev_keys, tmp_path_factory, trust) -> Path:
    password = Secret("development")
    signers = Signers(authenticode=SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key),
                      apple_application=AppleKey(pkcs12=dev_keys.mac_app_pkcs12, password=password),
                      apple_installer=AppleKey(pkcs12=dev_keys.mac_installer_pkcs12, password=password),
                      verify_ca=dev_keys.ca_cert)
    out = tmp_path_factory.mktemp("release")
    release.release(format_names=["exe", "msi", "pkg"], product=load_product(), version="1.2.3",
                    payload=test_payload, signers=signers, trust=trust, out=out, source_date_epoch=EPOCH)
    return out


def test_a_missing_root_does_not_stop_opening_and_is_named(release_dir, monkeypatch):
    warnings = []
    monkeypatch.setattr(log, "warning", warnings.append)
    release._verified.clear()
    rel = release.Release.open(release_dir)  # no --ca: the development root is on no system list
    assert rel.version == "1.2.3"
    said = " ".join(warnings)
    for fmt in ("exe", "msi"):
        assert f"release {fmt}:" in said
    assert "--ca" in said


def test_a_ca_without_the_releases_root_is_an_error_naming_format_and_ca(release_dir, tmp_path):
    other = devca.create(tmp_path / "other").ca_cert
    release._verified.clear()
    with pytest.raises(VerificationError) as info:
        release.Release.open(release_dir, ca=other)
    message = str(info.value)
    assert "exe" in message and "--ca" in message and "root" in message


def test_signatures_are_verified_once_per_release(release_dir, dev_keys, monkeypatch):
    from builder import formats

    release._verified.clear()
    calls = []
    for name in ("exe", "msi", "pkg"):
        cls = type(formats.get(name))
        real = cls.verify
        monkeypatch.setattr(cls, "verify", lambda self, path, ca, real=real: calls.append(path) or real(self, path, ca))
    release.Release.open(release_dir, ca=dev_keys.ca_cert)
    release.Release.open(release_dir, ca=dev_keys.ca_cert)
    assert len(calls) == 3
    # A changed file is still caught by its hash, verified signatures or not.
    exe = release_dir / release.Release.open(release_dir, ca=dev_keys.ca_cert).manifest["files"]["exe"]["file"]
    data = bytearray(exe.read_bytes())
    data[100] ^= 1
    backup = bytes(exe.read_bytes())
    exe.write_bytes(bytes(data))
    try:
        with pytest.raises(VerificationError, match="sha256"):
            release.Release.open(release_dir, ca=dev_keys.ca_cert)
    finally:
        exe.write_bytes(backup)


def test_cli_stamp_needs_no_ca(release_dir, dev_keys, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOK": "release-open-token"}
    proc = subprocess.run([sys.executable, "-m", "builder", "stamp", "--release", str(release_dir), "--format", "exe",
                           "--account-id", "a", "--group-id", "g", "--token-env", "TOK",
                           "--console-url", "https://console.example.com", "--out", str(tmp_path / "g.exe"),
                           "--enrollment-key", str(dev_keys.folder / "enrollment.key")],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "g.exe").is_file()

"""The enrollment key inside an HSM (SoftHSM2 through PKCS#11, as a vendor's HSM would be).

The key is made here with `cryptography`, imported into a fresh SoftHSM token, and used only
through `--enrollment-key-pkcs11`; what it signs is checked with the imported key's public half
(not with builder's verifier), and by builder's verifier against the pins a release would carry.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from builder.enrollment import Enrollment, Secret
from builder.errors import SigningError, UsageError
from builder.signing.enrollment_key import Pkcs11EnrollmentKey
from builder.trust import Trust, verify
from tests.integration.test_cli import run_cli
from tests.support import signed as oracle

PIN = "hsm-pin-4321"
URI = "pkcs11:token=enroll;object=enrollment-key"
TOKEN = "hsm-token-" + "x" * 40


def decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def assert_signed_by(jws: str, key: ec.EllipticCurvePrivateKey) -> dict:
    """The JWS's ES256 signature checked with `key`'s public half; returns the payload."""
    header, payload, signature = jws.split(".")
    raw = decode(signature)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.public_key().verify(der, f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AssertionError("the HSM's signature does not verify with the imported key") from None
    assert json.loads(decode(header)) == {"alg": "ES256", "kid": oracle.kid(key), "typ": "enrollment+jws"}
    return json.loads(decode(payload))


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch) -> ec.EllipticCurvePrivateKey:
    """A SoftHSM2 token `enroll` holding a fresh P-256 key labelled enrollment-key."""
    conf = tmp_path / "softhsm2.conf"
    (tmp_path / "tokens").mkdir()
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "enroll", "--pin", PIN, "--so-pin", "87654321"],
                   check=True, capture_output=True)
    key = oracle.new_key()
    p8 = tmp_path / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    subprocess.run(["softhsm2-util", "--import", str(p8), "--token", "enroll", "--label", "enrollment-key",
                    "--id", "02", "--pin", PIN], check=True, capture_output=True)
    p8.unlink()
    return key


def test_an_hsm_key_signs_enrollments_the_agents_accept(hsm) -> None:
    key = Pkcs11EnrollmentKey(URI, Secret(PIN))
    assert key.kid == oracle.kid(hsm)  # the pin is the HSM key's public half
    trust = Trust((key.pin,), ("console.example.com",))
    enrollment = Enrollment(account_id="acct-h", group_id="grp-h", token=Secret(TOKEN),
                            console_url="https://console.example.com/t")
    now = int(time.time())
    signed = key.sign(enrollment, trust, issued_at=now, expires_at=now + 600)
    payload = assert_signed_by(signed.jws.reveal(), hsm)
    assert payload == {"account_id": "acct-h", "group_id": "grp-h", "console_url": "https://console.example.com/t",
                       "enrollment_token": TOKEN, "key_id": oracle.kid(hsm), "issued_at": now, "expires_at": now + 600}
    assert verify(signed.jws.reveal(), trust, now).group_id == "grp-h"
    # ECDSA's random k: two signatures of one statement differ, both verify.
    again = key.sign(enrollment, trust, issued_at=now, expires_at=now + 600)
    assert again.jws.reveal() != signed.jws.reveal()
    assert_signed_by(again.jws.reveal(), hsm)


def test_the_cli_signs_with_the_hsm_and_keeps_the_pin_secret(hsm) -> None:
    env = {"BUILDER_ENROLLMENT_KEY_PASSWORD": PIN, "HSM_TOKEN": TOKEN}
    args = ("enrollment", "--account-id", "acct-h", "--group-id", "grp-h", "--token-env", "HSM_TOKEN",
            "--console-url", "https://console.example.com", "--enrollment-key-pkcs11", URI,
            "--json")
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["key_id"] == oracle.kid(hsm)
    assert assert_signed_by(out["enrollment"], hsm)["group_id"] == "grp-h"
    assert PIN not in proc.stdout + proc.stderr

    wrong = run_cli(*args, env={**env, "BUILDER_ENROLLMENT_KEY_PASSWORD": "0000"})
    assert wrong.returncode != 0 and wrong.stdout == ""
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) <= 2 and "--enrollment-key-pkcs11" in lines[0], wrong.stderr
    assert "0000" not in wrong.stderr and TOKEN not in wrong.stderr


def test_a_bad_uri_or_a_missing_key_is_named(hsm) -> None:
    with pytest.raises(UsageError, match="must not carry the PIN"):
        Pkcs11EnrollmentKey("pkcs11:token=enroll;object=enrollment-key;pin-value=" + PIN, None)
    with pytest.raises(UsageError, match="names no key"):
        Pkcs11EnrollmentKey("pkcs11:token=enroll", Secret(PIN))
    with pytest.raises(SigningError, match="--enrollment-key-pkcs11: the HSM"):
        Pkcs11EnrollmentKey("pkcs11:token=enroll;object=no-such-key", Secret(PIN))
    with pytest.raises(SigningError, match="--enrollment-key-pkcs11: the HSM"):
        Pkcs11EnrollmentKey("pkcs11:token=no-such-token;object=enrollment-key", Secret(PIN))

"""Authenticode signing with osslsigncode: PEM, PKCS#12, PKCS#11 (SoftHSM), test TSA, failures."""

import logging
import subprocess

import pytest

from builder.enrollment import Secret
from builder.errors import SigningError, UsageError
from builder.signing import authenticode
from builder.signing.authenticode import SigningKey, OfflineTSA


@pytest.fixture(scope="module")
def tiny_exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("pe")
    (d / "t.c").write_text("int main(void){return 0;}\n")
    subprocess.run(["x86_64-w64-mingw32-gcc", "-o", str(d / "t.exe"), str(d / "t.c")], check=True)
    return d / "t.exe"


def osslsigncode_verify(path, ca):
    return subprocess.run(["osslsigncode", "verify", "-CAfile", str(ca), "-in", str(path)], capture_output=True, text=True)


def test_pem_key_signs_and_verifies(tiny_exe, dev_keys, tmp_path):
    out = tmp_path / "s.exe"
    authenticode.sign(SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), tiny_exe, out)
    assert osslsigncode_verify(out, dev_keys.ca_cert).returncode == 0
    v = authenticode.verify(out, dev_keys.ca_cert)
    assert v.ok and "Builder Development Code Signing" in v.signer


def test_tampered_file_fails_verify(tiny_exe, dev_keys, tmp_path):
    out = tmp_path / "s.exe"
    authenticode.sign(SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), tiny_exe, out)
    data = bytearray(out.read_bytes())
    data[0x400] ^= 0xFF  # inside the first section, covered by the Authenticode hash
    out.write_bytes(bytes(data))
    v = authenticode.verify(out, dev_keys.ca_cert)
    assert not v.ok and "mismatch" in v.detail


def test_unsigned_file_reports_not_signed(tiny_exe, dev_keys):
    v = authenticode.verify(tiny_exe, dev_keys.ca_cert)
    assert not v.ok and v.detail == "not signed"


def test_pkcs12_password_goes_through_stdin_only(tiny_exe, dev_keys, tmp_path, caplog):
    from builder import log

    log.setup(verbose=True)
    log.logger.propagate = True
    caplog.set_level(logging.DEBUG, logger="builder")
    out = tmp_path / "s.exe"
    authenticode.sign(SigningKey(pkcs12=dev_keys.sign_pkcs12, password=Secret("development")), tiny_exe, out)
    assert authenticode.verify(out, dev_keys.ca_cert).ok
    commands = [r.getMessage() for r in caplog.records if r.getMessage().startswith("$ ")]
    assert commands and all("development" not in c for c in commands)
    assert any("-readpass -" in c for c in commands)


def test_wrong_pkcs12_password_is_a_signing_error_and_leaves_nothing(tiny_exe, dev_keys, tmp_path):
    out = tmp_path / "s.exe"
    with pytest.raises(SigningError, match="wrong password"):
        authenticode.sign(SigningKey(pkcs12=dev_keys.sign_pkcs12, password=Secret("not-the-password")), tiny_exe, out)
    assert not out.exists()


def test_certificate_without_code_signing_usage_is_refused(dev_keys):
    with pytest.raises(SigningError, match="codeSigning"):
        SigningKey(cert=dev_keys.no_eku_cert, key=dev_keys.no_eku_key)


def test_unreachable_timestamp_server(tiny_exe, dev_keys, tmp_path):
    out = tmp_path / "s.exe"
    key = SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key, timestamp_url="http://127.0.0.1:9/")
    with pytest.raises(SigningError, match="timestamp server"):
        authenticode.sign(key, tiny_exe, out)
    assert not out.exists()


def test_offline_test_tsa_adds_an_rfc3161_timestamp(tiny_exe, dev_keys, tmp_path):
    out = tmp_path / "s.exe"
    tsa = OfflineTSA(certs=dev_keys.tsa_cert, key=dev_keys.tsa_key, time=1767225600)
    authenticode.sign(SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key, test_tsa=tsa), tiny_exe, out)
    v = authenticode.verify(out, dev_keys.ca_cert)
    assert v.ok and v.timestamp and "2026" in v.timestamp


def test_key_options_must_be_exactly_one(dev_keys):
    with pytest.raises(UsageError):
        SigningKey()
    with pytest.raises(UsageError):
        SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key, pkcs12=dev_keys.sign_pkcs12)
    with pytest.raises(UsageError, match="--sign-cert"):
        SigningKey(key=dev_keys.sign_key)


def test_pkcs11_hsm_key_via_softhsm(tiny_exe, dev_keys, tmp_path, monkeypatch):
    conf = tmp_path / "softhsm2.conf"
    (tmp_path / "tokens").mkdir()
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "builder", "--pin", "4321", "--so-pin", "8765"], check=True, capture_output=True)
    p8 = tmp_path / "k.p8"
    subprocess.run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", str(dev_keys.sign_key), "-out", str(p8)], check=True)
    subprocess.run(["softhsm2-util", "--import", str(p8), "--token", "builder", "--label", "signkey", "--id", "01", "--pin", "4321"], check=True, capture_output=True)
    out = tmp_path / "h.exe"
    key = SigningKey(cert=dev_keys.sign_cert, pkcs11_uri="pkcs11:token=builder;object=signkey;type=private", password=Secret("4321"))
    authenticode.sign(key, tiny_exe, out)
    assert authenticode.verify(out, dev_keys.ca_cert).ok
    with pytest.raises(SigningError):
        authenticode.sign(
            SigningKey(cert=dev_keys.sign_cert, pkcs11_uri="pkcs11:token=builder;object=signkey;type=private", password=Secret("0000")),
            tiny_exe, tmp_path / "h2.exe",
        )
    assert not (tmp_path / "h2.exe").exists()

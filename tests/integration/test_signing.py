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


# --------------------------------------------------------------------------------------------
# Timestamps: shown only when they verify (osslsigncode exits 0 with a failed timestamp)


def _tsa_signed(tiny_exe, dev_keys, out, time, key=None):
    tsa = OfflineTSA(certs=dev_keys.tsa_cert, key=dev_keys.tsa_key, time=time)
    key = key or SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key, test_tsa=tsa)
    authenticode.sign(SigningKey(**{**key.__dict__, "test_tsa": tsa}), tiny_exe, out)
    return out


def test_the_test_tsa_timestamp_verifies_at_source_date_epoch(tiny_exe, dev_keys, tmp_path):
    out = _tsa_signed(tiny_exe, dev_keys, tmp_path / "s.exe", 1767225600)
    raw = subprocess.run(["osslsigncode", "verify", "-CAfile", str(dev_keys.ca_cert), "-TSA-CAfile", str(dev_keys.ca_cert),
                          "-in", str(out)], capture_output=True, text=True)
    assert "Timestamp Server Signature verification: ok" in raw.stdout
    v = authenticode.verify(out, dev_keys.ca_cert)
    assert v.ok and v.timestamp == "Jan  1 00:00:00 2026 GMT" and v.timestamp_problem is None


def test_a_timestamp_outside_the_tsa_certificate_is_a_failure(tiny_exe, dev_keys, tmp_path):
    out = _tsa_signed(tiny_exe, dev_keys, tmp_path / "s.exe", 900000000)  # 1998: before the TSA certificate
    raw = osslsigncode_verify(out, dev_keys.ca_cert)
    # osslsigncode itself exits 0 and says "Succeeded": its exit code alone hides this.
    assert raw.returncode == 0 and "Timestamp Server Signature verification: failed" in raw.stdout
    v = authenticode.verify(out, dev_keys.ca_cert)
    assert not v.ok and v.timestamp is None
    assert v.detail.startswith("timestamp Jul  9 16:00:00 1998 GMT does not verify")
    assert "TSA certificate" in v.detail and "not yet valid" in v.detail


def test_a_timestamp_of_another_signature_is_a_failure(tiny_exe, dev_keys, tmp_path):
    """The countersignature of one signature grafted onto another: its message imprint is wrong."""
    from asn1crypto import cms

    from builder.binfmt import pe

    stamped = _tsa_signed(tiny_exe, dev_keys, tmp_path / "a.exe", 1767225600)
    other = tmp_path / "b.exe"
    authenticode.sign(SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), tiny_exe, other, signing_time=1767300000)
    a, b = stamped.read_bytes(), other.read_bytes()
    pa, pb = cms.ContentInfo.load(pe.pkcs7_of(a, "a")), cms.ContentInfo.load(pe.pkcs7_of(b, "b"))
    pb["content"]["signer_infos"][0]["unsigned_attrs"] = pa["content"]["signer_infos"][0]["unsigned_attrs"]
    grafted = tmp_path / "grafted.exe"
    grafted.write_bytes(pe.with_signature(b, pb.dump(force=True), "b"))
    assert osslsigncode_verify(grafted, dev_keys.ca_cert).returncode == 0
    v = authenticode.verify(grafted, dev_keys.ca_cert)
    assert not v.ok and v.timestamp is None and "message imprint" in v.detail


def test_a_signer_not_yet_valid_at_the_timestamp_is_named(tiny_exe, dev_keys, tmp_path):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    ca = (x509.CertificateBuilder().subject_name(name("Test CA")).issuer_name(name("Test CA")).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(dt.datetime(2000, 1, 1)).not_valid_after(dt.datetime(2090, 1, 1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("Late signer")).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(2).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=300))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "late.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "late.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "roots.pem").write_bytes(ca.public_bytes(pem) + dev_keys.ca_cert.read_bytes())
    late = SigningKey(cert=tmp_path / "late.pem", key=tmp_path / "late.key")
    out = _tsa_signed(tiny_exe, dev_keys, tmp_path / "s.exe", 1767225600, key=late)  # before the signer's start
    v = authenticode.verify(out, tmp_path / "roots.pem")
    assert not v.ok and "not valid at the timestamp time" in v.detail and "Jan  1 00:00:00 2026" in v.detail


def test_cli_verify_exits_9_naming_the_timestamp(dev_keys, test_payload, tmp_path):
    """An MSI built unsigned by builder, then signed by osslsigncode itself with the test TSA at
    two times: one the TSA certificate covers, one it does not."""
    import os
    import sys

    env = {**os.environ, "TOK": "cli-timestamp-token", "SOURCE_DATE_EPOCH": "1767225600"}
    cli = [sys.executable, "-m", "builder"]
    subprocess.run([*cli, "build", "--format", "msi", "--version", "1.0.0", "--account-id", "a", "--group-id", "g",
                    "--token-env", "TOK", "--console-url", "https://console.example.com", "--payload", str(test_payload),
                    "--out", str(tmp_path / "out"), "--no-sign", "--enrollment-key", str(dev_keys.folder / "enrollment.key")],
                   check=True, capture_output=True, env=env)
    unsigned = next((tmp_path / "out").glob("*.msi"))
    signed = {}
    for name, when in (("good", 1767225600), ("bad", 900000000)):
        signed[name] = tmp_path / f"{name}.msi"
        subprocess.run(["osslsigncode", "sign", "-certs", str(dev_keys.sign_cert), "-key", str(dev_keys.sign_key),
                        "-h", "sha256", "-TSA-certs", str(dev_keys.tsa_cert), "-TSA-key", str(dev_keys.tsa_key),
                        "-TSA-time", str(when), "-in", str(unsigned), "-out", str(signed[name])], check=True, capture_output=True)
    verify = [*cli, "verify", "--ca", str(dev_keys.ca_cert)]
    failed = subprocess.run([*verify, str(signed["bad"])], capture_output=True, text=True, env=env)
    assert failed.returncode == 9
    said = " ".join((failed.stdout + failed.stderr).split())  # the console wraps long lines
    assert "timestamp Jul 9 16:00:00 1998 GMT does not verify" in said
    assert "timestamp: Jul" not in said  # never shown as if it held
    shown = subprocess.run([*verify, str(signed["good"])], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "timestamp: Jan 1 00:00:00 2026 GMT" in " ".join((shown.stdout + shown.stderr).split())

"""Developer ID classification against certificates built to Apple's layout (tests/support/applepki.py),
field by field: each marker the classifier relies on is removed or moved in turn."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from builder.signing.apple import certificates, verify
from tests.support import applepki
from tests.support.applepki import (OID_APPLICATION_MARK, OID_DEVELOPER_ID_CA, OID_INSTALLER_MARK,
                                    OID_PACKAGE_SIGNING_EKU)

APP, INST = "Developer ID Application", "Developer ID Installer"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> applepki.ApplePKI:
    return applepki.create(tmp_path_factory.mktemp("apple-pki"))


def test_the_genuine_layout_is_recognised(pki):
    assert certificates.developer_id_kind(pki.leaf(APP)[1]) == certificates.APPLICATION
    assert certificates.developer_id_kind(pki.leaf(INST)[1]) == certificates.INSTALLER


def test_the_test_pki_has_apples_fields(pki):
    """The layout itself, so a change to the test PKI cannot quietly weaken the tests above."""
    _, app = pki.leaf(APP)
    _, inst = pki.leaf(INST)
    for cert, eku, mark in ((app, ExtendedKeyUsageOID.CODE_SIGNING, OID_APPLICATION_MARK),
                            (inst, OID_PACKAGE_SIGNING_EKU, OID_INSTALLER_MARK)):
        ext = cert.extensions
        assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        assert ext.get_extension_for_oid(mark).critical and ext.get_extension_for_oid(mark).value.value == b"\x05\x00"
        assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
        assert cert.issuer == pki.ca.subject
    assert not pki.ca.extensions.get_extension_for_oid(OID_DEVELOPER_ID_CA).critical
    assert pki.ca.issuer == pki.root.subject == pki.root.issuer
    assert pki.root.subject.rfc4514_string() == "CN=Apple Root CA,OU=Apple Certification Authority,O=Apple Inc.,C=US"


@pytest.mark.parametrize("kind, overrides, found", [
    # The Developer ID OID in the EKU (the shape builder's old development CA made): not Apple's.
    (APP, {"eku": [OID_APPLICATION_MARK, ExtendedKeyUsageOID.CODE_SIGNING], "marks": []}, "in the EKU"),
    (INST, {"eku": [OID_INSTALLER_MARK], "marks": []}, "in the EKU"),
    # The right EKU without Apple's marker extension: a plain code-signing certificate.
    (APP, {"marks": []}, "EKU codeSigning; no Developer ID extension"),
    (INST, {"marks": []}, "EKU 1.2.840.113635.100.4.13; no Developer ID extension"),
    # The marker without its EKU, or with the other kind's EKU.
    (APP, {"eku": []}, "no EKU"),
    (APP, {"eku": [OID_PACKAGE_SIGNING_EKU]}, "extension 1.2.840.113635.100.6.1.13 (critical)"),
    (INST, {"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "extension 1.2.840.113635.100.6.1.14 (critical)"),
    # The marker not critical: Apple always marks it critical.
    (APP, {"critical_marks": False}, "extension 1.2.840.113635.100.6.1.13 (not critical)"),
    # Both markers: ambiguous.
    (APP, {"marks": [OID_APPLICATION_MARK, OID_INSTALLER_MARK]}, "1.2.840.113635.100.6.1.14"),
    # TLS.
    (APP, {"eku": [ExtendedKeyUsageOID.SERVER_AUTH], "marks": []}, "EKU serverAuth"),
])
def test_near_misses_are_refused_and_described(pki, kind, overrides, found):
    _, cert = pki.leaf(kind, **overrides)
    assert certificates.developer_id_kind(cert) is None
    assert found in certificates.describe_certificate(cert)


def test_a_ca_certificate_is_never_an_identity(pki):
    assert certificates.developer_id_kind(pki.ca) is None and certificates.developer_id_kind(pki.root) is None
    assert "CA certificate" in certificates.describe_certificate(pki.ca)


def test_chain_check_names_the_developer_id_ca_and_refuses_unknown_critical_extensions(pki, tmp_path):
    _, leaf = pki.leaf(INST)
    report = verify.Report()
    verify.check_chain(report, leaf, [pki.ca], pki.root_pem, certificates.INSTALLER)
    assert not report.problems, report.problems
    assert report.trusted is True
    assert "issued by a Developer ID Certification Authority" in report.checked
    # An unknown critical extension stops the chain, as it stops OpenSSL's and Apple's.
    key, odd = pki.leaf(INST)
    odd = (x509.CertificateBuilder().subject_name(odd.subject).issuer_name(odd.issuer).public_key(odd.public_key())
           .serial_number(odd.serial_number).not_valid_before(odd.not_valid_before_utc)
           .not_valid_after(odd.not_valid_after_utc))
    for ext in pki.leaf(INST)[1].extensions:
        odd = odd.add_extension(ext.value, ext.critical)
    odd = odd.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
                            critical=True).sign(pki.ca_key, hashes.SHA256())
    report = verify.Report()
    verify.check_chain(report, odd, [pki.ca], pki.root_pem, certificates.INSTALLER)
    assert any("unknown critical extension 1.3.6.1.4.1.99999.1" in p for p in report.problems)

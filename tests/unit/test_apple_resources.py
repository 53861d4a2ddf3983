"""Apple's public CA certificates shipped in builder/resources/apple: what the README says of
each file holds, and each intermediate is signed by the root's key."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography import x509

from builder.signing.apple import certificates, verify

README = certificates.APPLE_RESOURCES / "README.md"


def test_each_file_hashes_to_the_value_its_readme_records():
    rows = re.findall(r"^\| `([A-Za-z0-9]+\.cer)` \|.*\| `([0-9a-f]{64})` \|$", README.read_text(), re.MULTILINE)
    files = sorted(p.name for p in certificates.APPLE_RESOURCES.glob("*.cer"))
    assert sorted(name for name, _ in rows) == files and len(files) == 4
    for name, digest in rows:
        assert hashlib.sha256((certificates.APPLE_RESOURCES / name).read_bytes()).hexdigest() == digest, name


def test_the_intermediates_are_signed_by_apple_root_ca():
    roots, intermediates = certificates.apple_roots(), certificates.apple_intermediates()
    assert [r.subject.rfc4514_string() for r in roots] == [
        "CN=Apple Root CA,OU=Apple Certification Authority,O=Apple Inc.,C=US"]
    names = sorted(c.subject.rfc4514_string() for c in intermediates)
    assert "C=US,O=Apple Inc.,OU=G2,CN=Developer ID Certification Authority" in names
    for cert in intermediates:
        cert.verify_directly_issued_by(roots[0])
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    devid = [c for c in intermediates if "Developer ID" in c.subject.rfc4514_string()]
    assert len(devid) == 2 and all(c.extensions.get_extension_for_oid(certificates.OID_DEVID_CA) for c in devid)


GENUINE = Path(__file__).resolve().parents[1] / "data" / "apple" / "developer-id-application-getsentry.cer"


def test_a_genuine_developer_id_certificate_is_classified_and_trusted_without_ca():
    """A real Developer ID Application certificate (tests/data/apple/README.md says where it is
    from): recognised by Apple's markers, chained through the bundled intermediate to the bundled
    root, trusted with no --ca. Checked at a fixed time inside its validity."""
    import datetime as dt

    cert = x509.load_der_x509_certificate(GENUINE.read_bytes())
    assert hashlib.sha256(GENUINE.read_bytes()).hexdigest() == "dc4f1d4c1136a21483c9cbd65c2201e593d3c57707877318c36a878d867cf705"
    assert certificates.developer_id_kind(cert) == certificates.APPLICATION
    report = verify.Report()
    verify.check_chain(report, cert, [], None, certificates.APPLICATION, now=dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc))
    assert not report.problems, report.problems
    assert report.trusted is True
    assert "chain to Apple Root CA (Apple's, bundled with builder)" in report.checked
    assert "issued by a Developer ID Certification Authority" in report.checked
    assert [c.split("CN=")[1].split(",")[0] for c in report.chain] == [
        "Developer ID Application: GetSentry LLC (97JCY7859U)", "Developer ID Certification Authority", "Apple Root CA"]

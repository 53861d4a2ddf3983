"""Apple's public CA certificates shipped in builder/resources/apple: what the README says of
each file holds, and each intermediate is signed by the root's key."""

from __future__ import annotations

import hashlib
import re

from cryptography import x509

from builder.signing import apple

README = apple.APPLE_RESOURCES / "README.md"


def test_each_file_hashes_to_the_value_its_readme_records():
    rows = re.findall(r"^\| `([A-Za-z0-9]+\.cer)` \|.*\| `([0-9a-f]{64})` \|$", README.read_text(), re.MULTILINE)
    files = sorted(p.name for p in apple.APPLE_RESOURCES.glob("*.cer"))
    assert sorted(name for name, _ in rows) == files and len(files) == 4
    for name, digest in rows:
        assert hashlib.sha256((apple.APPLE_RESOURCES / name).read_bytes()).hexdigest() == digest, name


def test_the_intermediates_are_signed_by_apple_root_ca():
    roots, intermediates = apple.apple_roots(), apple.apple_intermediates()
    assert [r.subject.rfc4514_string() for r in roots] == [
        "CN=Apple Root CA,OU=Apple Certification Authority,O=Apple Inc.,C=US"]
    names = sorted(c.subject.rfc4514_string() for c in intermediates)
    assert "C=US,O=Apple Inc.,OU=G2,CN=Developer ID Certification Authority" in names
    for cert in intermediates:
        cert.verify_directly_issued_by(roots[0])
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    devid = [c for c in intermediates if "Developer ID" in c.subject.rfc4514_string()]
    assert len(devid) == 2 and all(c.extensions.get_extension_for_oid(apple.OID_DEVID_CA) for c in devid)

"""Apple code signing from Linux, by concern:

    certificates   what a Developer ID certificate looks like; Apple's bundled roots
    identity       a Developer ID identity opened from its PKCS#12 (one cache per process)
    native         apple-platform-py, loaded once
    cms            CMS SignedData: checked, and given a fixed signing time
    sign           productsign and codesign: flat packages, DMGs, Mach-O files, .app bundles
    verify         the same, checked without Apple's tools, chain up to Apple Root CA or a CA
    notarization   submit when credentials are given; the notarized fields of a report

The byte-level parsers are in builder.binfmt (macho, cms, xar, ticket), the Notary client in
builder.signing.notary. Importing this package loads apple-platform's native library.
"""

from builder.signing.apple.identity import (
    classify_identities,
    identity_subject,
    open_identity,
    signing_time,
)
from builder.signing.apple.notarization import notarization_report, notarize
from builder.signing.apple.sign import sign_code, sign_dmg, sign_flat_package
from builder.signing.apple.verify import verify_code, verify_dmg, verify_flat_package

__all__ = [
    "classify_identities", "identity_subject", "open_identity", "signing_time",
    "sign_code", "sign_dmg", "sign_flat_package",
    "verify_code", "verify_dmg", "verify_flat_package",
    "notarization_report", "notarize",
]

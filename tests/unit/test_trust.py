"""Signed enrollments and pins (builder/trust.py): the attacker's tests first.

Enrollments made by an independent producer (tests/support/signed.py) must verify here, and
builder's own must verify there; every refusal names its reason as the agents' exit codes do."""

from __future__ import annotations

import json

import pytest

from builder.binfmt.slot import SLOT_SIZE, capacity
from builder.enrollment import MAX_ID_CHARS, MAX_TOKEN_BYTES, MAX_URL_CHARS, Enrollment, Secret
from builder.errors import ConfigError, EnrollmentError
from builder.trust import EnrollmentRefused, PinnedKey, Trust, console_url_problem, describe, verify
from tests.support import signed as oracle
from tests.support.enrollkeys import new_key

NOW = 1_800_000_000


@pytest.fixture(scope="module")
def key():
    return oracle.new_key()


@pytest.fixture(scope="module")
def trust(key):
    return Trust((PinnedKey.from_public_key(key.public_key()),), ("console.example.com", "*.example.net:8443"))


def refused(jws, trust, now=NOW) -> str:
    with pytest.raises(EnrollmentRefused) as info:
        verify(jws, trust, now)
    assert "tok-0123456789abcdef" not in str(info.value)
    return info.value.reason


def test_an_independent_producers_enrollment_verifies(key, trust):
    got = verify(oracle.sign(key, issued_at=NOW - 10), trust, NOW)
    assert (got.account_id, got.group_id, got.console_url) == ("acct-1", "grp-1", "https://console.example.com")
    assert got.token.reveal() == "tok-0123456789abcdef" and got.key_id == oracle.kid(key)


def test_key_id_is_the_rfc7638_thumbprint(key):
    assert PinnedKey.from_public_key(key.public_key()).kid == oracle.kid(key)
    # RFC 7638's own example would need RSA; the canonical member order is what matters here.
    assert json.loads(Trust((PinnedKey.from_public_key(key.public_key()),), ("a.example",)).to_json_bytes())["keys"][0] == oracle.jwk(key)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_one_changed_character_anywhere_is_refused(key, trust, part):
    assert refused(oracle.tamper(oracle.sign(key, issued_at=NOW), part), trust) in ("untrusted", "malformed")


def test_an_unpinned_key_is_refused(trust):
    assert refused(oracle.sign(oracle.new_key(), issued_at=NOW), trust) == "untrusted"


def test_a_pinned_kid_with_another_keys_signature_is_refused(key, trust):
    # The attacker names our key id in the header and signs with their own key.
    assert refused(oracle.sign(oracle.new_key(), issued_at=NOW, key_id=oracle.kid(key)), trust) == "untrusted"


def test_payload_key_id_must_equal_the_signing_key(key, trust):
    forged = oracle.sign_parts(key, {"alg": "ES256", "kid": oracle.kid(key), "typ": "enrollment+jws"},
                               {"account_id": "a", "group_id": "g", "console_url": "https://console.example.com",
                                "enrollment_token": "tok-0123456789abcdef", "key_id": "someone-else", "issued_at": NOW})
    assert refused(forged, trust) == "untrusted"


def test_expired_is_refused_and_the_expiry_is_signed(key, trust):
    jws = oracle.sign(key, issued_at=NOW - 100, expires_at=NOW)
    assert refused(jws, trust) == "expired"
    assert verify(jws, trust, NOW - 1).expires_at == NOW


@pytest.mark.parametrize("header", [
    {"alg": "none", "kid": "K", "typ": "enrollment+jws"},
    {"alg": "HS256", "kid": "K", "typ": "enrollment+jws"},
    {"alg": "ES256", "kid": "K", "typ": "enrollment+jws", "crit": ["exp"]},
    {"alg": "ES256", "kid": "K", "typ": "JWT"},
    {"alg": "ES256", "typ": "enrollment+jws"},
])
def test_headers_other_than_es256_with_kid_are_malformed(key, trust, header):
    header = {k: (oracle.kid(key) if v == "K" else v) for k, v in header.items()}
    payload = {"account_id": "a", "group_id": "g", "console_url": "https://console.example.com",
               "enrollment_token": "tok-0123456789abcdef", "key_id": oracle.kid(key), "issued_at": NOW}
    assert refused(oracle.sign_parts(key, header, payload), trust) == "malformed"


@pytest.mark.parametrize("mangle", [
    lambda s: s + "\n", lambda s: s + "=", lambda s: " " + s, lambda s: s + ".", lambda s: s.replace(".", "..", 1),
    lambda s: s.split(".", 1)[1], lambda s: s + "." + s.split(".")[2],
])
def test_framing_variants_are_malformed(key, trust, mangle):
    assert refused(mangle(oracle.sign(key, issued_at=NOW)), trust) in ("malformed", "untrusted")


def test_duplicate_json_keys_are_malformed(key, trust):
    header = oracle.b64(json.dumps({"alg": "ES256", "kid": oracle.kid(key), "typ": "enrollment+jws"},
                                   separators=(",", ":")).encode())
    body = (b'{"account_id":"a","console_url":"https://console.example.com","enrollment_token":"t",'
            b'"group_id":"g","issued_at":1,"key_id":"' + oracle.kid(key).encode() + b'","group_id":"other"}')
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    signing_input = header + "." + oracle.b64(body)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    jws = signing_input + "." + oracle.b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    assert refused(jws, trust) == "malformed"


@pytest.mark.parametrize("url, allowed", [
    ("https://console.example.com", True),
    ("https://CONSOLE.example.com/path?q=1#f", True),
    ("https://console.example.com:443/x", True),
    ("https://console.example.com:8443/x", False),  # a port the pattern does not name
    ("http://console.example.com", False),
    ("https://user:pass@console.example.com", False),
    ("https://console.example.com@evil.example", False),
    ("https://console.example.com.evil.example", False),
    ("https://evilconsole.example.com", False),
    ("https://a.example.net:8443", True),
    ("https://a.b.example.net:8443/p", True),
    ("https://example.net:8443", False),  # *.domain is its subdomains, not the domain
    ("https://a.example.net", False),  # the pattern names :8443
    ("https://a.example.net:08443", True),  # decimal, as the agents read it
    ("https://127.0.0.1", False),
    ("https://[::1]/", False),
    ("https://console%2eexample.com", False),
    ("https://console.example.com\\@evil", False),
    ("https://", False),
])
def test_console_host_rules(url, allowed):
    assert (console_url_problem(url, ("console.example.com", "*.example.net:8443")) is None) is allowed


def test_console_host_outside_the_allowlist_signed_by_a_pinned_key_is_refused(key, trust):
    assert refused(oracle.sign(key, issued_at=NOW, console_url="https://attacker.example"), trust) == "host"


def test_key_rotation(key):
    second = oracle.new_key()
    both = Trust(tuple(PinnedKey.from_public_key(k.public_key()) for k in (key, second)), ("console.example.com",))
    first_only = Trust((PinnedKey.from_public_key(key.public_key()),), ("console.example.com",))
    for k in (key, second):
        verify(oracle.sign(k, issued_at=NOW), both, NOW)
    verify(oracle.sign(key, issued_at=NOW), first_only, NOW)
    assert refused(oracle.sign(second, issued_at=NOW), first_only) == "untrusted"


@pytest.mark.parametrize("doc", [
    b"", b"{}", b'{"version": 2, "keys": [], "console_hosts": []}',
    b'{"version": 1, "keys": [], "console_hosts": ["a.example"]}',
    b'{"version": 1, "keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}], "console_hosts": ["a.example"]}',
    b'{"version": 1, "keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}], "console_hosts": ["a.example"]}',
])
def test_malformed_trust_files_are_refused(doc):
    with pytest.raises(ConfigError, match="trust file is malformed"):
        Trust.from_json_bytes(doc, "trust.json")


@pytest.mark.parametrize("pattern", ["10.0.0.1", "https://a.example", "a.example/x", "user@a.example", "*.", "*", "a..b",
                                     "a.example:0", "a.example:99999", "a_b.example"])
def test_bad_host_patterns_are_refused(pattern):
    with pytest.raises(ConfigError, match="console host"):
        Trust((new_key().pin,), (pattern,))


def test_builder_signs_what_the_oracle_expects_and_refuses_what_agents_would():
    key = new_key()
    trust = Trust((key.pin,), ("console.example.com",))
    e = Enrollment(account_id="a", group_id="g", token=Secret("tok-0123456789abcdef"),
                   console_url="https://console.example.com/x")
    signed = key.sign(e, trust, issued_at=NOW)
    assert key.sign(e, trust, issued_at=NOW).jws == signed.jws  # RFC 6979: reproducible
    assert verify(signed.jws.reveal(), trust, NOW).public() == signed.public()
    with pytest.raises(EnrollmentError, match="console_url is not allowed"):
        key.sign(Enrollment(account_id="a", group_id="g", token=Secret("tok-0123456789abcdef"),
                            console_url="https://attacker.example"), trust)
    with pytest.raises(EnrollmentError, match="not pinned by this release"):
        new_key().sign(e, trust)


def test_the_largest_enrollment_fits_the_default_slot():
    key = new_key()
    url = "https://console.example.com/" + "p" * (MAX_URL_CHARS - len("https://console.example.com/"))
    e = Enrollment(account_id="a" * MAX_ID_CHARS, group_id="g" * MAX_ID_CHARS, token=Secret("t" * MAX_TOKEN_BYTES),
                   console_url=url)
    jws = key.sign(e, Trust((key.pin,), ("console.example.com",)), issued_at=NOW, expires_at=NOW + 1).jws.reveal()
    assert len(jws) + 2 <= capacity(SLOT_SIZE)  # + the checksum-balancing word


def test_describe_reports_state_without_the_token(key, trust):
    report, problem = describe(oracle.sign(key, issued_at=NOW), trust, NOW)
    assert report["state"] == "valid" and problem is None and "enrollment_token" not in report
    assert describe('{"account_id": "a"}', trust, NOW)[0]["state"] == "unsigned"
    assert describe(oracle.sign(oracle.new_key()), trust, NOW)[0]["state"] == "invalid"
    assert describe(oracle.sign(key, issued_at=1, expires_at=2), trust, NOW)[0]["state"] == "expired"
    assert describe(oracle.sign(key, console_url="https://x.example"), trust, NOW)[0]["state"] == "host not allowed"

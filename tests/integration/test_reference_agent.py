"""The Python reference agent (payload/agent/agent.py) against the signed-enrollment contract
(/work/spec/signed-enrollment.md), attacker's cases first.

SEs and trust files come from tests/support/signed.py, an independent producer (never builder's
signer). Real installer slots are made with builder's pure format code and osslsigncode: a tiny
mingw EXE and a wixl MSI, signed with the dev keys, given a slot, then stamped. The agent finds
trust.json beside agent.py, so every test runs a copy of agent.py in a folder of its own, either
as a process (the venv's python) or imported from there and called through main().

Every refusal is checked for its exit code, one `agent: ...` line, and that nothing was written.
No test prints a token: outputs are checked for it, never shown with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import importlib.util
import ipaddress
import json
import os
import py_compile
import shutil
import signal
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from builder.binfmt import cfb, pe, tag
from builder.binfmt.pkcs7 import SLOT_OID, add_slot, oid_der
from builder.binfmt.slot import encode_slot
from builder.signing import authenticode
from builder.signing.authenticode import SigningKey
from tests.support import signed
from tests.support.signed import b64, kid, new_key, sign, sign_parts, tamper, trust_json

ROOT = Path(__file__).resolve().parents[2]
AGENT_PY = ROOT / "payload" / "agent" / "agent.py"
MAGIC = b"ENRS" + b"LOT1"
HOSTS = ["console.example.com", "*.example.net", "eu.example.org:8443"]
KEY_A, KEY_B = new_key(), new_key()
TOKEN = "tok-" + "Zq7" * 40  # recognisable in any output it must never reach
SLOT = 4096  # bytes; the release default is larger, the slot's size is not what is tested here
SLOT_SMALL = 640  # small enough that the MSI's signature stream lives in the mini stream


# --------------------------------------------------------------------------------- helpers


class Agent:
    """A copy of agent.py in its own folder, with that folder's trust.json."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(AGENT_PY, home / "agent.py")
        self.trust(KEY_A)

    def trust(self, *keys, hosts=HOSTS) -> None:
        (self.home / "trust.json").write_bytes(trust_json(keys, hosts))

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(self.home / "agent.py"), *args], capture_output=True,
                              text=True, env=env or agent_env(), timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(self.home / "agent.py"), *args], env=env or agent_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "AGENT_CA_BUNDLE"}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", **extra}


def load_module(home: Path):
    spec = importlib.util.spec_from_file_location(f"reference_agent_{uuid.uuid4().hex}", home / "agent.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path / "agent")


@pytest.fixture(scope="module")
def inproc(tmp_path_factory) -> SimpleNamespace:
    """agent.py imported from its own folder, for the long tables of SE cases."""
    home = Agent(tmp_path_factory.mktemp("inproc") / "agent")
    return SimpleNamespace(agent=home, mod=load_module(home.home))


def sign_raw(key, header: bytes, payload: bytes) -> str:
    """An SE over exact JSON bytes (duplicate keys, odd spellings), signed for real."""
    signing_input = b64(header) + "." + b64(payload)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def header_json(key=KEY_A, **over) -> dict:
    return {"alg": "ES256", "kid": kid(key), "typ": "enrollment+jws", **over}


def payload_json(key=KEY_A, **over) -> dict:
    return {"account_id": "acct-1", "group_id": "grp-1", "console_url": "https://console.example.com",
            "enrollment_token": TOKEN, "key_id": kid(key), "issued_at": int(time.time()), **over}


def good_se(key=KEY_A, **kw) -> str:
    return sign(key, token=TOKEN, **kw)


def config_bytes(se: str) -> bytes:
    """The contract's config, spelt out independently of the agent."""
    return b'{"enrollment": "' + se.encode("ascii") + b'"}'


def clean(text: str) -> None:
    assert TOKEN not in text, "the token reached the agent's output"


def refused_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agent: "), f"not one agent: line: {stderr!r}"
    clean(stderr)
    return lines[0]


def check_se(inproc: SimpleNamespace, capsys, tmp_path: Path, data: bytes | str, code: int) -> str:
    """enroll-from-file and verify-enrollment on `data`: exit `code`; on refusal one line and
    nothing written; on success the exact config and the public fields."""
    source = tmp_path / f"se-{uuid.uuid4().hex[:8]}"
    source.write_bytes(data.encode() if isinstance(data, str) else data)
    config = tmp_path / f"cfg-{uuid.uuid4().hex[:8]}" / "enrollment.json"
    rc = inproc.mod.main(["enroll-from-file", "--file", str(source), "--config", str(config)])
    out = capsys.readouterr()
    clean(out.out + out.err)
    assert rc == code, out.err
    assert out.out == ""
    if code:
        refused_line(out.err)
        assert not config.parent.exists(), "a refused enrollment wrote something"
    else:
        assert out.err == ""
        assert config.read_bytes() == config_bytes(source.read_text())
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
    rc = inproc.mod.main(["verify-enrollment", "--file", str(source)])
    out = capsys.readouterr()
    clean(out.out + out.err)
    assert rc == code, out.err
    if code:
        assert out.out == ""
        return refused_line(out.err)
    assert out.err == "" and out.out.endswith("}\n") and out.out.count("\n") == 1
    return out.out


# ===================================================================== the SE itself (attacks)


def test_the_agent_does_not_contain_the_magic(tmp_path: Path) -> None:
    # The frozen agent is embedded in the installers: a literal magic could pass for a slot.
    assert MAGIC not in AGENT_PY.read_bytes()
    pyc = tmp_path / "agent.pyc"
    py_compile.compile(str(AGENT_PY), cfile=str(pyc), doraise=True)  # what PyInstaller embeds
    assert MAGIC not in pyc.read_bytes()


def test_a_genuine_se_from_a_file_is_the_config_byte_for_byte(inproc, capsys, tmp_path: Path) -> None:
    inproc.agent.trust(KEY_A)
    se = good_se(account_id="acct-ü-😀", expires_at=int(time.time()) + 3600)
    printed = json.loads(check_se(inproc, capsys, tmp_path, se, 0))
    assert printed["account_id"] == "acct-ü-😀" and printed["key_id"] == kid(KEY_A)
    assert printed["console_url"] == "https://console.example.com" and "expires_at" in printed
    assert not any(TOKEN in str(v) for v in printed.values())

    # Over an older config, with a careless umask: replaced atomically, 0600, no temp file left.
    config = tmp_path / "etc" / "enrollment.json"
    config.parent.mkdir()
    config.write_bytes(b"old")
    config.chmod(0o644)
    (tmp_path / "se").write_text(se)
    old_umask = os.umask(0)
    try:
        assert inproc.mod.main(["enroll-from-file", "--file", str(tmp_path / "se"), "--config", str(config)]) == 0
    finally:
        os.umask(old_umask)
    assert config.read_bytes() == config_bytes(se)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert [p.name for p in config.parent.iterdir()] == ["enrollment.json"]
    assert TOKEN not in repr(inproc.mod.verify_se(se, inproc.mod.load_trust(), "test"))
    capsys.readouterr()


def test_an_unpinned_key_is_refused(inproc, capsys, tmp_path: Path) -> None:
    inproc.agent.trust(KEY_A)
    assert "pinned" in check_se(inproc, capsys, tmp_path, good_se(KEY_B), 10)
    # An unknown kid in a header signed by the pinned key is no better.
    se = sign_parts(KEY_A, header_json(kid=kid(KEY_B)), payload_json(key_id=kid(KEY_B)))
    check_se(inproc, capsys, tmp_path, se, 10)


def semantic_tamper(se: str, part: int) -> str:
    """`se` with one character of header or payload changed such that the part still decodes to
    a JSON object with the same keys: only the signature can tell."""
    original = json.loads(signed_part(se, part))
    for index in range(len(se.split(".")[part]) - 1):
        candidate = tamper(se, part, index)
        try:
            obj = json.loads(signed_part(candidate, part))
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.keys() == original.keys() and obj != original:
            if part == 0 and obj["alg"] == "ES256" and obj["typ"] == "enrollment+jws" and obj["kid"]:
                return candidate
            if part == 1 and all(isinstance(obj[k], type(original[k])) and obj[k] for k in original):
                return candidate
    raise AssertionError("no semantic one-character change found")


def signed_part(se: str, part: int) -> bytes:
    import base64

    text = se.split(".")[part]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_one_character_changed_in_each_part_is_refused(inproc, capsys, tmp_path: Path) -> None:
    inproc.agent.trust(KEY_A)
    se = good_se()
    for part in (0, 1):
        check_se(inproc, capsys, tmp_path, semantic_tamper(se, part), 10)
    for index in (0, 20, 42, 84):  # r and s, first and last characters included
        check_se(inproc, capsys, tmp_path, tamper(se, 2, index), 10)


def test_key_id_other_than_the_kid_is_refused(inproc, capsys, tmp_path: Path) -> None:
    inproc.agent.trust(KEY_A, KEY_B)
    # Validly signed by pinned A, but the payload claims B's key_id (or none that exists).
    for key_id in (kid(KEY_B), "", kid(KEY_A) + "x"):
        se = sign_parts(KEY_A, header_json(), payload_json(key_id=key_id))
        check_se(inproc, capsys, tmp_path, se, 10)


def test_expiry(inproc, capsys, tmp_path: Path) -> None:
    inproc.agent.trust(KEY_A)
    now = int(time.time())
    assert "expired" in check_se(inproc, capsys, tmp_path, good_se(expires_at=now - 1), 11)
    check_se(inproc, capsys, tmp_path, good_se(expires_at=now), 11)  # now < expires_at, strictly
    check_se(inproc, capsys, tmp_path, good_se(expires_at=now + 120), 0)
    check_se(inproc, capsys, tmp_path, good_se(), 0)  # no expires_at: never expires
    # Order: a bad signature (10) is found before the expiry (11).
    check_se(inproc, capsys, tmp_path, tamper(good_se(expires_at=now - 1), 2), 10)


@pytest.mark.parametrize("url", [
    "https://console.example.com",
    "https://console.example.com/tenant/x?a=1&b=2#frag",
    "HTTPS://CONSOLE.Example.COM/upper",
    "https://console.example.com:443/",
    "https://a.example.net",
    "https://a.b.example.net/deep",
    "https://eu.example.org:8443/eu",
    "https://EU.example.org:08443",  # five digits, value 8443
])
def test_allowed_console_urls(inproc, capsys, tmp_path: Path, url: str) -> None:
    inproc.agent.trust(KEY_A, hosts=HOSTS)
    assert json.loads(check_se(inproc, capsys, tmp_path, good_se(console_url=url), 0))["console_url"] == url


@pytest.mark.parametrize("url", [
    "http://console.example.com",  # not https
    "https//console.example.com",
    "ftp://console.example.com",
    "https:/console.example.com",
    "https://user@console.example.com",  # userinfo
    "https://console.example.com@evil.example",
    "https://user:pw@console.example.com",
    "https://10.0.0.1",  # IP literals
    "https://127.0.0.1:8443",
    "https://[::1]/",
    "https://[::ffff:1.2.3.4]",
    "https://example.net",  # the apex is not under *.example.net
    "https://.example.net",
    "https://xexample.net",
    "https://console.example.com:8443",  # a pattern without a port: none or 443 only
    "https://eu.example.org",  # a pattern with a port: exactly that port, named in the URL
    "https://eu.example.org:443",
    "https://eu.example.org:8444",
    "https://console.example.com:0",  # port rules
    "https://console.example.com:65536",
    "https://console.example.com:",
    "https://console.example.com:44a",
    "https://console.example.com:000443",
    "https://console.example.com:443:443",
    "https://console.example.com.evil.example",  # look-alikes
    "https://evilconsole.example.com",
    "https://evil.example/console.example.com",
    "https://evil.example?console.example.com",
    "https://evil.example#console.example.com",
    "https://console%2eexample.com",  # percent in the authority
    "https://console.example.com%2f@evil.example",
    "https://console.example.com\\@evil.example",  # backslash, whitespace, controls
    "https://console.example.com/a b",
    "https://console.example.com/\ta",
    "https://console.example.com\n",
    "https://console.example.com/\x7f",
    "https://",  # empty host
    "https:///console.example.com",
    "https://:443/",
])
def test_console_url_outside_the_allowlist_is_refused(inproc, capsys, tmp_path: Path, url: str) -> None:
    inproc.agent.trust(KEY_A, hosts=HOSTS)
    assert "console host not allowed" in check_se(inproc, capsys, tmp_path, good_se(console_url=url), 12)


def test_trust_file_missing_or_malformed(inproc, capsys, tmp_path: Path) -> None:
    trust = inproc.agent.home / "trust.json"
    key = signed.jwk(KEY_A)
    cases = {
        "not JSON": b"{",
        "not an object": b"[]",
        "version 2": json.dumps({"console_hosts": HOSTS, "keys": [key], "version": 2}).encode(),
        "version missing": json.dumps({"console_hosts": HOSTS, "keys": [key]}).encode(),
        "version true": json.dumps({"console_hosts": HOSTS, "keys": [key], "version": True}).encode(),
        "no keys": json.dumps({"console_hosts": HOSTS, "keys": [], "version": 1}).encode(),
        "no hosts": json.dumps({"console_hosts": [], "keys": [key], "version": 1}).encode(),
        "hosts not a list": json.dumps({"console_hosts": "console.example.com", "keys": [key], "version": 1}).encode(),
        "an empty host": json.dumps({"console_hosts": [""], "keys": [key], "version": 1}).encode(),
        "P-384": json.dumps({"console_hosts": HOSTS, "keys": [{**key, "crv": "P-384"}], "version": 1}).encode(),
        "RSA": json.dumps({"console_hosts": HOSTS, "keys": [{**key, "kty": "RSA"}], "version": 1}).encode(),
        "short x": json.dumps({"console_hosts": HOSTS, "keys": [{**key, "x": b64(bytes(31))}], "version": 1}).encode(),
        "padded y": json.dumps({"console_hosts": HOSTS, "keys": [{**key, "y": key["y"] + "="}], "version": 1}).encode(),
        "no kid": json.dumps({"console_hosts": HOSTS, "keys": [{k: v for k, v in key.items() if k != "kid"}],
                              "version": 1}).encode(),
        "duplicate key": b'{"version": 1, "version": 1, "keys": [' + json.dumps(key).encode()
                         + b'], "console_hosts": ["console.example.com"]}',
    }
    try:
        for name, data in cases.items():
            trust.write_bytes(data)
            line = check_se(inproc, capsys, tmp_path, good_se(), 13)
            assert "trust" in line, name
        trust.unlink()
        check_se(inproc, capsys, tmp_path, good_se(), 13)
        # Check 1 comes first: a malformed SE (6) against no trust file is 13.
        check_se(inproc, capsys, tmp_path, good_se() + "=", 13)
    finally:
        inproc.agent.trust(KEY_A)


def test_malformed_ses_are_refused(inproc, capsys, tmp_path: Path) -> None:
    inproc.agent.trust(KEY_A)
    se = good_se()
    h, p, s = se.split(".")
    header, payload = json.dumps(header_json()).encode(), json.dumps(payload_json()).encode()
    cases = {
        # the header: only alg ES256, typ enrollment+jws and a kid; anything it asks for is refused
        "alg none": sign_parts(KEY_A, header_json(alg="none"), payload_json()),
        "alg none, no signature": b64(json.dumps(header_json(alg="none")).encode()) + "." + p + ".",
        "alg HS256": sign_parts(KEY_A, header_json(alg="HS256"), payload_json()),
        "alg es256": sign_parts(KEY_A, header_json(alg="es256"), payload_json()),
        "no alg": sign_parts(KEY_A, {"kid": kid(KEY_A), "typ": "enrollment+jws"}, payload_json()),
        "typ JWT": sign_parts(KEY_A, header_json(typ="JWT"), payload_json()),
        "no typ": sign_parts(KEY_A, {"alg": "ES256", "kid": kid(KEY_A)}, payload_json()),
        "crit": sign_parts(KEY_A, header_json(crit=["exp"]), payload_json()),
        "jku": sign_parts(KEY_A, header_json(jku="https://evil.example/keys"), payload_json()),
        "x5u": sign_parts(KEY_A, header_json(x5u="https://evil.example/cert"), payload_json()),
        "jwk": sign_parts(KEY_A, header_json(jwk=signed.jwk(KEY_B)), payload_json()),
        "empty kid": sign_parts(KEY_A, header_json(kid=""), payload_json(key_id="")),
        "numeric kid": sign_parts(KEY_A, header_json(kid=7), payload_json()),
        # duplicate keys, each copy signed: which one would a reader take?
        "duplicate alg": sign_raw(KEY_A, b'{"alg":"ES256","alg":"none","kid":"' + kid(KEY_A).encode()
                                  + b'","typ":"enrollment+jws"}', payload),
        "duplicate kid": sign_raw(KEY_A, b'{"alg":"ES256","kid":"' + kid(KEY_A).encode() + b'","kid":"'
                                  + kid(KEY_B).encode() + b'","typ":"enrollment+jws"}', payload),
        "duplicate console_url": sign_raw(KEY_A, header, payload[:-1]
                                          + b', "console_url": "https://evil.example"}'),
        "escaped duplicate": sign_raw(KEY_A, header, payload[:-1] + b', "console\\u005furl": "https://evil.example"}'),
        "nested duplicate": sign_raw(KEY_A, header, payload[:-1] + b', "x": {"a": 1, "a": 2}}'),
        # base64url spelling
        "padding on the header": h + "=." + p + "." + s,
        "padding on the signature": se + "==",
        "trailing newline": se + "\n",
        "trailing CRLF": se + "\r\n",
        "leading space": " " + se,
        "space inside": h + ". " + p + "." + s,
        "standard base64": se.replace("-", "+").replace("_", "/") if ("-" in se or "_" in se)
                           else h + "." + p + "+." + s,
        "non-ASCII byte": se.encode() + b"\xc3\xa9",
        "NUL": se + "\0",
        "non-canonical last character": h + "." + p + "." + s[:-1] + chr(ord(s[-1]) + 1),
        "two parts": h + "." + p,
        "four parts": se + "." + s,
        "empty": "",
        "only dots": "..",
        "signature 63 bytes": h + "." + p + "." + b64(signed_part(se, 2)[:63]),
        "signature 65 bytes": h + "." + p + "." + b64(signed_part(se, 2) + b"\0"),
        # JSON
        "header not JSON": b64(b"{alg") + "." + p + "." + s,
        "payload an array": sign_raw(KEY_A, header, b"[1]"),
        "payload NaN": sign_raw(KEY_A, header, payload[:-1] + b', "x": NaN}'),
        "lone surrogate": sign_raw(KEY_A, header, payload[:-1] + b', "x": "\\ud800"}'),
        "BOM": sign_raw(KEY_A, b"\xef\xbb\xbf" + header, payload),
        "not UTF-8": sign_raw(KEY_A, header, payload[:-1] + b', "x": "\xff"}'),
        "trailing garbage": sign_raw(KEY_A, header, payload + b"x"),
        # the payload's fields and types
        "no account_id": sign_parts(KEY_A, header_json(), {k: v for k, v in payload_json().items() if k != "account_id"}),
        "no enrollment_token": sign_parts(KEY_A, header_json(),
                                          {k: v for k, v in payload_json().items() if k != "enrollment_token"}),
        "no key_id": sign_parts(KEY_A, header_json(), {k: v for k, v in payload_json().items() if k != "key_id"}),
        "no issued_at": sign_parts(KEY_A, header_json(), {k: v for k, v in payload_json().items() if k != "issued_at"}),
        "empty group_id": sign_parts(KEY_A, header_json(), payload_json(group_id="")),
        "NUL in account_id": sign_parts(KEY_A, header_json(), payload_json(account_id="a\0b")),
        "numeric token": sign_parts(KEY_A, header_json(), payload_json(enrollment_token=12345)),
        "console_url null": sign_parts(KEY_A, header_json(), payload_json(console_url=None)),
        "key_id a number": sign_parts(KEY_A, header_json(), payload_json(key_id=1)),
        "issued_at a string": sign_parts(KEY_A, header_json(), payload_json(issued_at="1700000000")),
        "issued_at a float": sign_parts(KEY_A, header_json(), payload_json(issued_at=1.5)),
        "issued_at 1e9": sign_raw(KEY_A, header, payload.replace(b'"issued_at": ', b'"issued_at": 1e9, "y": ')),
        "issued_at true": sign_parts(KEY_A, header_json(), payload_json(issued_at=True)),
        "issued_at past int64": sign_parts(KEY_A, header_json(), payload_json(issued_at=2 ** 63)),
        "expires_at null": sign_parts(KEY_A, header_json(), payload_json(expires_at=None)),
        "expires_at a string": sign_parts(KEY_A, header_json(), payload_json(expires_at="never")),
        # longer than 16384 characters, though validly signed
        "too long": good_se(extra={"pad": "x" * 12000}),
    }
    assert len(cases["too long"]) > 16384
    for name, data in cases.items():
        line = check_se(inproc, capsys, tmp_path, data, 6)
        assert "malformed" in line or "longer than" in line, (name, line)
    # What the contract allows: unknown payload keys, whitespace and key order in the JSON, and
    # exactly 16384 characters.
    check_se(inproc, capsys, tmp_path, good_se(extra={"future": {"nested": [1, 2.5, None, True]}}), 0)
    check_se(inproc, capsys, tmp_path, sign_raw(KEY_A, b' { "typ" : "enrollment+jws", "kid": "' + kid(KEY_A).encode()
                                                + b'", "alg":"ES256" } ', b"\n" + payload + b"\n"), 0)
    base = len(good_se(extra={"pad": ""}))  # each 3 bytes of padding add 4 characters
    longest = next(x for x in (good_se(extra={"pad": "x" * n}) for n in range((16384 - base) * 3 // 4 - 3,
                                                                             (16384 - base) * 3 // 4 + 4))
                   if len(x) == 16384)
    check_se(inproc, capsys, tmp_path, longest, 0)


def test_key_rotation(inproc, capsys, tmp_path: Path) -> None:
    try:
        inproc.agent.trust(KEY_A, KEY_B)  # during a rotation both are pinned
        for key in (KEY_A, KEY_B):
            assert json.loads(check_se(inproc, capsys, tmp_path, good_se(key), 0))["key_id"] == kid(key)
        inproc.agent.trust(KEY_B)  # after it, the old key is refused
        check_se(inproc, capsys, tmp_path, good_se(KEY_A), 10)
        check_se(inproc, capsys, tmp_path, good_se(KEY_B), 0)
        # A pin that is no point on the curve verifies nothing, and leaves the other pins working.
        bad = {**signed.jwk(KEY_A), "y": signed.jwk(KEY_B)["y"]}
        (inproc.agent.home / "trust.json").write_bytes(json.dumps(
            {"console_hosts": HOSTS, "keys": [bad, signed.jwk(KEY_B)], "version": 1}).encode())
        check_se(inproc, capsys, tmp_path, good_se(KEY_A), 10)
        check_se(inproc, capsys, tmp_path, good_se(KEY_B), 0)
    finally:
        inproc.agent.trust(KEY_A)


def test_usage_errors(agent: Agent, tmp_path: Path) -> None:
    (tmp_path / "se").write_text(good_se())
    config = str(tmp_path / "cfg" / "enrollment.json")
    for args in [
        ["write-config", "--config", config],  # removed: it trusted four unsigned registry values
        ["enroll-from-file", "--file", str(tmp_path / "se"), "--config", "relative.json"],
        ["enroll-from-file", "--file", str(tmp_path / "se"), "--config", config, "--registry-key", "K"],
        ["enroll-from-registry", "--config", config],  # Windows only
        ["enroll-from-file", "--file", str(tmp_path / "se"), "--file", str(tmp_path / "se"), "--config", config],
        ["enroll-from-file", "--fil", str(tmp_path / "se"), "--config", config],  # no abbreviations
        ["enroll-from-installer", "--config", config],
        ["verify-enrollment"],
        ["service", "--config", config, "--retry-max", "0"],
    ]:
        result = agent.run(*args)
        assert result.returncode == 2, (args, result.stderr)
        refused_line(result.stderr)
    assert not Path(config).parent.exists()
    assert agent.run("--version").stdout.strip() == "1.0.0"
    result = agent.run("enroll-from-file", "--file", str(tmp_path / "absent"), "--config", config)
    assert result.returncode == 7 and not Path(config).parent.exists()
    result = agent.run("verify-enrollment", "--file", str(tmp_path))
    assert result.returncode == 7, result.stderr


# ===================================================================== installer slots


WXS = """<?xml version="1.0" encoding="utf-8"?>
<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">
  <Product Id="{6B1C0E2A-3B1F-4C55-9E0B-6A3D2E1F0A12}" Name="Agent Slot Test" Language="1033"
           Version="1.0.0" Manufacturer="Test" UpgradeCode="{0F3E5D7C-1A2B-4C3D-8E9F-A0B1C2D3E4F6}">
    <Package InstallerVersion="200" Compressed="yes" InstallScope="perMachine"/>
    <Media Id="1" Cabinet="data.cab" EmbedCab="yes"/>
    <Directory Id="TARGETDIR" Name="SourceDir">
      <Directory Id="ProgramFiles64Folder">
        <Directory Id="INSTALLDIR" Name="AgentSlotTest">
          <Component Id="MainFile" Guid="{2C4D6E8F-0A1B-4C2D-9E3F-5A6B7C8D9E10}" Win64="yes">
            <File Id="HelloTxt" Name="hello.txt" Source="hello.txt" KeyPath="yes"/>
          </Component>
        </Directory>
      </Directory>
    </Directory>
    <Feature Id="Main" Level="1">
      <ComponentRef Id="MainFile"/>
    </Feature>
  </Product>
</Wix>
"""
SIGNATURE_STREAM = "\x05DigitalSignature"


def check(*cmd, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert shutil.which(str(cmd[0])), f"{cmd[0]} is not installed (see RESEARCH.md for the package)"
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installers(dev_keys, tmp_path_factory) -> SimpleNamespace:
    """Signed EXE and MSI releases with an empty slot, as builder makes them (pure code plus
    osslsigncode), and the signed EXE without a slot."""
    d = tmp_path_factory.mktemp("installers")
    key = SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key)
    (d / "hello.c").write_text("int main(void) { return 0; }\n")
    check("x86_64-w64-mingw32-gcc", "-O2", "-s", "-o", d / "unsigned.exe", d / "hello.c")
    authenticode.sign(key, d / "unsigned.exe", d / "signed.exe")
    authenticode.add_enrollment_slot(d / "signed.exe", d / "base.exe", "exe", SLOT)

    (d / "hello.txt").write_text("hello\n")
    (d / "product.wxs").write_text(WXS)
    proc = check("wixl", "-a", "x64", "-o", "unsigned.msi", "product.wxs", cwd=d)
    assert "WARNING" not in proc.stderr and "CRITICAL" not in proc.stderr, proc.stderr
    authenticode.sign(key, d / "unsigned.msi", d / "signed.msi")
    authenticode.add_enrollment_slot(d / "signed.msi", d / "base.msi", "msi", SLOT)
    authenticode.add_enrollment_slot(d / "signed.msi", d / "base-small.msi", "msi", SLOT_SMALL)
    for base in ("base.exe", "base.msi", "base-small.msi"):
        assert authenticode.verify(d / base, dev_keys.ca_cert).ok, base
    # The two MSIs exercise both ways a compound file stores a stream.
    sizes = {name: len(cfb.read_stream((d / name).read_bytes(), SIGNATURE_STREAM)) for name in ("base.msi", "base-small.msi")}
    assert sizes["base.msi"] >= 4096 > sizes["base-small.msi"], sizes
    return SimpleNamespace(dir=d, exe=d / "base.exe", msi=d / "base.msi", small_msi=d / "base-small.msi",
                           signed_exe=d / "signed.exe", ca=dev_keys.ca_cert)


def stamp(base: Path, kind: str, se: str | bytes, out: Path) -> Path:
    """`base` with `se` written into its slot, as builder's stamp does it (same length)."""
    data = base.read_bytes()
    extents = tag.slot_extents(data, kind, base.name)
    size = sum(n for _, n in extents)
    payload = se.encode() if isinstance(se, str) else se
    pieces = tag.stamp_pieces(len(data), extents, encode_slot(payload, size), tag.checksum_field(data, kind))
    out.write_bytes(tag.apply_pieces(data, pieces))
    return out


def enroll_installer(agent: Agent, installer: Path, config: Path) -> subprocess.CompletedProcess[str]:
    result = agent.run("enroll-from-installer", "--installer", str(installer), "--config", str(config))
    clean(result.stdout + result.stderr)
    return result


@pytest.mark.parametrize("which", ["exe", "msi", "small_msi"])
def test_a_genuine_se_from_an_installer_slot(installers, agent: Agent, tmp_path: Path, which: str) -> None:
    kind = "exe" if which == "exe" else "msi"
    se = good_se(console_url="https://a.example.net/tenant")
    installer = stamp(getattr(installers, which), kind, se, tmp_path / f"group.{kind}")
    assert authenticode.verify(installer, installers.ca).ok  # the stamp left the signature valid
    config = tmp_path / "ProgramData" / "enrollment.json"
    result = enroll_installer(agent, installer, config)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    assert config.read_bytes() == config_bytes(se)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_verify_enrollment_reads_an_installer_slot_and_writes_nothing(installers, agent: Agent, tmp_path: Path) -> None:
    # What the EXE runs from its plugins folder before it touches an installed agent.
    se = good_se(console_url="https://a.example.net/tenant")
    installer = stamp(installers.exe, "exe", se, tmp_path / "group.exe")
    forged = stamp(installers.exe, "exe", good_se(key=KEY_B), tmp_path / "forged.exe")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = agent.run("verify-enrollment", "--installer", str(installer))
    clean(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["console_url"] == "https://a.example.net/tenant"
    refused = agent.run("verify-enrollment", "--installer", str(forged))
    assert refused.returncode == 10 and refused.stdout == "", refused.stderr
    refused_line(refused.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    both = agent.run("verify-enrollment", "--installer", str(installer), "--file", str(installer))
    assert both.returncode == 2


def test_inside_a_macos_bundle_the_pins_are_beside_the_bundle(tmp_path: Path) -> None:
    # Writing trust.json into X.app would break the bundle's code signature: the agent looks
    # beside the bundle (the install folder the pkg's postinstall writes it to).
    macos = tmp_path / "Agent.app" / "Contents" / "MacOS"
    macos.mkdir(parents=True)
    shutil.copy(AGENT_PY, macos / "agent.py")
    assert load_module(macos).trust_path() == tmp_path / "trust.json"
    assert load_module(tmp_path / "Agent.app" / "Contents" / "MacOS").trust_path() != macos / "trust.json"


def test_installer_slot_failures(installers, agent: Agent, tmp_path: Path) -> None:
    config = tmp_path / "ProgramData" / "enrollment.json"
    cases = {
        5: [installers.exe, installers.msi],  # a release never stamped: an empty slot
        7: [tmp_path / "absent.exe", tmp_path],
        14: [installers.signed_exe,  # signed, no slot attribute
             installers.dir / "unsigned.exe", installers.dir / "unsigned.msi",
             installers.dir / "hello.c"],  # neither PE nor compound file
    }
    (tmp_path / "empty.exe").write_bytes(b"")
    cases[14].append(tmp_path / "empty.exe")
    for code, paths in cases.items():
        for path in paths:
            result = enroll_installer(agent, path, config)
            assert result.returncode == code, (path.name, result.stderr)
            refused_line(result.stderr)
    # A stamped SE is checked like any other, after the slot.
    for se, code in ((good_se(KEY_B), 10), (good_se(console_url="https://evil.example"), 12),
                     (good_se() + "\n", 6)):
        result = enroll_installer(agent, stamp(installers.exe, "exe", se, tmp_path / "s.exe"), config)
        assert result.returncode == code, result.stderr
        refused_line(result.stderr)
    assert not config.parent.exists()


# --- the attacks on the signature's structure: each hides a second enrollment somewhere no
# --- signature covers, next to a genuine one, and each must be 14 whatever the SEs say.


def cert_table(data: bytes, table: bytes) -> bytes:
    """`data` (a signed PE) with its certificate table replaced by `table` bytes as given."""
    layout = pe.parse(data)
    out = bytearray(data[:layout.cert_table_offset] + table)
    struct.pack_into("<II", out, layout.security_entry_offset, layout.cert_table_offset, len(table))
    return bytes(out)


def win_certificate(der: bytes, extra: bytes = b"", length: int | None = None) -> bytes:
    body = der + extra
    body += bytes(-len(body) % 8)
    return struct.pack("<IHH", 8 + len(body) if length is None else length, 0x0200, 0x0002) + body


def two_slot_pkcs7(der: bytes) -> bytes:
    """`der` (a PKCS#7 without a slot) with two slot attributes: builder's add_slot refuses a
    second, so the first is hidden under a same-length OID while the second is added."""
    real, decoy = oid_der(SLOT_OID), oid_der(SLOT_OID[:-1] + "2")
    assert len(real) == len(decoy)
    once = add_slot(der, SLOT).replace(real, decoy)
    return add_slot(once, SLOT).replace(decoy, real)


def fill_slots(der: bytes, *ses: str) -> bytes:
    out = bytearray(der)
    at = -1
    for se in ses:
        at = out.index(MAGIC, at + 1)
        out[at:at + SLOT] = encode_slot(se.encode(), SLOT)
    return bytes(out)


def msi_stream_tail(base: bytes, signed_msi: bytes, se: str, extra: bytes) -> bytes:
    """`base` (an MSI release) whose signature stream is the PKCS#7 with a slot `len(extra)`
    bytes smaller, holding `se`, followed by `extra`: the stream keeps its size and sectors, so
    the compound file stays intact and only the bytes after the DER are new."""
    extents = cfb.stream_extents(base, SIGNATURE_STREAM)
    stream = b"".join(base[o:o + n] for o, n in extents)
    smaller = add_slot(cfb.read_stream(signed_msi, SIGNATURE_STREAM), SLOT - len(extra))
    assert len(smaller) + len(extra) == len(stream), "the slot's lengths changed their encoding size"
    at = smaller.index(MAGIC)
    smaller = smaller[:at] + encode_slot(se.encode(), SLOT - len(extra)) + smaller[at + SLOT - len(extra):]
    new, out, pos = smaller + extra, bytearray(base), 0
    for offset, length in extents:
        out[offset:offset + length] = new[pos:pos + length]
        pos += length
    assert cfb.read_stream(bytes(out), SIGNATURE_STREAM) == new
    return bytes(out)


def test_installer_structure_attacks(installers, agent: Agent, tmp_path: Path) -> None:
    genuine, evil = good_se(), good_se(console_url="https://a.example.net/attacker")
    good_exe = stamp(installers.exe, "exe", genuine, tmp_path / "good.exe").read_bytes()
    good_msi = stamp(installers.msi, "msi", genuine, tmp_path / "good.msi").read_bytes()
    der = pe.pkcs7_of(good_exe)
    signed_msi = (installers.dir / "signed.msi").read_bytes()
    appended = MAGIC + struct.pack("<I", len(evil)) + evil.encode()
    second = fill_slots(two_slot_pkcs7(pe.pkcs7_of(installers.signed_exe.read_bytes())), genuine, evil)
    attacks = {
        # both slot attributes hold a validly signed SE: only the structure is wrong
        "a second slot attribute": pe.with_signature(installers.signed_exe.read_bytes(), second),
        # MeshCentral-style: the SE appended after the PKCS#7 inside WIN_CERTIFICATE (dwLength grown)
        "appended ENRSLOT1 in WIN_CERTIFICATE": cert_table(good_exe, win_certificate(der, appended)),
        "8 zero bytes after the PKCS#7": cert_table(good_exe, win_certificate(der, bytes(8 + -len(der) % 8))),
        "a nonzero padding byte": cert_table(good_exe, win_certificate(der + b"\x01")),
        "a second WIN_CERTIFICATE": cert_table(good_exe, win_certificate(der) + win_certificate(der)),
        "zeros after the WIN_CERTIFICATE": cert_table(good_exe, win_certificate(der) + bytes(8)),
        "data after the certificate table": good_exe + appended + bytes(-len(appended) % 8),
        "zeros after the certificate table": good_exe + bytes(8),
        "the PKCS#7 cut short": cert_table(good_exe, win_certificate(der[:-40])),
        "a signature stream with bytes after the DER": msi_stream_tail(good_msi, signed_msi, genuine, appended),
        "a signature stream with one zero after the DER": msi_stream_tail(good_msi, signed_msi, genuine, b"\0"),
    }
    config = tmp_path / "ProgramData" / "enrollment.json"
    config.parent.mkdir()
    config.write_bytes(config_bytes(genuine))  # an existing install's enrollment must stay
    before = config.read_bytes()
    for name, data in attacks.items():
        installer = tmp_path / ("attack.msi" if "stream" in name else "attack.exe")
        installer.write_bytes(data)
        result = enroll_installer(agent, installer, config)
        assert result.returncode == 14, (name, result.stderr)
        assert "not as a release writes it" in refused_line(result.stderr), name
        assert config.read_bytes() == before and sorted(p.name for p in config.parent.iterdir()) == ["enrollment.json"]
    # The same bytes without the attack are accepted: the refusals are the attacks'.
    installer = tmp_path / "good.exe"
    assert enroll_installer(agent, installer, config).returncode == 0
    assert enroll_installer(agent, tmp_path / "good.msi", config).returncode == 0
    assert config.read_bytes() == config_bytes(genuine)


# ===================================================================== run and service


def make_ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)

    def cert(subject, issuer, public_key, signing_key, *, ca: bool, san=None):
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Reference Agent Test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, leaf_key.public_key(),
                ca_key, ca=False, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


class Console:
    """Answers POSTs from a script of (status, body, headers); records what it received, when."""

    def __init__(self, port: int, ca: Path):
        # A host name, not 127.0.0.1: the contract refuses IP literals. The server listens on
        # 127.0.0.1, which "localhost" resolves to (after ::1, which refuses at once).
        self.host = f"localhost:{port}"
        self.url = f"https://{self.host}/tenant"
        self.ca = ca  # the PEM the agent must be told to trust
        self.script: list[tuple[int, bytes, dict[str, str]]] = []
        self.requests: list[dict] = []

    def answer(self, *responses: int | tuple[int, bytes, dict[str, str]]) -> None:
        self.script = [(r, b'{"ok": true}', {}) if isinstance(r, int) else r for r in responses]


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    ca, leaf, key = make_ca_and_leaf(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                   "at": time.monotonic()})
            status, payload, headers = state.script.pop(0) if len(state.script) > 1 else state.script[0]
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state = Console(server.server_address[1], ca)
    state.answer(200)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def console_config(agent: Agent, tmp_path: Path, console: Console, se: str | None = None) -> tuple[Path, str]:
    """A config holding an SE for the local console, which trust.json allows."""
    agent.trust(KEY_A, hosts=[console.host])
    se = se or good_se(console_url=console.url + "/")
    config = tmp_path / "etc" / "enrollment.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_bytes(config_bytes(se))
    return config, se


def wait_for_status(path: Path, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            last = json.loads(path.read_bytes())
            if last.get("state") == state:
                return last
        time.sleep(0.05)
    raise AssertionError(f"status.json never reached {state!r}; last seen: {last}")


def test_run_enrolls_with_bearer_token_after_retry(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    console.answer(503, 200)
    result = agent.run("run", "--config", str(config), "--ca-bundle", str(console.ca), "--attempts", "3", "--backoff", "0.05")
    assert result.returncode == 0, result.stderr
    clean(result.stdout + result.stderr)
    assert len(console.requests) == 2  # one 503, then success
    request = console.requests[-1]
    assert request["path"] == "/tenant/api/v1/enroll"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request["body"]) == {"account_id": "acct-1", "group_id": "grp-1"}
    assert request["headers"]["Content-Type"] == "application/json"
    status = json.loads((config.parent / "status.json").read_bytes())
    assert status["state"] == "enrolled" and status["key_id"] == kid(KEY_A)
    assert status["token_sha256"] == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert TOKEN not in json.dumps(status)


def test_run_takes_the_ca_bundle_from_the_environment(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    result = agent.run("run", "--config", str(config), env=agent_env(AGENT_CA_BUNDLE=str(console.ca)))
    assert result.returncode == 0, result.stderr
    assert len(console.requests) == 1


@pytest.mark.parametrize(
    ("answers", "code", "requests"),
    [
        ((401,), 8, 1),  # final: the token is wrong, retrying will not help
        (((302, b"", {"Location": "https://evil.example/steal"}),), 8, 1),  # the bearer must not follow
        ((503,), 9, 3),  # retried, then given up
    ],
    ids=["unauthorised", "redirect", "unavailable"],
)
def test_run_failures(agent: Agent, console: Console, tmp_path: Path, answers, code: int, requests: int) -> None:
    config, _ = console_config(agent, tmp_path, console)
    console.answer(*answers)
    result = agent.run("run", "--config", str(config), "--ca-bundle", str(console.ca), "--attempts", "3", "--backoff", "0.01")
    assert result.returncode == code, result.stderr
    assert len(console.requests) == requests
    refused_line(result.stderr)


def test_run_trusts_the_installed_console_ca(agent: Agent, console: Console, tmp_path: Path) -> None:
    """console-ca.pem beside trust.json (installed from the payload): the console's private CA,
    instead of the system store; --ca-bundle still wins over it."""
    config, _ = console_config(agent, tmp_path, console)
    shutil.copy(console.ca, agent.home / "console-ca.pem")
    result = agent.run("run", "--config", str(config), "--attempts", "1")
    assert result.returncode == 0, result.stderr
    assert len(console.requests) == 1
    other = tmp_path / "other-ca.pem"
    other.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    result = agent.run("run", "--config", str(config), "--ca-bundle", str(other), "--attempts", "1")
    assert result.returncode == 9 and "certificate" in refused_line(result.stderr)
    assert len(console.requests) == 1


def test_run_verifies_the_console_certificate(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    result = agent.run("run", "--config", str(config), "--attempts", "3", "--backoff", "0.01")  # system CAs only
    assert result.returncode == 9, result.stderr
    assert "certificate" in refused_line(result.stderr)
    assert console.requests == []  # the token never left


def unverified_configs(console: Console) -> dict[str, tuple[bytes, int]]:
    """Configs a service or run must refuse before it connects anywhere, with their exit codes.
    Every one of them points at the local console, which would answer 200."""
    se = good_se(console_url=console.url)
    return {
        "tampered payload": (config_bytes(semantic_tamper(se, 1)), 10),
        "tampered signature": (config_bytes(tamper(se, 2)), 10),
        "signed by an unpinned key": (config_bytes(good_se(KEY_B, console_url=console.url)), 10),
        "expired": (config_bytes(good_se(console_url=console.url, expires_at=int(time.time()) - 5)), 11),
        "a host the trust file does not allow": (config_bytes(good_se(console_url="https://127.0.0.1:"
                                                                      + console.host.split(":")[1])), 12),
        "the old four-key config": (json.dumps({"account_id": "a", "group_id": "g", "console_url": console.url,
                                                "enrollment_token": TOKEN}).encode(), 6),
        "a second key": (config_bytes(se)[:-1] + b', "console_url": "https://evil.example"}', 6),
        "a trailing newline": (config_bytes(se) + b"\n", 6),
    }


def test_run_refuses_an_unverified_config_before_any_connection(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    for name, (data, code) in unverified_configs(console).items():
        config.write_bytes(data)
        result = agent.run("run", "--config", str(config), "--ca-bundle", str(console.ca))
        assert result.returncode == code, (name, result.stderr)
        refused_line(result.stderr)
        assert console.requests == [], name
        status = json.loads((config.parent / "status.json").read_bytes())
        assert status["state"] == "error" and status["exit_code"] == code, name
        assert config.read_bytes() == data  # left as found
    config.unlink()
    assert agent.run("run", "--config", str(config), "--ca-bundle", str(console.ca)).returncode == 5  # not enrolled
    (agent.home / "trust.json").unlink()
    config.write_bytes(config_bytes(good_se(console_url=console.url)))
    assert agent.run("run", "--config", str(config), "--ca-bundle", str(console.ca)).returncode == 13
    assert console.requests == []


def test_service_refuses_an_unverified_config_before_any_connection(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    env = agent_env(AGENT_CA_BUNDLE=str(console.ca))
    for name in ("tampered signature", "expired", "a host the trust file does not allow"):
        data, code = unverified_configs(console)[name]
        config.write_bytes(data)
        result = agent.run("service", "--config", str(config), env=env, timeout=30)
        assert result.returncode == code, (name, result.stderr)
        refused_line(result.stderr)
        status = json.loads((config.parent / "status.json").read_bytes())
        assert status == {"state": "error", "exit_code": code, "reason": status["reason"]}, name
    assert console.requests == []


def test_posix_service_enrolls_and_stops_on_sigterm(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    console.answer(503, 200)
    status = config.parent / "status.json"
    proc = agent.popen("service", "--config", str(config), "--backoff", "0.05",
                       env=agent_env(AGENT_CA_BUNDLE=str(console.ca)))
    try:
        enrolled = wait_for_status(status, "enrolled")
        assert enrolled["account_id"] == "acct-1" and enrolled["key_id"] == kid(KEY_A)
        assert enrolled["token_sha256"] == hashlib.sha256(TOKEN.encode()).hexdigest()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert wait_for_status(status, "stopped", timeout=1)["group_id"] == "grp-1"
    assert len(console.requests) == 2
    clean(out + err)


def test_service_keeps_retrying_a_console_that_refuses(agent: Agent, console: Console, tmp_path: Path) -> None:
    config, _ = console_config(agent, tmp_path, console)
    console.answer((403, b'{"error": "group disabled"}', {}))
    status = config.parent / "status.json"
    # Small waits so the test is short: 0.1 s doubling, at most 0.4 s (defaults 2 s and 300 s).
    proc = agent.popen("service", "--config", str(config), "--attempts", "1", "--backoff", "0.1",
                       "--retry-max", "0.4", env=agent_env(AGENT_CA_BUNDLE=str(console.ca)))
    try:
        refused = wait_for_status(status, "refused", timeout=15)
        assert "HTTP 403" in refused["reason"] and refused["key_id"] == kid(KEY_A)
        time.sleep(3)
        assert proc.poll() is None, "the service stopped on a refusal"
        seen = list(console.requests)
        # Retried, but backing off: delays 0.05-0.1, 0.1-0.2, then 0.2-0.4 s (jittered), so
        # 3 s hold roughly 8-16 requests; a spinning service would make hundreds.
        assert 5 <= len(seen) <= 25, len(seen)
        gaps = [b["at"] - a["at"] for a, b in zip(seen, seen[1:])]
        assert min(gaps[3:]) >= 0.15, gaps
        last = json.loads(status.read_bytes())
        assert last["state"] == "refused" and last["failures"] >= len(seen) - 1
        console.answer(200)  # the console lets the group in again: the next round enrolls
        wait_for_status(status, "enrolled", timeout=15)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    clean(out + err)
    assert TOKEN not in status.read_text()


def test_forget_removes_config_and_status(agent: Agent, tmp_path: Path) -> None:
    config = tmp_path / "ProgramData" / "Example Agent" / "enrollment.json"
    config.parent.mkdir(parents=True)
    config.write_bytes(config_bytes(good_se()))
    (config.parent / "status.json").write_text("{}")
    # What a write cut short leaves (a service killed at shutdown): forget takes it too.
    (config.parent / ".status.json.4242.tmp").write_text("{")
    (config.parent / ".enrollment.json.4242.tmp").write_text("{")
    result = agent.run("forget", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert not config.parent.exists()
    assert agent.run("forget", "--config", str(config)).returncode == 0  # already gone is fine

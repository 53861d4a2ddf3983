"""The C test agent against the signed-enrollment contract (/work/spec/signed-enrollment.md).

agent.exe is built with mingw-w64 and run under wine in a copy of the session's booted prefix,
installed as the signed installer installs it: agent.exe with trust.json beside it. The
installers are real: signed with osslsigncode through builder's signing code, a slot added and
stamped by builder (tests/support/installers.py); the signed enrollments (SEs) and trust files
come from an independent producer (tests/support/signed.py). The attacker's cases come first:
each refusal is checked for its exit code, its one `agent: ...` line, and that nothing was
written (no config, no Enrollment value, PendingEnrollment gone).

Not skipped where wine can run (x86_64); skipped, with the reason, on any other machine. The
Python reference agent's tests are in tests/integration/test_reference_agent.py.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from builder.binfmt import tag
from builder.signing import authenticode
from tests.support import installers, signed
from tests.support import wine as winesupport

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = ROOT / "payload"
BUILD_CMD = ["make", "-C", str(PAYLOAD / "testagent")]
AGENT_EXE = PAYLOAD / "build" / "windows" / "agent.exe"

MAGIC = b"ENRS" + b"LOT1"
REG_KEY = r"SOFTWARE\Example Vendor\Example Agent"
INSTALL_DIR = r"C:\Program Files\Example Vendor\Example Agent"
AGENT = INSTALL_DIR + "\\agent.exe"
DATA_DIR = r"C:\ProgramData\Example Vendor\Example Agent"
HOSTS = ("console.example.com", "*.example.net", "eu.example.org:8443")
URL = "https://console.example.com/tenant?a=1&b=2"
TOKEN = "T0k-" + secrets.token_urlsafe(3000)[:4000]  # the largest token allowed
HOUR = 3600


def config_bytes(se: str) -> bytes:
    """The contract's config, spelt out independently of the agent."""
    return json.dumps({"enrollment": se}).encode()


def agent_lines(stderr: str) -> list[str]:
    """The agent's own stderr lines (wine may add its own)."""
    return [line for line in stderr.splitlines() if line.startswith("agent: ")]


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    print(f"[time] {name}: {time.monotonic() - start:.2f} s")


def sign_raw(key, header: bytes, payload: bytes) -> str:
    """An SE over exactly these JSON bytes (duplicate keys, floats: what json.dumps cannot write)."""
    signing_input = signed.b64(header) + "." + signed.b64(payload)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + signed.b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def payload_of(key, **fields) -> dict:
    kid = signed.kid(key)
    return {"account_id": "acct-1", "group_id": "grp-1", "console_url": URL, "enrollment_token": TOKEN,
            "key_id": kid, "issued_at": int(time.time()), **fields}


def header_of(key, **fields) -> dict:
    return {"alg": "ES256", "kid": signed.kid(key), "typ": "enrollment+jws", **fields}


def raw(key, header: dict, payload: dict | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return sign_raw(key, json.dumps(header, separators=(",", ":")).encode(), text.encode())


def syntax_ok(se: str) -> bool:
    """Whether `se` passes the contract's syntax check (2.): decides 6 or 10 for a tampered SE."""
    try:
        parts = se.split(".")
        decoded = [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in parts]
        if len(parts) != 3 or len(decoded[2]) != 64 or any(signed.b64(d) != p for d, p in zip(decoded, parts)):
            return False
        header, payload = json.loads(decoded[0]), json.loads(decoded[1])
    except ValueError:
        return False
    fields = ("account_id", "group_id", "console_url", "enrollment_token")
    return (isinstance(header, dict) and set(header) == {"alg", "kid", "typ"} and header["alg"] == "ES256"
            and header["typ"] == "enrollment+jws" and isinstance(header["kid"], str) and header["kid"] != ""
            and isinstance(payload, dict) and all(isinstance(payload.get(f), str) and payload[f] for f in fields)
            and isinstance(payload.get("key_id"), str) and type(payload.get("issued_at")) is int)


def tampered(se: str, part: int, index: int) -> tuple[int, str]:
    bad = signed.tamper(se, part, index)
    return (10 if syntax_ok(bad) else 6), bad


# ===================================================================== fixtures


@pytest.fixture(scope="session")
def c_agent() -> Path:
    """Builds agent.exe with the project's build command (locked: xdist workers share the tree)."""
    assert shutil.which("x86_64-w64-mingw32-gcc"), "install gcc-mingw-w64-x86-64 (the test agent's compiler)"
    AGENT_EXE.parent.mkdir(parents=True, exist_ok=True)
    with open(AGENT_EXE.parent.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with step("make test agent"):
            result = subprocess.run(BUILD_CMD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return AGENT_EXE


@pytest.fixture(scope="session")
def keys() -> SimpleNamespace:
    """`pinned` is in the default trust.json, `rotated` the next key, `stranger` pinned nowhere."""
    return SimpleNamespace(pinned=signed.new_key(), rotated=signed.new_key(), stranger=signed.new_key())


@pytest.fixture(scope="session")
def bases(c_agent: Path, dev_keys, tmp_path_factory) -> SimpleNamespace:
    """Signed installers with an empty slot, as a release builds them: an EXE (the test agent
    itself, signed) and a tiny wixl MSI; plus the unsigned and slot-less files they came from."""
    work = tmp_path_factory.mktemp("installers")
    with step("sign + slot an EXE and an MSI"):
        exe = installers.slotted_exe(dev_keys, c_agent, work / "setup.exe")
        msi = installers.slotted_msi(dev_keys, work / "msi", work / "setup.msi")
    no_slot = work / "no-slot.exe"
    authenticode.sign(installers.signing_key(dev_keys), c_agent, no_slot)
    return SimpleNamespace(exe=exe, msi=msi, unsigned_exe=c_agent, unsigned_msi=work / "msi" / "unsigned.msi",
                           no_slot=no_slot)


class Machine:
    """A fresh Windows machine (a copy of the session's booted prefix) with agent.exe and
    trust.json installed side by side, as the signed installer leaves them.

    wineserver is kept up between commands (a cold start costs 1-3 s each). The prefix is booted
    first by a command whose stdio is /dev/null: services.exe and friends inherit the booting
    command's stdio, and would hold a pipe open for good. Every later command's output then goes
    through pipes: under wine 8 the frozen Windows CPython (payload/README.md) dies at start-up
    when its stdout is a regular file.
    """

    def __init__(self, prefix: winesupport.WinePrefix, agent: Path | None, tmp: Path):
        self.prefix, self.tmp = prefix, tmp
        self.env = prefix.env()
        subprocess.run(["wineserver", "-p"], env=self.env, timeout=60, check=True)
        subprocess.run(["wine", "cmd", "/c", "exit"], env=self.env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
        if agent is not None:  # None: a bare machine, for an installer to install the agent
            self.host(AGENT).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(agent, self.host(AGENT))
        self.outputs: list[str] = []  # every command's stdout + stderr, checked for the token

    def host(self, win_path: str) -> Path:
        return self.prefix.host_path(win_path)

    z = staticmethod(winesupport.WinePrefix.winpath)

    def trust(self, data: bytes | None) -> None:
        path = self.host(INSTALL_DIR + r"\trust.json")
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        for _ in range(3):
            proc = subprocess.run(["wine", *args], env=self.env, capture_output=True, stdin=subprocess.DEVNULL,
                                  timeout=timeout)
            # Exit 1 with no output at all is wine failing to start the process (seen once in
            # ~1200 runs of this suite): neither agent exits 1 without saying why on stderr.
            if (proc.returncode, proc.stdout, proc.stderr) != (1, b"", b""):
                break
        text = [data.decode("utf-8", "replace") for data in (proc.stdout, proc.stderr)]
        self.outputs.append(text[0] + text[1])
        return subprocess.CompletedProcess(proc.args, proc.returncode, *text)

    def agent(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(AGENT, *args, timeout=timeout)

    def import_reg(self, values: dict[str, dict[str, str]]) -> None:
        """REG_SZ values for several keys through one .reg file: no value on a command line.

        hex(1) is REG_SZ as raw UTF-16LE, so no character needs .reg escaping; long values are
        continued over lines as regedit writes them.
        """
        lines = ["Windows Registry Editor Version 5.00", ""]
        for key, named in values.items():
            lines += [f"[HKEY_LOCAL_MACHINE\\{key}]"]
            for name, value in named.items():
                data = [f"{b:02x}" for b in (value + "\0").encode("utf-16-le")]
                rows = [",".join(data[i:i + 25]) for i in range(0, len(data), 25)]
                lines.append(f'"{name}"=hex(1):' + ",\\\r\n  ".join(rows))
            lines.append("")
        reg = self.tmp / f"values-{secrets.token_hex(4)}.reg"
        reg.write_text("\r\n".join(lines) + "\r\n", encoding="utf-16")
        result = self.run("reg", "import", self.z(reg), "/reg:64")
        reg.unlink()
        assert result.returncode == 0, result.stderr

    def registry(self, key: str = REG_KEY) -> dict[str, dict[str, str]]:
        """Every key under HKLM\\key (itself as "") -> its REG_SZ values; {} if absent."""
        out = self.tmp / "export.reg"
        out.unlink(missing_ok=True)
        result = self.run("reg", "export", f"HKLM\\{key}", self.z(out), "/y", "/reg:64")
        if result.returncode != 0 or not out.exists():
            return {}
        return winesupport.parse_reg_export_all(out.read_bytes(), key)

    def assert_token_never_shown(self) -> None:
        assert not any(TOKEN in text for text in self.outputs), "the token appeared on stdout/stderr"


@pytest.fixture
def machine(wine: winesupport.WinePrefix, c_agent: Path, keys, tmp_path: Path) -> Iterator[Machine]:
    m = Machine(wine, c_agent, tmp_path)
    m.trust(signed.trust_json([keys.pinned], HOSTS))
    yield m
    m.assert_token_never_shown()


def refused(result: subprocess.CompletedProcess[str], code: int, what: str) -> None:
    assert result.returncode == code, (what, result.returncode, result.stderr)
    assert len(agent_lines(result.stderr)) == 1, (what, result.stderr)


# ===================================================================== the binary


def test_agent_exe_is_self_contained(c_agent: Path) -> None:
    data = c_agent.read_bytes()
    assert data[:2] == b"MZ"
    # The installers embed the agent: a literal magic in it could be taken for the slot.
    assert MAGIC not in data
    dump = subprocess.run(["x86_64-w64-mingw32-objdump", "-p", str(c_agent)], capture_output=True, text=True, check=True)
    dlls = {line.split(":", 1)[1].strip().lower() for line in dump.stdout.splitlines() if "DLL Name:" in line}
    assert dlls == {"kernel32.dll", "advapi32.dll", "msvcrt.dll", "bcrypt.dll", "ole32.dll"}, dlls


def test_build_is_reproducible_and_version_is_a_build_define(machine: Machine, c_agent: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    subprocess.run([*BUILD_CMD, f"OUT_DIR={again}"], capture_output=True, check=True, timeout=300)
    assert (again / "agent.exe").read_bytes() == c_agent.read_bytes()
    assert machine.agent("--version").stdout.strip() == "1.0.0"
    out = tmp_path / "v"
    subprocess.run([*BUILD_CMD, f"OUT_DIR={out}", "AGENT_VERSION=9.8.7-test"], capture_output=True, check=True, timeout=300)
    result = machine.run(str(out / "agent.exe"), "--version")
    assert (result.returncode, result.stdout.strip()) == (0, "9.8.7-test")


# ===================================================================== installer slot: the attacks


def stamped(base: Path, se: str, kind: str, out: Path) -> Path:
    out.write_bytes(installers.stamp(base, kind, se.encode()))
    return out


def refused_installer(machine: Machine, tmp_path: Path, name: str, code: int, data: bytes) -> subprocess.CompletedProcess[str]:
    """`data` as an installer file, refused by enroll-from-installer with `code`, writing nothing."""
    installer = tmp_path / f"{name}.bin"
    installer.write_bytes(data)
    result = machine.agent("enroll-from-installer", "--installer", machine.z(installer),
                           "--registry-key", f"{REG_KEY}\\{name}", "--config", rf"{DATA_DIR}\{name}.json")
    refused(result, code, name)
    assert not machine.host(rf"{DATA_DIR}\{name}.json").exists(), name
    return result


@pytest.mark.wine
def test_installer_attacks_are_refused(machine: Machine, bases, keys, tmp_path: Path) -> None:
    """Everything outside the one slot of the one PKCS#7 is bytes anyone can add to a signed
    file without breaking its signature. Each attack file also holds a genuine slot, and each
    added slot holds an SE signed by the pinned key: only the structure can make it refuse."""
    genuine = signed.sign(keys.pinned, token=TOKEN, console_url=URL, group_id="genuine")
    evil = signed.sign(keys.pinned, token=TOKEN, console_url=URL, group_id="attacker's")
    base = installers.stamp(bases.exe, "exe", genuine.encode())
    assert tag.read_slot(base, "exe") == genuine.encode()  # builder reads the genuine one
    cases = {
        "second-slot-attribute": (14, installers.second_slot_attribute(base, evil.encode())),
        "appended-in-win-certificate": (14, installers.appended_in_certificate(base, evil.encode())),
        "second-win-certificate": (14, installers.second_certificate(base, evil.encode())),
        "after-certificate-table": (14, installers.after_table(base, evil.encode())),
        "after-pkcs7-in-msi-stream": (14, installers.trailing_in_signature_stream(
            installers.stamp(bases.msi, "msi", genuine.encode()), (MAGIC + b"\x10\0\0\0" + b"x" * 16))),
        "unsigned-exe": (14, bases.unsigned_exe.read_bytes()),
        "signed-without-slot": (14, bases.no_slot.read_bytes()),
        "unsigned-msi": (14, bases.unsigned_msi.read_bytes()),
        "neither-pe-nor-msi": (14, secrets.token_bytes(70_000)),
        "empty-slot-exe": (5, installers.stamp(bases.exe, "exe", b"")),
        "empty-slot-msi": (5, installers.stamp(bases.msi, "msi", b"")),
        # A well-placed slot is only as good as the SE in it.
        "unpinned-se-exe": (10, installers.stamp(bases.exe, "exe", signed.sign(keys.stranger, token=TOKEN).encode())),
        "expired-se-msi": (11, installers.stamp(bases.msi, "msi", signed.sign(
            keys.pinned, token=TOKEN, expires_at=int(time.time()) - 1).encode())),
        "evil-host-se-msi": (12, installers.stamp(bases.msi, "msi", signed.sign(
            keys.pinned, token=TOKEN, console_url="https://console.evil.example").encode())),
    }
    # Each attack is refused for what it is, not for some accident of how the test made it.
    reasons = {"second-slot-attribute": "a second enrollment slot", "appended-in-win-certificate": "bytes after its PKCS#7",
               "second-win-certificate": "not one Authenticode WIN_CERTIFICATE",
               "after-certificate-table": "does not end at the end of the file",
               "after-pkcs7-in-msi-stream": "bytes after the PKCS#7", "signed-without-slot": "no unauthenticated attributes",
               "unsigned-exe": "not signed", "unsigned-msi": "not signed"}
    # The appended slots are where an agent that searches for the magic from the end looks.
    for name in ("appended-in-win-certificate", "second-win-certificate", "after-certificate-table"):
        assert cases[name][1].rindex(MAGIC) > cases[name][1].index(genuine.encode())
    with step(f"{len(cases) + 1} refused installers"):
        for name, (code, data) in cases.items():
            result = refused_installer(machine, tmp_path, name, code, data)
            assert reasons.get(name, "") in result.stderr, (name, result.stderr)
        missing = machine.agent("enroll-from-installer", "--installer", r"C:\no\such.exe",
                                "--registry-key", f"{REG_KEY}\\missing", "--config", rf"{DATA_DIR}\missing.json")
        refused(missing, 7, "missing")
    assert not machine.host(DATA_DIR).exists()
    assert machine.registry() == {}  # no case created the key, let alone an Enrollment value


@pytest.mark.parametrize("attack", ["second_slot_attribute", "appended_in_certificate"])
def test_attack_files_keep_a_valid_signature(attack: str, bases, keys, dev_keys, tmp_path: Path) -> None:
    """The attack files are validly signed: refusing them is the agent's job, not the signature's."""
    base = installers.stamp(bases.exe, "exe", signed.sign(keys.pinned).encode())
    path = tmp_path / "attack.exe"
    path.write_bytes(getattr(installers, attack)(base, signed.sign(keys.pinned, group_id="evil").encode()))
    assert authenticode.verify(path, ca=dev_keys.ca_cert).ok


# ===================================================================== the signed enrollment


@pytest.fixture(scope="module")
def se_cases(keys) -> dict[str, tuple[int, str]]:
    """Refused SEs: name -> (exit code, SE). All but the `unpinned` ones are signed by the pinned key."""
    k, now = keys.pinned, int(time.time())
    good = signed.sign(k, token=TOKEN, console_url=URL)
    h, p, s = good.split(".")
    other = signed.sign(k, token=TOKEN, console_url="https://console.example.com/other").split(".")
    # 64 bytes leave the low 4 bits of the last character unused: set one, keep the data bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet[alphabet.index(s[-1]) & 0b110000 | 1]
    assert base64.urlsafe_b64decode(s[:-1] + last + "==") == base64.urlsafe_b64decode(s + "==")
    cases = {
        # 10: not signed by a pinned key
        "unpinned-key": (10, signed.sign(keys.stranger, token=TOKEN, console_url=URL)),
        "rotated-key-not-yet-pinned": (10, signed.sign(keys.rotated, token=TOKEN, console_url=URL)),
        "tampered-header": tampered(good, 0, 5),
        "tampered-payload": tampered(good, 1, 5),
        "tampered-payload-middle": tampered(good, 1, len(p) // 2),
        "tampered-signature": tampered(good, 2, 5),
        "payload-swapped": (10, f"{h}.{other[1]}.{s}"),
        "signature-swapped": (10, f"{h}.{p}.{other[2]}"),
        "key-id-not-kid": (10, raw(k, header_of(k), payload_of(k, key_id=signed.kid(keys.rotated)))),
        "kid-of-stranger-signed-by-pinned": (10, raw(k, header_of(keys.stranger), payload_of(keys.stranger))),
        # 11
        "expired": (11, signed.sign(k, token=TOKEN, console_url=URL, expires_at=now - 60)),
        # 6: malformed
        "padding": (6, good + "="),
        "trailing-newline": (6, good + "\n"),
        "space": (6, h + ". " + p + "." + s),
        "four-parts": (6, good + ".AAAA"),
        "two-parts": (6, h + "." + p),
        "non-canonical-signature": (6, f"{h}.{p}.{s[:-1]}{last}"),
        "too-long": (6, signed.sign(k, token=TOKEN, console_url=URL, extra={"pad": "x" * 13000})),
        "alg-none": (6, raw(k, header_of(k, alg="none"), payload_of(k))),
        "typ-jwt": (6, raw(k, header_of(k, typ="JWT"), payload_of(k))),
        "crit-header": (6, raw(k, header_of(k, crit=["exp"]), payload_of(k))),
        "jku-header": (6, raw(k, header_of(k, jku="https://evil.example/keys"), payload_of(k))),
        "duplicate-payload-key": (6, raw(k, header_of(k), json.dumps(payload_of(k), separators=(",", ":"))[:-1]
                                        + ',"console_url":"https://evil.example"}')),
        "duplicate-nested-key": (6, raw(k, header_of(k), json.dumps(payload_of(k), separators=(",", ":"))[:-1]
                                       + ',"future":{"a":1,"a":2}}')),
        "issued-at-float": (6, raw(k, header_of(k), payload_of(k, issued_at=1.5))),
        "key-id-empty": (10, raw(k, header_of(k), payload_of(k, key_id=""))),
        "key-id-missing": (6, raw(k, header_of(k), {x: v for x, v in payload_of(k).items() if x != "key_id"})),
        "issued-at-missing": (6, raw(k, header_of(k), {x: v for x, v in payload_of(k).items() if x != "issued_at"})),
        "empty-account": (6, raw(k, header_of(k), payload_of(k, account_id=""))),
        "token-not-a-string": (6, raw(k, header_of(k), payload_of(k, enrollment_token=42))),
        "nul-in-group": (6, raw(k, header_of(k), payload_of(k, group_id="a\0b"))),
    }
    assert len(cases["too-long"][1]) > 16384
    # 12: signed by the pinned key, console not allowed
    for url in ("http://console.example.com", "https://u:p@console.example.com", "https://console.example.com@evil.example",
                "https://192.0.2.7", "https://[2001:db8::1]", "https://example.net", "https://console.example.com:8443",
                "https://eu.example.org", "https://eu.example.org:443", "https://eu.example.org:8444",
                "https://console.example.com:0", "https://console.example.com:65536", "https://console.example.com:",
                "https://console.example.com.evil.example", "https://evil.example/console.example.com",
                "https://console%2eexample.com", "https://console.example.com\\@evil.example",
                "https://console.example.com /x", "https://", "javascript://console.example.com",
                "https://a\u00a0b.example.net", "https://\u0441onsole.example.com"):
        cases["host " + url] = (12, signed.sign(k, token=TOKEN, console_url=url))
    return cases


@pytest.mark.wine
def test_refused_enrollments_write_nothing(machine: Machine, se_cases) -> None:
    """Each SE as an installer would hand it over (PendingEnrollment), each under its own key."""
    pending = {f"{REG_KEY}\\{i}": {"PendingEnrollment": se} for i, (_, se) in enumerate(se_cases.values())}
    machine.import_reg(pending)
    with step(f"{len(se_cases)} refused SEs"):
        for i, (name, (code, _)) in enumerate(se_cases.items()):
            config = rf"{DATA_DIR}\{i}.json"
            result = machine.agent("enroll-from-registry", "--registry-key", f"{REG_KEY}\\{i}", "--config", config)
            refused(result, code, name)
            assert not machine.host(config).exists(), name
    after = machine.registry()
    for i, name in enumerate(se_cases):
        assert after.get(str(i)) == {}, (name, "PendingEnrollment must be deleted, Enrollment never written")
    assert not machine.host(DATA_DIR).exists()


@pytest.mark.wine
def test_console_host_allowlist_accepts(machine: Machine, keys, tmp_path: Path) -> None:
    """The other side of the host rules: what the patterns do allow. verify-enrollment writes nothing."""
    for url in ("https://console.example.com", "HTTPS://CONSOLE.Example.COM/", "https://console.example.com:443/x",
                "https://a.example.net", "https://a.b.example.net?q=1#f", "https://eu.example.org:8443/tenant",
                "https://console.example.com/path%20with%20escapes"):
        se = signed.sign(keys.pinned, token=TOKEN, console_url=url, expires_at=int(time.time()) + HOUR)
        (tmp_path / "se").write_text(se)
        result = machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "se"))
        assert result.returncode == 0, (url, result.stderr)
        assert json.loads(result.stdout)["console_url"] == url
    assert not machine.host(DATA_DIR).exists()


@pytest.mark.wine
def test_verify_enrollment_prints_public_fields(machine: Machine, keys, tmp_path: Path) -> None:
    issued, expires = int(time.time()) - 5, int(time.time()) + HOUR
    se = signed.sign(keys.pinned, account_id="acct-ü", group_id="g\"1", token=TOKEN, console_url=URL,
                     issued_at=issued, expires_at=expires, extra={"future_field": {"nested": [1, 2.5e3, None]}})
    (tmp_path / "se").write_text(se)
    result = machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "se"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
    assert json.loads(result.stdout) == {"account_id": "acct-ü", "group_id": "g\"1", "console_url": URL,
                                         "key_id": signed.kid(keys.pinned), "issued_at": issued, "expires_at": expires}
    (tmp_path / "bad").write_text(se + "\n")
    refused(machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "bad")), 6, "newline")
    refused(machine.agent("verify-enrollment", "--file", r"C:\no\such.se"), 7, "missing file")
    refused(machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "se"), "--config", r"C:\x.json"), 2, "usage")
    assert not machine.host(DATA_DIR).exists()


@pytest.mark.wine
def test_trust_file_must_be_present_and_well_formed(machine: Machine, bases, keys, tmp_path: Path) -> None:
    se = signed.sign(keys.pinned, token=TOKEN, console_url=URL)
    installer = stamped(bases.exe, se, "exe", tmp_path / "setup.exe")
    good = json.loads(signed.trust_json([keys.pinned], HOSTS))
    key = good["keys"][0]
    cases = {
        "missing": None,
        "not-json": b"{\"version\": 1,",
        "empty": b"",
        "empty-keys": json.dumps({**good, "keys": []}).encode(),
        "empty-hosts": json.dumps({**good, "console_hosts": []}).encode(),
        "no-hosts": json.dumps({k: v for k, v in good.items() if k != "console_hosts"}).encode(),
        "version-2": json.dumps({**good, "version": 2}).encode(),
        "version-string": json.dumps({**good, "version": "1"}).encode(),
        "p384": json.dumps({**good, "keys": [{**key, "crv": "P-384"}]}).encode(),
        "rsa": json.dumps({**good, "keys": [{**key, "kty": "RSA"}]}).encode(),
        "short-x": json.dumps({**good, "keys": [{**key, "x": key["x"][:-2]}]}).encode(),
        "x-padded": json.dumps({**good, "keys": [{**key, "x": key["x"] + "="}]}).encode(),
        "duplicate-key": json.dumps(good).encode()[:-1] + b', "version": 1}',
    }
    with step(f"{len(cases)} bad trust files"):
        for name, data in cases.items():
            machine.trust(data)
            result = machine.agent("enroll-from-installer", "--installer", machine.z(installer),
                                   "--registry-key", REG_KEY, "--config", rf"{DATA_DIR}\enrollment.json")
            refused(result, 13, name)
            assert not machine.host(rf"{DATA_DIR}\enrollment.json").exists(), name
    assert machine.registry() == {}


@pytest.mark.wine
def test_key_rotation(machine: Machine, keys, tmp_path: Path) -> None:
    old, new = (signed.sign(k, token=TOKEN, console_url=URL) for k in (keys.pinned, keys.rotated))
    machine.trust(signed.trust_json([keys.pinned, keys.rotated], HOSTS))
    for i, se in enumerate((old, new)):
        (tmp_path / "se").write_text(se)
        assert machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "se")).returncode == 0, i
    machine.trust(signed.trust_json([keys.rotated], HOSTS))  # the old key retired
    (tmp_path / "se").write_text(old)
    refused(machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "se")), 10, "retired key")
    machine.trust(signed.trust_json([keys.pinned], HOSTS))  # not yet rotated
    (tmp_path / "se").write_text(new)
    refused(machine.agent("verify-enrollment", "--file", machine.z(tmp_path / "se")), 10, "key not yet pinned")


# ===================================================================== enrolling


@pytest.mark.wine
def test_enroll_from_signed_exe_and_msi(machine: Machine, bases, keys, tmp_path: Path) -> None:
    for kind, base in (("exe", bases.exe), ("msi", bases.msi)):
        se = signed.sign(keys.pinned, group_id=f"group-{kind}", token=TOKEN, console_url=URL,
                         expires_at=int(time.time()) + HOUR)
        installer = stamped(base, se, kind, tmp_path / f"setup.{kind}")
        key, config = f"{REG_KEY} {kind}", rf"{DATA_DIR} {kind}\deeper\enrollment.json"
        assert not machine.host(config).parent.exists()  # the agent must create the folders
        with step(f"enroll-from-installer ({kind})"):
            result = machine.agent("enroll-from-installer", "--installer", machine.z(installer),
                                   "--registry-key", key, "--config", config)
        assert result.returncode == 0, result.stderr
        assert machine.host(config).read_bytes() == config_bytes(se)
        assert machine.registry(key) == {"": {"Enrollment": se}}


@pytest.mark.wine
def test_enroll_from_registry(machine: Machine, keys) -> None:
    first = signed.sign(keys.pinned, group_id="first", token=TOKEN, console_url=URL)
    config = rf"{DATA_DIR}\enrollment.json"
    machine.import_reg({REG_KEY: {"PendingEnrollment": first}})
    result = machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config)
    assert result.returncode == 0, result.stderr
    assert machine.host(config).read_bytes() == config_bytes(first)
    assert machine.registry() == {"": {"Enrollment": first}}  # PendingEnrollment gone

    # A reinstall with a bad enrollment: refused, and the earlier enrollment stays as it was.
    for code, bad in ((10, signed.sign(keys.stranger, group_id="evil", token=TOKEN, console_url=URL)),
                      (12, signed.sign(keys.pinned, group_id="evil", token=TOKEN, console_url="https://evil.example")),
                      (6, "not an enrollment")):
        machine.import_reg({REG_KEY: {"PendingEnrollment": bad}})
        refused(machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config), code, bad[:20])
        assert machine.host(config).read_bytes() == config_bytes(first)
        assert machine.registry() == {"": {"Enrollment": first}}
    refused(machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config), 3, "no pending")
    refused(machine.agent("enroll-from-registry", "--registry-key", REG_KEY + " Absent", "--config", config), 3, "no key")
    refused(machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", "relative.json"), 2, "usage")
    refused(machine.agent("write-config", "--registry-key", REG_KEY, "--config", config), 2, "write-config is gone")


@pytest.mark.wine
def test_cannot_write_config(machine: Machine, keys) -> None:
    blocker = rf"{DATA_DIR}\blocker"
    machine.host(blocker).parent.mkdir(parents=True)
    machine.host(blocker).write_bytes(b"a file where a folder should be")
    machine.import_reg({REG_KEY: {"PendingEnrollment": signed.sign(keys.pinned, token=TOKEN, console_url=URL)}})
    result = machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", blocker + r"\enrollment.json")
    refused(result, 4, "blocked")
    assert machine.registry() == {"": {}}  # no Enrollment without a config; PendingEnrollment gone


# ===================================================================== the service


def wait_for_status(path: Path, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            last = json.loads(path.read_bytes())
            if last.get("state") == state:
                return last
        time.sleep(0.1)
    raise AssertionError(f"status.json never reached {state!r}; last seen: {last}")


def sc_state(machine: Machine, name: str) -> str:
    out = machine.run("sc", "query", name).stdout
    return next((line.split()[-1] for line in out.splitlines() if "STATE" in line), out)


def wait_stopped(machine: Machine, name: str) -> None:
    deadline = time.monotonic() + 30
    while sc_state(machine, name) not in ("STOPPED", "") and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.wine
def test_service_verifies_its_config_on_every_start(machine: Machine, keys) -> None:
    config = rf"{DATA_DIR}\enrollment.json"
    status = machine.host(config).with_name("status.json")
    se = signed.sign(keys.pinned, account_id="acct-svc", group_id="grp-svc", token=TOKEN, console_url=URL)
    machine.import_reg({REG_KEY: {"PendingEnrollment": se}})
    assert machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config).returncode == 0

    name = "ExampleAgentTest"
    bin_path = f'"{AGENT}" service --registry-key "{REG_KEY}" --config "{config}"'
    created = machine.run("sc", "create", name, "binPath=", bin_path, "start=", "demand")
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        with step("sc start -> status.json running"):
            assert machine.run("sc", "start", name).returncode == 0
            running = wait_for_status(status, "running")
        assert running == {"state": "running", "account_id": "acct-svc", "group_id": "grp-svc", "console_url": URL,
                           "key_id": signed.kid(keys.pinned),
                           "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
        assert TOKEN.encode() not in status.read_bytes()
        assert sc_state(machine, name) == "RUNNING"
        assert machine.run("sc", "stop", name).returncode == 0
        assert wait_for_status(status, "stopped") == {**running, "state": "stopped"}
        wait_stopped(machine, name)

        # The config sits on disk between starts: anything wrong with it now stops the start.
        header, _, signature = se.split(".")
        other = signed.sign(keys.pinned, token=TOKEN, console_url="https://evil.example").split(".")[1]
        bad_configs = {
            10: config_bytes(f"{header}.{other}.{signature}"),  # another payload under this signature
            11: config_bytes(signed.sign(keys.pinned, token=TOKEN, console_url=URL, expires_at=int(time.time()) - 1)),
            12: config_bytes(signed.sign(keys.pinned, token=TOKEN, console_url="https://evil.example")),
            6: b'{"enrollment": 1}',
            5: None,
        }
        for code, data in bad_configs.items():
            status.unlink(missing_ok=True)
            if data is None:
                machine.host(config).unlink()
            else:
                machine.host(config).write_bytes(data)
            machine.run("sc", "start", name)
            error = wait_for_status(status, "error")
            assert error == {"state": "error", "exit_code": code}, code
            wait_stopped(machine, name)
            assert sc_state(machine, name) == "STOPPED", code
    finally:
        machine.run("sc", "stop", name)
        wait_stopped(machine, name)
        machine.run("sc", "delete", name)


@pytest.mark.wine
def test_forget_removes_everything_and_waits_for_the_service(machine: Machine, keys) -> None:
    config = rf"{DATA_DIR}\enrollment.json"
    status = machine.host(config).with_name("status.json")
    se = signed.sign(keys.pinned, token=TOKEN, console_url=URL)
    machine.import_reg({REG_KEY: {"PendingEnrollment": se}})
    assert machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config).returncode == 0
    # A second install's enrollment still pending: forget removes it too.
    machine.import_reg({REG_KEY: {"PendingEnrollment": se, "Other": "kept"}})
    name = "ExampleAgentForget"
    bin_path = f'"{AGENT}" service --registry-key "{REG_KEY}" --config "{config}"'
    assert machine.run("sc", "create", name, "binPath=", bin_path, "start=", "demand").returncode == 0
    try:
        assert machine.run("sc", "start", name).returncode == 0
        wait_for_status(status, "running")
        # What a write cut short leaves (a service killed at shutdown): forget takes it too.
        machine.host(config + ".tmp").write_bytes(b"{")
        status.with_name("status.json.tmp").write_bytes(b"{")
        # An uninstaller runs `forget` once it has told the service to stop; wine's msiexec does
        # not wait for the stop, and a running agent.exe cannot be deleted. forget waits (at
        # most 30 s) until no other process runs its agent.exe: here, until the service is stopped.
        with step("forget waits for the running service to exit"):
            forget = subprocess.Popen(["wine", AGENT, "forget", "--registry-key", REG_KEY, "--config", config],
                                      env=machine.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                time.sleep(3)
                assert forget.poll() is None, f"forget exited ({forget.returncode}) while the service still ran"
                assert not machine.host(config).exists(), "forget deletes the config first"
                assert machine.run("sc", "stop", name).returncode == 0
                assert forget.wait(timeout=30) == 0
            finally:
                if forget.poll() is None:
                    forget.kill()
        assert sc_state(machine, name) == "STOPPED"
        assert not status.exists(), "status.json left behind"
        assert not machine.host(DATA_DIR).exists(), "the empty folder is removed"
        assert machine.registry() == {"": {"Other": "kept"}}  # only the agent's own values go
        again = machine.agent("forget", "--registry-key", REG_KEY, "--config", config)
        assert again.returncode == 0, again.stderr  # nothing left to forget is fine
    finally:
        machine.run("sc", "stop", name)
        wait_stopped(machine, name)
        machine.run("sc", "delete", name)


@pytest.mark.wine
def test_service_refuses_to_run_by_hand(machine: Machine) -> None:
    # wine's StartServiceCtrlDispatcher waits ~10 s for an SCM that never calls; more on a busy machine.
    with step("service by hand"):
        result = machine.agent("service", "--registry-key", REG_KEY, "--config", rf"{DATA_DIR}\enrollment.json",
                               timeout=180)
    assert result.returncode == 2, result.stderr
    assert "service control manager" in result.stderr

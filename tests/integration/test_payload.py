"""The agent payloads against the installer contract (payload/README.md).

(a) The C test agent, built with mingw-w64 and run under wine in a fresh 64-bit prefix: registry
    to config byte for byte, the installer slot, the Windows service. Not skipped where wine can
    run (x86_64); skipped, with the reason, on any other machine.
(b) The Python reference agent on this host: config writing, slot reading, and `run` against a
    local HTTPS console with a CA made here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import importlib.util
import ipaddress
import json
import os
import py_compile
import secrets
import shutil
import signal
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support import wine as winesupport

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = ROOT / "payload"
AGENT_PY = PAYLOAD / "agent" / "agent.py"
BUILD_CMD = ["make", "-C", str(PAYLOAD / "testagent")]
AGENT_EXE = PAYLOAD / "build" / "windows" / "agent.exe"

MAGIC = b"ENRS" + b"LOT1"
KEYS = ("account_id", "group_id", "console_url", "enrollment_token")
REG_NAMES = dict(zip(KEYS, ("AccountId", "GroupId", "ConsoleUrl", "EnrollmentToken")))

REG_KEY = r"SOFTWARE\Example Vendor\Example Agent"
CONFIG_WIN = r"C:\ProgramData\Example Vendor\Example Agent\enrollment.json"

ENROLLMENT = {
    "account_id": "acct-7f3a9c",
    "group_id": "grüppe-✓",
    "console_url": "https://c.example.com/e?a=1&b='x'$y;z",
    "enrollment_token": secrets.token_urlsafe(3100)[:4096],  # the largest token allowed
}
# Every character class the JSON writer must escape, and UTF-16 surrogate pairs (😀, 𝄞).
HOSTILE = {
    "account_id": 'a"b\\c/d\x01\x1f\x7f\t\n\r\b\f',
    "group_id": "grüppe-✓-😀-𝄞",
    "console_url": "https://c.example.com/e?a=1&b='x'$y;z%00\"<>",
    "enrollment_token": "tok\\en\"" + secrets.token_hex(16) + "\u2028é",
}

def needs_x86_64(test):
    """A wine test: run wherever wine can run x86-64 programs, skipped (with the reason) elsewhere."""
    return pytest.mark.wine(winesupport.needs_x86_64(test))


def expected_config(values: dict[str, str]) -> bytes:
    """The contract's bytes, spelt out independently of both agents."""
    return json.dumps({k: values[k] for k in KEYS}, ensure_ascii=False).encode("utf-8")


def make_slot(payload: bytes | None, size: int = 8192, length: int | None = None) -> bytes:
    """magic + uint32 LE length + payload, zero-padded to a fixed size, as the pipeline stamps it."""
    payload = payload or b""
    body = MAGIC + struct.pack("<I", len(payload) if length is None else length) + payload
    assert len(body) <= size
    return body + b"\0" * (size - len(body))


def slot_json(values: dict[str, object], **extra: object) -> bytes:
    # ensure_ascii=True: the pipeline may send non-ASCII as \uXXXX, surrogate pairs included.
    return json.dumps({**extra, **values}, ensure_ascii=True).encode()


def fake_installer(path: Path, *slots: bytes) -> Path:
    """Random bytes around the slots: the shape of a signed EXE or MSI as far as the agent cares."""
    parts = [secrets.token_bytes(64 * 1024)]
    for slot in slots:
        parts += [slot, secrets.token_bytes(4096)]
    parts.append(secrets.token_bytes(32 * 1024))
    data = b"".join(parts)
    assert data.count(MAGIC) == len(slots)
    path.write_bytes(data)
    return path


def agent_lines(stderr: str) -> list[str]:
    """The agent's own stderr lines (wine may add its own)."""
    return [line for line in stderr.splitlines() if line.startswith("agent: ")]


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    print(f"[time] {name}: {time.monotonic() - start:.2f} s")


# ===================================================================== (a) C test agent, wine


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


class Wine:
    """One 64-bit wine prefix; every Windows program runs through `run`."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WINE")},
            "WINEPREFIX": str(prefix),
            "WINEARCH": "win64",
            "WINEDEBUG": "-all",
            "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono / Gecko install prompts
            "DISPLAY": "",
        }

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # Files, not pipes: services.exe and friends, started by whichever wine command comes
        # first, inherit its stdio and would hold a pipe open long after the command exits.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(["wine", *args], env=self.env, stdout=out, stderr=err,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
            out.seek(0)
            err.seek(0)
            text = [f.read().decode("utf-8", "replace") for f in (out, err)]
        return subprocess.CompletedProcess(proc.args, proc.returncode, *text)

    def server(self, flag: str) -> None:
        subprocess.run(["wineserver", flag], env=self.env, timeout=120, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def host(self, win_path: str) -> Path:
        assert win_path[:3].upper() == "C:\\", win_path
        return self.prefix / "drive_c" / Path(*win_path[3:].split("\\"))

    @staticmethod
    def z(path: Path) -> str:
        return "Z:" + str(path).replace("/", "\\")

    def import_reg(self, key: str, values: dict[str, str], tmp: Path) -> None:
        """Writes REG_SZ values through a .reg file: no value on a command line, any character.

        hex(1) is REG_SZ as raw UTF-16LE, so quotes, backslashes and control characters need no
        .reg escaping; long values are continued over lines as regedit writes them.
        """
        lines = ["Windows Registry Editor Version 5.00", "", f"[HKEY_LOCAL_MACHINE\\{key}]"]
        for name, value in values.items():
            data = [f"{b:02x}" for b in (value + "\0").encode("utf-16-le")]
            rows = [",".join(data[i : i + 25]) for i in range(0, len(data), 25)]
            lines.append(f'"{name}"=hex(1):' + ",\\\r\n  ".join(rows))
        reg = tmp / f"values-{secrets.token_hex(4)}.reg"
        reg.write_text("\r\n".join(lines) + "\r\n", encoding="utf-16")
        result = self.run("reg", "import", self.z(reg), "/reg:64")
        reg.unlink()
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wine]:
    assert shutil.which("wine") and shutil.which("wineserver"), "install wine (Debian: apt-get install wine)"
    w = Wine(tmp_path_factory.mktemp("wine") / "prefix")
    try:
        with step("wine prefix creation (wineboot -i + wineserver -w)"):
            boot = subprocess.run(["wineboot", "-i"], env=w.env, capture_output=True, text=True, timeout=300)
            w.server("-w")  # a program started while the prefix still boots can fail at random
            # Keep wineserver (and services.exe) up between commands: a cold start costs 1-3 s each.
            w.server("-p")
        assert boot.returncode == 0, boot.stderr
        assert (w.prefix / "drive_c" / "ProgramData").is_dir(), boot.stderr
        yield w
    finally:
        subprocess.run(["wineserver", "-k"], env=w.env, timeout=60)


@pytest.fixture(scope="session")
def registry(wine: Wine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The installer's four values under the contract's key."""
    with step("reg import (4 values)"):
        wine.import_reg(REG_KEY, {REG_NAMES[k]: v for k, v in ENROLLMENT.items()}, tmp_path_factory.mktemp("reg"))
    return REG_KEY


def load_agent_module():
    spec = importlib.util.spec_from_file_location("payload_agent", AGENT_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def agent_mod():
    return load_agent_module()


def test_agent_exe_is_self_contained(c_agent: Path) -> None:
    data = c_agent.read_bytes()
    assert data[:2] == b"MZ"
    # The installers embed the agent: a literal magic in it could be taken for the slot.
    assert MAGIC not in data
    dump = subprocess.run(["x86_64-w64-mingw32-objdump", "-p", str(c_agent)], capture_output=True, text=True, check=True)
    dlls = {line.split(":", 1)[1].strip().lower() for line in dump.stdout.splitlines() if "DLL Name:" in line}
    assert dlls and dlls <= {"kernel32.dll", "advapi32.dll", "msvcrt.dll"}, dlls


@needs_x86_64
def test_version_is_a_build_define(wine: Wine, c_agent: Path, tmp_path: Path) -> None:
    assert wine.run(str(c_agent), "--version").stdout.strip() == "1.0.0"
    out = tmp_path / "v"
    subprocess.run([*BUILD_CMD, f"OUT_DIR={out}", "AGENT_VERSION=9.8.7-test"], capture_output=True, check=True)
    with step("wine agent.exe --version"):
        result = wine.run(str(out / "agent.exe"), "--version")
    assert (result.returncode, result.stdout.strip()) == (0, "9.8.7-test")


@needs_x86_64
@pytest.mark.parametrize("values", [ENROLLMENT, HOSTILE], ids=["contract", "escapes"])
def test_write_config_is_registry_byte_for_byte(wine: Wine, c_agent: Path, registry: str, agent_mod, values, tmp_path) -> None:
    key = registry
    if values is not ENROLLMENT:
        key = REG_KEY + " Escapes"
        wine.import_reg(key, {REG_NAMES[k]: v for k, v in values.items()}, tmp_path)
    config = rf"C:\ProgramData\Example Vendor\Test {tmp_path.name}\deeper\enrollment.json"
    assert not wine.host(config).parent.exists()  # the agent must create the folders
    with step(f"wine agent.exe write-config ({tmp_path.name})"):
        result = wine.run(str(c_agent), "write-config", "--config", config, "--registry-key", key)
    assert result.returncode == 0, result.stderr
    written = wine.host(config).read_bytes()
    assert written == expected_config(values)
    # Both agents write the same bytes for the same enrollment.
    assert written == agent_mod.render_config(agent_mod.Enrollment(**values))
    assert values["enrollment_token"] not in result.stdout + result.stderr


@needs_x86_64
def test_write_config_failures(wine: Wine, c_agent: Path, registry: str, tmp_path: Path) -> None:
    partial = REG_KEY + " Partial"
    wine.import_reg(partial, {"AccountId": "a", "GroupId": "g", "EnrollmentToken": ENROLLMENT["enrollment_token"]}, tmp_path)
    blocker = r"C:\ProgramData\Example Vendor\blocker"
    wine.host(blocker).parent.mkdir(parents=True, exist_ok=True)
    wine.host(blocker).write_bytes(b"a file where a folder should be")
    cases = [
        (3, ["--registry-key", partial, "--config", CONFIG_WIN]),  # ConsoleUrl missing
        (3, ["--registry-key", REG_KEY + " Absent", "--config", CONFIG_WIN]),
        (2, ["--registry-key", registry]),
        (2, ["--registry-key", registry, "--config", "relative\\enrollment.json"]),
        (2, ["--registry-key", registry, "--config", CONFIG_WIN, "--token", "x"]),
        (2, ["--registry-key", registry, "--registry-key", registry, "--config", CONFIG_WIN]),
        (4, ["--registry-key", registry, "--config", blocker + r"\enrollment.json"]),
    ]
    for code, args in cases:
        result = wine.run(str(c_agent), "write-config", *args)
        assert result.returncode == code, (args, result.stderr)
        assert len(agent_lines(result.stderr)) == 1, result.stderr
        assert ENROLLMENT["enrollment_token"] not in result.stdout + result.stderr
    assert wine.run(str(c_agent), "frobnicate").returncode == 2


@needs_x86_64
def test_enroll_from_installer(wine: Wine, c_agent: Path, tmp_path: Path, agent_mod) -> None:
    key = REG_KEY + " Stamped"
    values = {**HOSTILE, "enrollment_token": "T0k-" + secrets.token_urlsafe(3000)[:4000]}
    decoy = {**ENROLLMENT, "group_id": "decoy-group"}
    installer = fake_installer(
        tmp_path / "installer.exe",
        make_slot(slot_json(decoy)),  # an older stamp: the last slot in the file wins
        make_slot(slot_json(values, future_field={"nested": [1, 2.5e3, None, True]})),
    )
    config = r"C:\ProgramData\Example Vendor\Stamped\enrollment.json"
    with step("wine agent.exe enroll-from-installer"):
        result = wine.run(str(c_agent), "enroll-from-installer", "--registry-key", key,
                          "--installer", wine.z(installer), "--config", config)
    assert result.returncode == 0, result.stderr
    assert wine.host(config).read_bytes() == expected_config(values)
    # The registry now holds the enrollment too: write-config alone reproduces the file.
    again = r"C:\ProgramData\Example Vendor\Stamped\again.json"
    assert wine.run(str(c_agent), "write-config", "--registry-key", key, "--config", again).returncode == 0
    assert wine.host(again).read_bytes() == expected_config(values)
    # The Python agent reads the same slot to the same enrollment.
    assert agent_mod.read_slot(installer) == agent_mod.Enrollment(**values)


BAD_SLOTS = {
    "empty-slot": (5, [make_slot(None)]),
    "no-slot": (5, []),
    "malformed-json": (6, [make_slot(b'{"account_id": "a", ')]),
    "missing-key": (6, [make_slot(slot_json({k: v for k, v in ENROLLMENT.items() if k != "group_id"}))]),
    "empty-value": (6, [make_slot(slot_json({**ENROLLMENT, "account_id": ""}))]),
    "not-a-string": (6, [make_slot(slot_json({**ENROLLMENT, "account_id": 42}))]),
    "duplicate-key": (6, [make_slot(slot_json(ENROLLMENT)[:-1] + b', "group_id": "other"}')]),
    "lone-surrogate": (6, [make_slot(slot_json({**ENROLLMENT, "group_id": "x"}).replace(b'"x"', b'"\\ud83d"'))]),
    "nul-escape": (6, [make_slot(slot_json({**ENROLLMENT, "group_id": "x"}).replace(b'"x"', b'"a\\u0000b"'))]),
    "length-past-eof": (6, [make_slot(slot_json(ENROLLMENT), length=60_000)]),
    "length-huge": (6, [make_slot(slot_json(ENROLLMENT), length=0x7FFFFFF0)]),
    "trailing-garbage": (6, [make_slot(slot_json(ENROLLMENT) + b"}")]),
}


@needs_x86_64
def test_enroll_from_installer_failures(wine: Wine, c_agent: Path, tmp_path: Path) -> None:
    for name, (code, slots) in BAD_SLOTS.items():
        key = REG_KEY + " Bad " + name
        config = rf"C:\ProgramData\Example Vendor\Bad\{name}.json"
        installer = fake_installer(tmp_path / f"{name}.msi", *slots)
        result = wine.run(str(c_agent), "enroll-from-installer", "--installer", wine.z(installer),
                          "--registry-key", key, "--config", config)
        assert result.returncode == code, (name, result.stderr)
        assert len(agent_lines(result.stderr)) == 1, (name, result.stderr)
        assert ENROLLMENT["enrollment_token"] not in result.stdout + result.stderr
        assert not wine.host(config).exists(), name
        # Nothing half-written: the key was never created.
        assert wine.run("reg", "query", "HKLM\\" + key, "/reg:64").returncode != 0, name
    missing = wine.run(str(c_agent), "enroll-from-installer", "--installer", r"C:\no\such.exe",
                       "--registry-key", REG_KEY + " Nope", "--config", CONFIG_WIN)
    assert missing.returncode == 7, missing.stderr


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


def sc_state(wine: Wine, name: str) -> str:
    out = wine.run("sc", "query", name).stdout
    return next((line.split()[-1] for line in out.splitlines() if "STATE" in line), out)


@needs_x86_64
def test_service_reads_its_enrollment(wine: Wine, c_agent: Path, registry: str) -> None:
    install_dir = r"C:\Program Files\Example Vendor\Example Agent"
    wine.host(install_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy2(c_agent, wine.host(install_dir + r"\agent.exe"))
    config = r"C:\ProgramData\Example Vendor\Service\enrollment.json"
    status = wine.host(config).with_name("status.json")
    # A config that differs from the registry: the status must come from the file.
    from_file = {**HOSTILE, "account_id": "acct-from-config-file"}
    wine.host(config).parent.mkdir(parents=True, exist_ok=True)
    wine.host(config).write_bytes(expected_config(from_file))

    name = "ExampleAgentTest"
    bin_path = f'"{install_dir}\\agent.exe" service --registry-key "{registry}" --config "{config}"'
    with step("wine sc create"):
        created = wine.run("sc", "create", name, "binPath=", bin_path, "start=", "demand")
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        with step("wine sc start -> status.json running"):
            started = wine.run("sc", "start", name)
            assert started.returncode == 0, started.stdout + started.stderr
            running = wait_for_status(status, "running")
        public = {k: from_file[k] for k in KEYS[:3]}
        token_sha = hashlib.sha256(from_file["enrollment_token"].encode()).hexdigest()
        assert running == {"state": "running", **public, "token_sha256": token_sha}
        assert from_file["enrollment_token"].encode() not in status.read_bytes()
        assert sc_state(wine, name) == "RUNNING"

        with step("wine sc stop -> status.json stopped"):
            stopped = wine.run("sc", "stop", name)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            assert wait_for_status(status, "stopped") == {**running, "state": "stopped"}
        deadline = time.monotonic() + 30
        while sc_state(wine, name) != "STOPPED" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sc_state(wine, name) == "STOPPED"

        # No config yet (the installer's write-config failed): the service makes it from the registry.
        wine.host(config).unlink()
        with step("wine sc start without config -> materialised from registry"):
            assert wine.run("sc", "start", name).returncode == 0
            running = wait_for_status(status, "running")
        assert running["account_id"] == ENROLLMENT["account_id"]
        assert running["group_id"] == ENROLLMENT["group_id"]
        assert wine.host(config).read_bytes() == expected_config(ENROLLMENT)

        # An uninstaller runs `forget` once it has told the service to stop; wine's msiexec does
        # not wait for the stop, and a running agent.exe cannot be deleted. forget waits (at
        # most 30 s) until no other process runs its agent.exe: here, until the service is stopped.
        with step("forget waits for the running service to exit"):
            forget = subprocess.Popen(["wine", install_dir + r"\agent.exe", "forget", "--registry-key", registry,
                                       "--config", config], env=wine.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(3)
                assert forget.poll() is None, f"forget exited ({forget.returncode}) while the service still ran"
                assert not wine.host(config).exists(), "forget deletes the config first"
                assert wine.run("sc", "stop", name).returncode == 0
                assert forget.wait(timeout=30) == 0
            finally:
                if forget.poll() is None:
                    forget.kill()
        assert sc_state(wine, name) == "STOPPED"
        assert not status.exists(), "status.json left behind"
    finally:
        wine.run("sc", "stop", name)
        deadline = time.monotonic() + 30
        while sc_state(wine, name) not in ("STOPPED", "") and time.monotonic() < deadline:
            time.sleep(0.2)
        wine.run("sc", "delete", name)


@needs_x86_64
def test_service_refuses_to_run_by_hand(wine: Wine, c_agent: Path) -> None:
    result = wine.run(str(c_agent), "service", "--registry-key", REG_KEY, "--config", CONFIG_WIN, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "service control manager" in result.stderr


# ===================================================================== (b) Python reference agent


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "AGENT_CA_BUNDLE"}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", **extra}


def run_agent(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(AGENT_PY), *args], capture_output=True, text=True,
                          env=env or agent_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def test_python_agent_does_not_contain_the_magic(tmp_path: Path) -> None:
    assert MAGIC not in AGENT_PY.read_bytes()
    pyc = tmp_path / "agent.pyc"
    py_compile.compile(str(AGENT_PY), cfile=str(pyc), doraise=True)  # what PyInstaller embeds
    assert MAGIC not in pyc.read_bytes()


def test_config_file_is_private_and_exact(agent_mod, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "example agent" / "enrollment.json"
    config.parent.mkdir(parents=True)
    config.write_bytes(b"old")
    config.chmod(0o644)
    old_umask = os.umask(0)  # a careless parent process must not widen the mode
    try:
        agent_mod.write_config(config, agent_mod.Enrollment(**HOSTILE))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.read_bytes() == expected_config(HOSTILE)
    assert [p.name for p in config.parent.iterdir()] == ["enrollment.json"]  # no temp file left
    assert agent_mod.load_config(config) == agent_mod.Enrollment(**HOSTILE)
    assert HOSTILE["enrollment_token"] not in repr(agent_mod.Enrollment(**HOSTILE))


def test_slot_reading(agent_mod, tmp_path: Path) -> None:
    installer = fake_installer(tmp_path / "a.exe", make_slot(slot_json({**ENROLLMENT, "group_id": "old"})),
                               make_slot(slot_json(HOSTILE)))
    assert agent_mod.read_slot(installer) == agent_mod.Enrollment(**HOSTILE)
    expected = {5: agent_mod.NoEnrollment, 6: agent_mod.MalformedEnrollment}
    for name, (code, slots) in BAD_SLOTS.items():
        bad = fake_installer(tmp_path / f"{name}.pkg", *slots)
        with pytest.raises(expected[code]):
            agent_mod.read_slot(bad)
    with pytest.raises(agent_mod.InstallerUnreadable):
        agent_mod.read_slot(tmp_path / "absent.exe")
    (tmp_path / "empty.exe").write_bytes(b"")
    with pytest.raises(agent_mod.NoEnrollment):
        agent_mod.read_slot(tmp_path / "empty.exe")


def test_cli_enroll_from_installer_and_file(tmp_path: Path) -> None:
    installer = fake_installer(tmp_path / "agent.pkg", make_slot(slot_json(ENROLLMENT)))
    config = tmp_path / "Library" / "Example Agent" / "enrollment.json"
    result = run_agent("enroll-from-installer", "--config", str(config), "--installer", str(installer))
    assert result.returncode == 0, result.stderr
    assert config.read_bytes() == expected_config(ENROLLMENT)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    sidecar = tmp_path / "enrollment.sidecar.json"
    sidecar.write_bytes(slot_json(HOSTILE))
    result = run_agent("enroll-from-file", "--file", str(sidecar), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert config.read_bytes() == expected_config(HOSTILE)

    for code, args in [
        (2, ["enroll-from-file", "--file", str(sidecar), "--config", "relative.json"]),
        (2, ["enroll-from-file", "--file", str(sidecar), "--config", str(config), "--registry-key", "K"]),
        (2, ["write-config", "--config", str(config)]),
        (2, ["enroll-from-installer", "--config", str(config)]),
        (5, ["enroll-from-installer", "--installer", str(fake_installer(tmp_path / "e.pkg", make_slot(None))),
             "--config", str(config)]),
        (6, ["enroll-from-installer", "--installer", str(fake_installer(tmp_path / "m.pkg", make_slot(b"{"))),
             "--config", str(config)]),
        (7, ["enroll-from-installer", "--installer", str(tmp_path), "--config", str(config)]),
    ]:
        result = run_agent(*args)
        assert result.returncode == code, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert config.read_bytes() == expected_config(HOSTILE)  # failures left the config alone
    assert run_agent("--version").stdout.strip() == "1.0.0"


# --------------------------------------------------------------------- a local HTTPS console


def make_ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
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
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Payload Test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, leaf_key.public_key(),
                ca_key, ca=False, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


class Console:
    """Answers POSTs from a script of (status, body, headers); records what it received."""

    def __init__(self, port: int, ca: Path):
        self.url = f"https://127.0.0.1:{port}/tenant"
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
            state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
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


def console_config(tmp_path: Path, console: Console, agent_mod) -> tuple[Path, dict[str, str]]:
    values = {**ENROLLMENT, "console_url": console.url + "/"}
    config = tmp_path / "etc" / "enrollment.json"
    agent_mod.write_config(config, agent_mod.Enrollment(**values))
    return config, values


def test_run_enrolls_with_bearer_token_after_retry(console: Console, agent_mod, tmp_path: Path) -> None:
    config, values = console_config(tmp_path, console, agent_mod)
    console.answer(503, 200)
    result = run_agent("run", "--config", str(config), "--ca-bundle", str(console.ca), "--attempts", "3", "--backoff", "0.05")
    assert result.returncode == 0, result.stderr
    assert len(console.requests) == 2  # one 503, then success
    request = console.requests[-1]
    assert request["path"] == "/tenant/api/v1/enroll"
    assert request["headers"]["Authorization"] == f"Bearer {values['enrollment_token']}"
    assert json.loads(request["body"]) == {"account_id": values["account_id"], "group_id": values["group_id"]}
    assert request["headers"]["Content-Type"] == "application/json"
    status = json.loads((config.parent / "status.json").read_bytes())
    assert status["state"] == "enrolled" and "enrollment_token" not in status
    assert values["enrollment_token"] not in result.stdout + result.stderr


def test_run_takes_the_ca_bundle_from_the_environment(console: Console, agent_mod, tmp_path: Path) -> None:
    config, _ = console_config(tmp_path, console, agent_mod)
    result = run_agent("run", "--config", str(config), env=agent_env(AGENT_CA_BUNDLE=str(console.ca)))
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
def test_run_failures(console: Console, agent_mod, tmp_path: Path, answers, code: int, requests: int) -> None:
    config, values = console_config(tmp_path, console, agent_mod)
    console.answer(*answers)
    result = run_agent("run", "--config", str(config), "--ca-bundle", str(console.ca), "--attempts", "3", "--backoff", "0.01")
    assert result.returncode == code, result.stderr
    assert len(console.requests) == requests
    assert len(result.stderr.strip().splitlines()) == 1
    assert values["enrollment_token"] not in result.stdout + result.stderr


def test_run_verifies_the_console_certificate(console: Console, agent_mod, tmp_path: Path) -> None:
    config, values = console_config(tmp_path, console, agent_mod)
    result = run_agent("run", "--config", str(config), "--attempts", "3", "--backoff", "0.01")  # system CAs only
    assert result.returncode == 9, result.stderr
    assert "certificate" in result.stderr
    assert console.requests == []  # the token never left
    plain = {**values, "console_url": console.url.replace("https://", "http://")}
    agent_mod.write_config(config, agent_mod.Enrollment(**plain))
    assert run_agent("run", "--config", str(config)).returncode == 6


def test_posix_service_enrolls_and_stops_on_sigterm(console: Console, agent_mod, tmp_path: Path) -> None:
    config, values = console_config(tmp_path, console, agent_mod)
    console.answer(503, 200)
    status = config.parent / "status.json"
    proc = subprocess.Popen(
        [sys.executable, str(AGENT_PY), "service", "--config", str(config), "--backoff", "0.05"],
        env=agent_env(AGENT_CA_BUNDLE=str(console.ca)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        enrolled = wait_for_status(status, "enrolled")
        assert enrolled["account_id"] == values["account_id"]
        assert enrolled["token_sha256"] == hashlib.sha256(values["enrollment_token"].encode()).hexdigest()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert wait_for_status(status, "stopped", timeout=1)["group_id"] == values["group_id"]
    assert len(console.requests) == 2
    assert values["enrollment_token"] not in out + err

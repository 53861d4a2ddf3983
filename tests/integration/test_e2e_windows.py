"""The product's flow end to end under wine, with the reference agent frozen for Windows
(`make payload-windows`): from the console's download button to its Devices tab.

1. A release of EXE and MSI around the reference agent, pinning the enrollment key and the test
   console's host; its payload carries the console's private CA as console-ca.pem beside the
   agent (inside the installers' signatures), which the agent trusts instead of the system store.
2. The console asks the service (POST /v1/installers) for one group's installer and downloads it
   through the signed link, as the browser does.
3. The admin runs it silently on a fresh Windows machine: the Windows service starts, the agent
   verifies its signed enrollment and enrolls with the test console (tests/support/console.py),
   which then lists the device in that group.
4. A console that refuses (the token revoked) leaves the service running and retrying with
   backoff, the reason in status.json; uninstall stops the service and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from pathlib import Path

import httpx
import pytest

from builder import release
from builder.config import load_product
from builder.trust import TRUST_FILE, Trust
from tests.integration.test_payload import Machine
from tests.integration.test_payload_windows import windows_agent  # noqa: F401 (a fixture)
from tests.integration.test_service import start_service
from tests.support import console as consolesupport
from tests.support.service import RELEASE_VERSION, SOURCE_DATE_EPOCH, enrollment_key_for, signers_for

PRODUCT = load_product()
ACCOUNT = "acct-e2e"
INSTALL_DIR = "C:\\Program Files\\" + PRODUCT.windows_install_folder
DATA_DIR = "C:\\ProgramData\\" + PRODUCT.windows_install_folder
CONSOLE_CA = "console-ca.pem"  # payload/README.md: the agent trusts it instead of the system store


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    console = consolesupport.start_console(tmp_path_factory.mktemp("e2e-console"))
    yield console
    console.stop()


@pytest.fixture(scope="module")
def service(console, windows_agent, dev_keys, tmp_path_factory):  # noqa: F811
    """The release (reference agent + the console's CA; pins for localhost:PORT), published to
    the service's local store, and the service serving it on 127.0.0.1."""
    work = tmp_path_factory.mktemp("e2e")
    payload = work / "payload" / "windows"
    payload.mkdir(parents=True)
    shutil.copy2(windows_agent, payload / PRODUCT.agent_exe)
    shutil.copy2(console.ca_pem, payload / CONSOLE_CA)
    trust = Trust((enrollment_key_for(dev_keys).pin,), (f"localhost:{console.port}",))
    release.release(format_names=["exe", "msi"], product=PRODUCT, version=RELEASE_VERSION, payload=payload.parent,
                    signers=signers_for(dev_keys), trust=trust, out=work / "release", source_date_epoch=SOURCE_DATE_EPOCH)
    root = work / "service"
    root.mkdir()
    svc = start_service(root, (root / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": secrets.token_hex(32)},
                        signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=work / "release")
    yield svc
    svc.close()


def download(service, console, fmt: str, account: str, group: str, token: str, folder: Path) -> Path:
    """What the console's button does: ask for the group's installer, follow the link."""
    asked = service.post({"account_id": account, "group_id": group, "token": token, "format": fmt,
                          "console_url": console.url + "/tenant"})
    assert asked.status_code == 200, asked.text
    doc = asked.json()
    got = httpx.get(doc["url"], timeout=120)
    assert got.status_code == 200, got.text[:300]
    path = folder / f"setup-{group}{'.exe' if fmt == 'exe' else '.msi'}"
    path.write_bytes(got.content)
    return path


def install(machine: Machine, installer: Path, tmp_path: Path) -> None:
    if installer.suffix == ".exe":
        result = machine.run(machine.z(installer), "/S", timeout=600)
    else:
        log = tmp_path / "install.log"
        result = machine.run("msiexec", "/i", machine.z(installer), "/qn", "/l*v", machine.z(log), timeout=600)
    assert result.returncode == 0, f"{installer.name} exited {result.returncode}"


def uninstall(machine: Machine, installer: Path) -> None:
    if installer.suffix == ".exe":
        # The uninstaller copies itself to %TEMP% and returns at once: wait for its work.
        machine.run(INSTALL_DIR + "\\uninstall.exe", "/S", timeout=300)
        until(lambda: not machine.host(INSTALL_DIR).exists(), 120, "the uninstaller removed Program Files")
    else:
        result = machine.run("msiexec", "/x", machine.z(installer), "/qn", timeout=600)
        assert result.returncode == 0, f"msiexec /x exited {result.returncode}"


def until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f} s: {what}")
        time.sleep(0.5)


def status(machine: Machine) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(machine.host(DATA_DIR + "\\status.json").read_bytes())
    return None


def service_state(machine: Machine) -> str | None:
    out = machine.run("sc", "query", PRODUCT.service_name).stdout
    return next((line.split()[-1] for line in out.splitlines() if "STATE" in line), None)


def assert_nothing_left(machine: Machine) -> None:
    assert not machine.host(INSTALL_DIR).exists(), "files left in Program Files"
    assert not machine.host(DATA_DIR).exists(), "the config or status left in ProgramData"
    assert service_state(machine) is None, "the service is still registered"
    assert machine.registry(PRODUCT.registry_key) == {}, "the agent's registry key is still there"


@pytest.fixture
def machine(wine, tmp_path):
    """A fresh Windows machine with nothing of ours on it (its wineserver stays up between
    commands, so the installed service keeps running while the test looks)."""
    return Machine(wine, None, tmp_path)


@pytest.mark.wine
@pytest.mark.parametrize("fmt", ["exe", "msi-tagged", "msi"])
def test_download_install_enroll_and_appear_in_the_group(service, console, machine, fmt, tmp_path):
    account, group = f"{ACCOUNT}-{fmt}", f"group-{fmt}"  # an account per case: the console is the module's
    token = console.state.add_token(account, group)
    installer = download(service, console, fmt, account, group, token, tmp_path)
    install(machine, installer, tmp_path)
    installed = sorted(p.name for p in machine.host(INSTALL_DIR).iterdir())
    assert {PRODUCT.agent_exe, TRUST_FILE, CONSOLE_CA} <= set(installed), installed

    # The device on the console's Devices tab, in the group whose installer was downloaded.
    devices = until(lambda: console.state.devices(account, group), 180, "the console lists the device")
    assert len(devices) == 1 and console.state.devices(account) == devices
    done = until(lambda: (status(machine) or {}).get("state") == "enrolled" and status(machine), 30, "status enrolled")
    assert (done["group_id"], done["console_url"]) == (group, console.url + "/tenant")
    assert service_state(machine) == "RUNNING"

    uninstall(machine, installer)
    assert_nothing_left(machine)
    leaked = any(token in text for text in machine.outputs)
    assert not leaked, "the token appeared in a program's output"


@pytest.mark.wine
def test_a_refusing_console_leaves_the_service_retrying_with_backoff(service, console, machine, tmp_path):
    group = "group-revoked"
    token = console.state.add_token(ACCOUNT, group)
    installer = download(service, console, "exe", ACCOUNT, group, token, tmp_path)
    console.state.revoke(token)  # revoked after the download: the agent meets a refusal
    install(machine, installer, tmp_path)

    second = until(lambda: (s := status(machine)) and s.get("state") == "refused" and s.get("failures", 0) >= 2 and s,
                   180, "status.json records a second refusal")
    assert second["reason"] == "console refused enrollment: HTTP 401"
    assert second["retry_in"] > 0 and second["group_id"] == group
    # Backoff, not a spin: few requests over several seconds, and the service keeps running.
    time.sleep(6)
    refusals = [r for r in console.state.refusals if r.error == "token_revoked"]
    assert 2 <= len(refusals) <= 5, len(refusals)
    assert service_state(machine) == "RUNNING"
    assert console.state.devices(ACCOUNT, group) == []

    uninstall(machine, installer)
    assert_nothing_left(machine)

"""The MSI format with the real tools: wixl, msibuild, msiinfo, osslsigncode, and msiexec under wine.

Three stamped MSIs are built once (group A 1.0.0, group B 1.0.0, group B 1.1.0) with hostile
values, and one wine machine takes them in turn: install, another group's MSI of the same
version, an upgrade with a command-line override, uninstall.

No token is ever printed: secrets are compared in a statement of their own and asserted as a
bool, so pytest's assertion rewriting has nothing to show.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder import build as builder_build
from builder.config import load_product
from builder.enrollment import Enrollment, Secret
from builder.errors import FormatError
from builder.formats.base import BuildRequest
from builder.signing.signers import Signers
from builder.formats.msi import MsiFormat
from builder.signing.authenticode import SigningKey
from builder.tools import msitools, runner
from builder.trust import TRUST_FILE
from tests.support import enrollkeys

EPOCH = 1767225600
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/.=~"
TOKEN_A = "".join(random.Random(1).choices(TOKEN_CHARS, k=4096))
TOKEN_B = "".join(random.Random(2).choices(TOKEN_CHARS, k=4096))
# Every URL character the rules allow that XML, wixl's preprocessor ($, $(...), $$), MSI
# formatted text or a command line treats specially.
HOSTILE_URL = "https://console.example.com:8443/e/p;x?a=1&b='x'$y;z(!)*%20+,=&c=$(sys.CURRENTDIR)$$(env.HOME)$&d=~#frag"
ACCOUNT = "acct:0042@example.com"
GROUP_A = "grp-A_1.x:y@z"
GROUP_B = "grp-B_2.x:y@z"
OVERRIDE_GROUP = "override-9:x@y"
# Payload files beyond the agent, in a sub-tree. Payload names follow one rule for both Windows formats (builder/formats/windows_payload.py);
# the widest names it allows. Hostile names are refused there (tests/unit/test_exe_render.py).
EXTRA_FILES = {"lib/a+b (c) d-e_f.dll": b"dll bytes", "lib/deeper/data.bin": bytes(range(256)), "x (1).txt": b"x"}


# The release's pins: the suite's enrollment key and the console host HOSTILE_URL names.
TRUST = enrollkeys.trust_of(hosts=("console.example.com:8443",))
_signed: dict = {}


def enrollment(group: str, token: str):
    """The group's enrollment signed with the suite's key (one signature per group and token)."""
    if (group, token) not in _signed:
        _signed[group, token] = enrollkeys.signed(
            Enrollment(account_id=ACCOUNT, group_id=group, token=Secret(token), console_url=HOSTILE_URL), trust=TRUST)
    return _signed[group, token]


def public(values: dict) -> dict:
    """Everything but the token, safe to compare with ==."""
    return {k: v for k, v in values.items() if "token" not in k.lower()}


@dataclass
class Builds:
    product: object
    payload: Path
    a: Path
    b: Path
    b110: Path
    commands: list


@pytest.fixture(scope="module")
def payload(test_payload, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msi-payload")
    win = root / "windows"
    win.mkdir()
    shutil.copy2(test_payload / "windows" / "agent.exe", win / "agent.exe")
    for rel, data in EXTRA_FILES.items():
        (win / rel).parent.mkdir(parents=True, exist_ok=True)
        (win / rel).write_bytes(data)
    (win / ".build-stamp").write_text("not installed")
    return root


@pytest.fixture(scope="module")
def builds(dev_keys, payload, tmp_path_factory) -> Builds:
    """Three signed MSIs through the orchestrator, with every tool command recorded."""
    product = load_product()
    signers = Signers(authenticode=SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), verify_ca=dev_keys.ca_cert)
    out = tmp_path_factory.mktemp("msi-out")
    commands = []
    real_run = runner.run

    def spy(tool, args, **kw):
        commands.append([tool, *map(str, args), *(kw.get("env") or {}).values()])
        return real_run(tool, args, **kw)

    paths = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "run", spy)
        for key, group, token, version in (("a", GROUP_A, TOKEN_A, "1.0.0"), ("b", GROUP_B, TOKEN_B, "1.0.0"), ("b110", GROUP_B, TOKEN_B, "1.1.0")):
            [output] = builder_build.build(
                format_names=["msi"], product=product, version=version, payload=payload,
                enrollment=enrollment(group, token), trust=TRUST, signers=signers, out=out, source_date_epoch=EPOCH,
                basename=f"agent-{key}",
            )
            paths[key] = output.path
    return Builds(product=product, payload=payload, commands=commands, **paths)


def msiinfo_table(msi: Path, table: str) -> list[dict[str, str]]:
    proc = subprocess.run(["msiinfo", "export", str(msi), table], capture_output=True, check=True)
    return msitools.parse_idt(proc.stdout)[1]


# --- the file ---------------------------------------------------------------------------------

def test_osslsigncode_verifies_every_build(builds, dev_keys):
    for msi in (builds.a, builds.b, builds.b110):
        proc = subprocess.run(["osslsigncode", "verify", "-CAfile", str(dev_keys.ca_cert), "-in", str(msi)], capture_output=True, text=True)
        assert proc.returncode == 0 and "Signature verification: ok" in proc.stdout, f"{msi.name}: {proc.stdout[-500:]}"


def test_verify_reports_the_stamped_enrollment_masked(builds, dev_keys):
    report = MsiFormat().verify(builds.a, dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["signature"]["ok"]
    assert report["enrollment"] == {"state": "valid", **enrollment(GROUP_A, TOKEN_A).public()}
    assert (report["product"], report["version"]) == (builds.product.name, "1.0.0")
    assert report["msi"]["upgrade_code"] == "{" + builds.product.upgrade_code + "}"
    leaked = TOKEN_A in json.dumps(report)
    assert not leaked, "verify's report carries the token"


def test_msiinfo_shows_hidden_enrollment_and_its_default(builds):
    props = {r["Property"]: r["Value"] for r in msiinfo_table(builds.a, "Property")}
    assert props["MsiHiddenProperties"] == "ENROLLMENT"
    same = props["ENROLLMENT"] == enrollment(GROUP_A, TOKEN_A).jws.reveal()
    assert same, "the ENROLLMENT default is not the signed enrollment"
    # The unsigned per-field properties of earlier versions are gone (a launch condition refuses them).
    assert not {"ACCOUNT_ID", "GROUP_ID", "CONSOLE_URL", "ENROLLMENT_TOKEN"} & set(props)
    assert "ENROLLMENT" in props["SecureCustomProperties"].split(";")
    conditions = [r["Condition"] for r in msiinfo_table(builds.a, "LaunchCondition")]
    assert "NOT (ACCOUNT_ID OR GROUP_ID OR CONSOLE_URL OR ENROLLMENT_TOKEN)" in conditions
    upgrade = [r for r in msiinfo_table(builds.a, "Upgrade") if r["ActionProperty"] == "WIX_UPGRADE_DETECTED"]
    assert [(r["VersionMax"], r["Attributes"]) for r in upgrade] == [("1.0.0", "513")]  # max inclusive: same version replaced
    types = {r["Action"]: r["Type"] for r in msiinfo_table(builds.a, "CustomAction")}
    assert types == {"AgentEnrollFromRegistry": "3090", "AgentForget": "3154", "AgentForgetOnRollback": "3410"}
    seq = {r["Action"]: int(r["Sequence"]) for r in msiinfo_table(builds.a, "InstallExecuteSequence")}
    assert (seq["InstallFiles"] < seq["WriteRegistryValues"] < seq["InstallServices"] < seq["AgentForgetOnRollback"]
            < seq["AgentEnrollFromRegistry"] < seq["StartServices"] < seq["InstallFinalize"])
    assert seq["StopServices"] < seq["AgentForget"] < seq["DeleteServices"] < seq["RemoveRegistryValues"] < seq["RemoveFiles"]
    assert seq["RemoveExistingProducts"] < seq["InstallInitialize"]
    files = sorted(r["FileName"] for r in msiinfo_table(builds.a, "File"))
    assert files == sorted(["agent.exe", TRUST_FILE, *(Path(p).name for p in EXTRA_FILES)])
    components = msiinfo_table(builds.a, "Component")
    assert components and all(int(c["Attributes"]) & 256 for c in components), "a component is not 64-bit"


def test_token_is_never_on_a_command_line(builds):
    assert builds.commands, "the spy saw no tool run"
    leaked = [c[0] for c in builds.commands if any(TOKEN_A in a or TOKEN_B in a for a in c)]
    assert not leaked, f"the token was on the command line of: {leaked}"


def test_a_changed_table_byte_fails_verification(builds, dev_keys, tmp_path):
    data = bytearray(builds.a.read_bytes())
    # The signed enrollment is stored once, in the string pool of the Property table: change
    # one character of its signature (A <-> B keeps it base64url).
    jws = enrollment(GROUP_A, TOKEN_A).jws.reveal().encode()
    assert data.count(jws) == 1
    at = data.find(jws) + len(jws) - 10
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    tampered = tmp_path / "tampered.msi"
    tampered.write_bytes(data)
    report = MsiFormat().verify(tampered, dev_keys.ca_cert)
    assert not report["ok"] and not report["signature"]["ok"]
    assert "digest mismatch" in report["detail"]
    # ... and the enrollment itself no longer verifies either (what the agent checks).
    assert report["enrollment"]["state"] == "invalid", report["enrollment"]


@pytest.mark.parametrize("cut", ["one-byte", "sectors", "half"])
def test_a_truncated_msi_raises_format_error(builds, tmp_path, cut):
    data = builds.a.read_bytes()
    size = {"one-byte": len(data) - 1, "sectors": len(data) - 8 * 512, "half": len(data) // 1024 * 512}[cut]
    broken = tmp_path / f"cut-{cut}.msi"
    broken.write_bytes(data[:size])
    for check in (MsiFormat().inspect, lambda p: MsiFormat().verify(p, None)):
        with pytest.raises(FormatError) as info:
            check(broken)
        assert str(broken) in str(info.value)


def test_a_file_that_is_no_msi_raises_format_error(builds, tmp_path):
    empty = tmp_path / "empty.msi"
    empty.touch()
    for path in (builds.payload / "windows" / "agent.exe", empty):
        with pytest.raises(FormatError) as info:
            MsiFormat().inspect(path)
        assert str(path) in str(info.value)


def test_unsigned_build_is_byte_reproducible(payload, tmp_path):
    built = []
    for n in (1, 2):
        work = tmp_path / f"work{n}"
        work.mkdir()
        request = BuildRequest(product=load_product(), version="1.0.0", payload=payload, enrollment=enrollment(GROUP_A, TOKEN_A),
                               trust=TRUST, work=work, source_date_epoch=EPOCH, signers=Signers(unsigned=True))
        built.append(MsiFormat().build(request))
        if n == 1:
            time.sleep(1.1)  # a later second: wixl's own times would differ
    first, second = (b.path.read_bytes() for b in built)
    assert first == second
    assert built[0].details["package_code"] == built[1].details["package_code"]
    summary = msitools.summary(built[0].path)
    assert summary[9] == built[0].details["package_code"]
    assert summary[12] == summary[13] == "2026/01/01 00:00:00"
    assert built[0].signer is None and not list(tmp_path.rglob("*.wxs")), "the rendered source (with the token) was left behind"


def test_release_build_without_enrollment(payload, tmp_path):
    request = BuildRequest(product=load_product(), version="1.0.0", payload=payload, enrollment=None, trust=TRUST,
                           work=tmp_path, source_date_epoch=EPOCH, signers=Signers(unsigned=True))
    report = MsiFormat().inspect(MsiFormat().build(request).path)
    assert report["ok"], report["detail"]
    assert report["enrollment"] is None and report["signature"] is None


# --- under wine -------------------------------------------------------------------------------

def read_log(log: Path) -> str:
    data = log.read_bytes() if log.exists() else b""
    text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8", "replace")
    # The signed enrollments hold the tokens (base64url): masked as the tokens are.
    for secret in (*(se.jws.reveal() for se in _signed.values()), TOKEN_A, TOKEN_B):
        text = text.replace(secret, "***")
    return text


def msiexec(wine, tmp_path: Path, step: str, *args: str) -> None:
    log = tmp_path / f"{step}.log"
    rc = wine.msiexec(*args, log=log)
    # Wine cuts exit codes to 8 bits; the log's tail says what failed (tokens masked).
    assert rc == 0, f"{step}: msiexec exited {rc}\n" + "\n".join(read_log(log).splitlines()[-40:])


def wait_for(read, want, seconds: float = 20):
    """The value `read()` returns once it equals `want`, or the last one after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        got = read()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def products(wine, product) -> dict[str, str]:
    """Add/Remove Programs entries of this product: product code -> version."""
    return {k: v.get("DisplayVersion") for k, v in wine.uninstall_entries().items() if v.get("DisplayName") == product.name}


def check_enrolled(wine, product, group: str, token: str) -> None:
    """The registry's Enrollment, enrollment.json and the running service's status.json hold
    exactly the signed enrollment of `group` and `token`; the installer's PendingEnrollment is gone."""
    __tracebackhide__ = True  # pytest would print this frame's arguments: the token among them
    se = enrollment(group, token)
    values = wine.reg_values(product.registry_key) or {}
    assert sorted(values) == ["Enrollment"], sorted(values)
    same = values["Enrollment"] == se.jws.reveal()
    assert same, "the registry's Enrollment is not the group's signed enrollment"

    data = wine.host_path("C:\\ProgramData\\" + product.windows_install_folder)
    same = (data / "enrollment.json").read_bytes() == json.dumps({"enrollment": se.jws.reveal()}).encode()
    assert same, "enrollment.json does not hold the group's signed enrollment"

    def status():
        try:
            return json.loads((data / "status.json").read_bytes())
        except (OSError, ValueError):
            return None
    want = {"state": "running", "account_id": ACCOUNT, "group_id": group, "console_url": HOSTILE_URL,
            "key_id": se.key_id, "token_sha256": hashlib.sha256(token.encode()).hexdigest()}
    # Written by the service when it starts with this config: a stale file names the old group.
    got = wait_for(lambda: {k: (status() or {}).get(k) for k in want}, want)
    assert got == want  # the sha256 of the token only


def test_install_group_switch_upgrade_override_and_uninstall(builds, wine, tmp_path):
    product = builds.product
    program_files = wine.host_path("C:\\Program Files\\" + product.windows_install_folder)
    data = wine.host_path("C:\\ProgramData\\" + product.windows_install_folder)

    # GPO-style: no properties, the stamped defaults enroll group A.
    msiexec(wine, tmp_path, "install-a", "/i", wine.winpath(builds.a), "/qn")
    installed = sorted(p.relative_to(program_files).as_posix() for p in program_files.rglob("*") if p.is_file())
    assert installed == sorted(["agent.exe", TRUST_FILE, *EXTRA_FILES])  # not the dot-file
    assert (program_files / TRUST_FILE).read_bytes() == TRUST.to_json_bytes()
    for rel in (r for r in installed if r != TRUST_FILE):
        assert (program_files / rel).read_bytes() == (builds.payload / "windows" / rel).read_bytes(), rel
    check_enrolled(wine, product, GROUP_A, TOKEN_A)
    # The agent writes status.json while START_PENDING, then reports RUNNING; wine's msiexec
    # does not wait for that, so neither can this check.
    assert wait_for(lambda: wine.service_state(product.service_name), "RUNNING") == "RUNNING"
    [code_a] = products(wine, product)

    # Group B's MSI of the same version replaces A's: one product, enrolled to B.
    msiexec(wine, tmp_path, "install-b", "/i", wine.winpath(builds.b), "/qn")
    listed = products(wine, product)
    assert list(listed.values()) == ["1.0.0"] and code_a not in listed
    check_enrolled(wine, product, GROUP_B, TOKEN_B)

    # Upgrade to 1.1.0 with a signed enrollment on the command line: it wins over the stamped
    # default. (An unsigned per-field value is refused: tests/integration/test_repointing.py.)
    override = enrollment(OVERRIDE_GROUP, TOKEN_B).jws.reveal()
    msiexec(wine, tmp_path, "upgrade", "/i", wine.winpath(builds.b110), "/qn", f"ENROLLMENT={override}")
    assert list(products(wine, product).values()) == ["1.1.0"]
    check_enrolled(wine, product, OVERRIDE_GROUP, TOKEN_B)

    msiexec(wine, tmp_path, "uninstall", "/x", wine.winpath(builds.b110), "/qn")
    assert products(wine, product) == {}
    assert wine.service_state(product.service_name) is None
    assert not (wine.reg_values(product.registry_key) or {}), "enrollment registry values left behind"
    assert not [p for p in program_files.rglob("*") if p.is_file()], "installed files left behind"
    left = sorted(p.name for p in data.rglob("*")) if data.exists() else []
    assert left == [], f"the agent's files were not removed on uninstall: {left}"

"""The WiX source the MSI format renders, and the pure helpers around it, without running wixl.

Rendered text is parsed as XML, then every attribute is passed through a model of wixl's
preprocessor (msitools 0.101, tools/wixl/preprocessor.vala `eval`): hostile values must come
out of both layers unchanged. tests/integration/test_msi.py checks the same with real wixl.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.config import load_product
from builder.enrollment import Enrollment, Secret
from builder.trust import SignedEnrollment
from tests.support.enrollkeys import signed
from builder.errors import FormatError, PayloadError
from builder.formats import msi
from builder.tools import msitools

WIX = "{http://schemas.microsoft.com/wix/2006/wi}"
# Within the enrollment rules, and aimed at each layer: XML (& '), wixl's preprocessor ($, $(, $$),
# MSI formatted text (no [ ] { } allowed by the rules), the command line (; ( ) ! *).
HOSTILE_URL = "https://console.example.com:8443/e/p;x?a=1&b='x'$y;z(!)*%20+,=&c=$(sys.CURRENTDIR)$$(env.HOME)$&d=~#frag"
TOKEN = ("Aa0-_+/.=~" * 410)[:4096]
HOSTILE_FILES = ["agent.exe", "lib/a&b'c $(env.PATH)$$.dll", "lib/deeper/data.bin", "x (1).txt"]


def hostile() -> SignedEnrollment:
    return signed(Enrollment(account_id="acct:0042@example.com", group_id="grp-A_1.x:y@z", token=Secret(TOKEN),
                             console_url=HOSTILE_URL), issued_at=1767225600)


def render(enrollment: SignedEnrollment | None = None, relpaths=("agent.exe",)) -> str:
    return msi.render_wxs(load_product(), "1.2.3", enrollment, list(relpaths),
                          product_code="11111111-2222-3333-4444-555555555555")


# --- a model of wixl's preprocessor ---------------------------------------------------------

def wixl_eval(text: str, variables: dict[str, str]) -> str:
    """What wixl 0.101 makes of an attribute or text value: `$(var.X)` expands (and is not
    evaluated again), `$$` gives `$` but leaves the second `$` to be read again, a lone `$` is
    dropped. Other variable kinds (env, sys) are refused here: they must never be reached."""
    out, end = [], 0
    while (pos := text.find("$", end)) != -1:
        out.append(text[end:pos])
        end = pos + 1
        rest = text[end:]
        if rest.startswith("$"):
            out.append("$")
        elif rest.startswith("("):
            closing = rest.find(")")
            assert closing != -1, "no matching closing parenthesis"
            name = rest[1:closing]
            assert "(" not in name, "unsupported function"
            kind, _, var = name.partition(".")
            assert kind == "var" and var in variables, f"the preprocessor would expand $({name})"
            out.append(variables[var])
            end += closing + 1
    return "".join(out) + text[end:]


def defined_variables(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'<\?define (\w+) = "([^"]*)" \?>', text)}


def parsed(text: str) -> tuple[ET.Element, dict[str, str]]:
    return ET.fromstring(text.encode()), defined_variables(text)


def values(root: ET.Element, variables: dict[str, str], tag: str, key: str, attr: str) -> dict[str, str]:
    return {e.get(key): wixl_eval(e.get(attr), variables) for e in root.iter(WIX + tag) if e.get(attr) is not None}


@pytest.mark.parametrize("literal, wixl_gives", [
    ("a$y", "ay"), ("a$$y", "a$y"), ("a$", "a"), ("a$$", "a$"), ("$$$", "$$"), ("x$$$$y", "x$$$y"),
])
def test_model_matches_what_wixl_0101_was_seen_doing(literal, wixl_gives):
    # Observed with wixl 0.101 on a Property value (and why `$$` is no escape): a model that
    # disagreed with these would prove nothing about the escaping.
    assert wixl_eval(literal, {}) == wixl_gives


# --- escaping -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="$()ab.&'\"<>;[]%", max_size=40))
def test_wix_text_survives_the_preprocessor(value):
    assert wixl_eval(msi.wix_text(value), {"Dollar": "$"}) == value


def test_signed_enrollment_round_trips_through_xml_and_preprocessor():
    e = hostile()
    root, variables = parsed(render(e))
    assert variables == {"Dollar": "$"}
    props = values(root, variables, "Property", "Id", "Value")
    same = props["ENROLLMENT"] == e.jws.reveal()  # never let pytest print the token
    assert same, "ENROLLMENT does not carry the signed enrollment unchanged"
    assert not set(msi.LEGACY_PROPERTIES) & set(props)
    assert props["MsiHiddenProperties"] == "ENROLLMENT"


def test_unsigned_per_field_properties_are_refused_by_a_launch_condition():
    # CONSOLE_URL=https://attacker on the msiexec line must not install, not be ignored.
    root, _ = parsed(render(hostile()))
    (condition,) = [c for c in root.iter(WIX + "Condition") if "CONSOLE_URL" in (c.text or "")]
    assert condition.text == "NOT (ACCOUNT_ID OR GROUP_ID OR CONSOLE_URL OR ENROLLMENT_TOKEN)"
    assert "ENROLLMENT=" in condition.get("Message")


def test_no_dollar_reaches_wixl_unescaped():
    text = render(hostile(), HOSTILE_FILES)
    body = text.replace(msi.WIX_DOLLAR, "")
    assert body.count("$") == 1 and '<?define Dollar = "$" ?>' in body


def test_signed_enrollment_appears_once_and_the_token_never_in_clear():
    text = render(hostile())
    count, clear = text.count(hostile().jws.reveal()), TOKEN in text
    assert count == 1 and not clear, f"signed enrollment written {count} times; token in clear: {clear}"


def test_hostile_file_names_round_trip():
    root, variables = parsed(render(hostile(), HOSTILE_FILES))
    files = root.iter(WIX + "File")
    names = sorted(wixl_eval(f.get("Source"), variables) for f in files)
    assert names == sorted(f"files/{p}" for p in HOSTILE_FILES)
    dirs = {wixl_eval(d.get("Name"), variables) for d in root.iter(WIX + "Directory") if d.get("Name")}
    assert {"lib", "deeper"} <= dirs


# --- structure ------------------------------------------------------------------------------

def test_every_component_is_64_bit_with_a_stable_guid():
    product = load_product()
    root, variables = parsed(render(hostile(), HOSTILE_FILES))
    components = list(root.iter(WIX + "Component"))
    assert components and all(c.get("Win64") == "yes" for c in components)
    guids = {}
    for c in components:
        for f in c.iter(WIX + "File"):
            guids[wixl_eval(f.get("Source"), variables).removeprefix("files/")] = c.get("Guid")
    assert guids == {p: product.component_guid(p) for p in HOSTILE_FILES}
    ids = [f.get("Id") for f in root.iter(WIX + "File")]
    assert all(ids) and len(set(ids)) == len(ids) and "AgentExe" in ids
    refs = {r.get("Id") for r in root.iter(WIX + "ComponentRef")}
    assert refs == {c.get("Id") for c in components}


def test_install_and_data_folders_follow_the_product():
    product = load_product()
    root, _ = parsed(render(hostile()))
    top = {d.get("Id"): d for d in root.iter(WIX + "Directory")}
    chain, node = [], top["ProgramFiles64Folder"]
    while (children := [d for d in node if d.tag == WIX + "Directory"]):
        node = children[0]
        chain.append(node.get("Name"))
    assert chain == product.install_parts
    assert node.get("Id") == "INSTALLFOLDER"
    assert top["DATAFOLDER"].find(WIX + "Component/" + WIX + "CreateFolder") is not None


def test_vendor_folders_are_components_so_that_uninstall_removes_them():
    """Every folder above the install and data folders is created by a component of its own
    (removed once empty on uninstall), whatever the depth of product.install_folder."""
    product = load_product(overrides={"install_folder": "Acme/Remote/Agent"})
    root, _ = parsed(msi.render_wxs(product, "1.2.3", None, ["agent.exe"], product_code="11111111-2222-3333-4444-555555555555"))
    top = {d.get("Id"): d for d in root.iter(WIX + "Directory")}
    refs = {r.get("Id") for r in root.iter(WIX + "ComponentRef")}
    for parent in ("ProgramFiles64Folder", "CommonAppDataFolder"):
        chain, node = [], top[parent]
        while (children := [d for d in node if d.tag == WIX + "Directory"]):
            node = children[0]
            chain.append(node)
        assert [d.get("Name") for d in chain] == ["Acme", "Remote", "Agent"]
        for folder in chain[:-1]:
            [component] = [c for c in folder if c.tag == WIX + "Component" and c.find(WIX + "CreateFolder") is not None]
            assert component.get("Win64") == "yes" and component.get("Id") in refs
            assert component.get("Guid") == product.component_guid(":folder:" + folder.get("Id"))


def test_an_exe_install_is_found_and_its_config_kept_if_the_takeover_rolls_back():
    product = load_product(overrides={"service_name": "AcmeSvc"})
    root, variables = parsed(msi.render_wxs(product, "1.2.3", None, ["agent.exe"], product_code="11111111-2222-3333-4444-555555555555"))
    [prop] = [p for p in root.iter(WIX + "Property") if p.get("Id") == msi.EXE_INSTALLED_PROPERTY]
    [search] = list(prop)
    assert (search.get("Root"), wixl_eval(search.get("Key"), variables), search.get("Name"), search.get("Win64")) == (
        "HKLM", "Software\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\AcmeSvc", "UninstallString", "yes")
    assert msi.EXE_INSTALLED_PROPERTY in msi.SECURE_PROPERTIES  # set on the client, read by the server
    sequence = {c.get("Action"): c.text for c in root.iter(WIX + "Custom")}
    # A refused enrollment over an EXE install rolls back without deleting the EXE's config.
    assert f"NOT {msi.EXE_INSTALLED_PROPERTY}" in sequence["AgentForgetOnRollback"]


def test_the_exe_takeover_rows_are_recognised():
    """What inspect() looks for: on install, the EXE's Add/Remove Programs key (named after the
    service) and its uninstaller are removed, as msi._post_build adds them."""
    key = {"RemoveRegistry": "ExeArpEntry", "Root": "2", "Key": "Software\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\Svc",
           "Name": "-", "Component_": "EnrollmentRegistry"}
    file = {"FileKey": "ExeUninstaller", "Component_": "EnrollmentRegistry", "FileName": "uninstall.exe",
            "DirProperty": "INSTALLFOLDER", "InstallMode": "1"}
    assert msi._takes_exe_over({"RemoveRegistry": [key], "RemoveFile": [file]}, ["Svc"])
    assert not msi._takes_exe_over({"RemoveRegistry": [key], "RemoveFile": [file]}, ["OtherSvc"])
    assert not msi._takes_exe_over({"RemoveRegistry": [{**key, "Name": "DisplayName"}], "RemoveFile": [file]}, ["Svc"])
    assert not msi._takes_exe_over({"RemoveRegistry": [key], "RemoveFile": [{**file, "InstallMode": "2"}]}, ["Svc"])
    assert not msi._takes_exe_over({"RemoveFile": [file]}, ["Svc"])


def test_service_and_custom_actions():
    product = load_product()
    root, variables = parsed(render(hostile()))
    config = f"[CommonAppDataFolder]{product.windows_install_folder}\\enrollment.json"
    where = f'--registry-key "{product.registry_key}" --config "{config}"'
    service = root.find(f".//{WIX}ServiceInstall")
    assert service.get("Name") == product.service_name and service.get("Start") == "auto"
    assert wixl_eval(service.get("Arguments"), variables) == f"service {where}"
    control = root.find(f".//{WIX}ServiceControl")
    assert (control.get("Start"), control.get("Stop"), control.get("Remove")) == ("install", "both", "both")
    actions = {a.get("Id"): a for a in root.iter(WIX + "CustomAction")}
    assert wixl_eval(actions["AgentEnrollFromRegistry"].get("ExeCommand"), variables) == f"enroll-from-registry {where}"
    assert wixl_eval(actions["AgentForget"].get("ExeCommand"), variables) == f"forget {where}"
    for a in actions.values():
        assert a.get("FileKey") == "AgentExe" and a.get("Impersonate") == "no"
    sequence = {c.get("Action"): (int(c.get("Sequence")), c.text) for c in root.iter(WIX + "Custom")}
    # Standard actions: StopServices 1900 < forget < DeleteServices 2000 ... RemoveFiles 3500;
    # InstallFiles 4000 < WriteRegistryValues 5000 < InstallServices 5800 < write-config < StartServices 5900.
    assert 1900 < sequence["AgentForget"][0] < 2000
    assert 5800 < sequence["AgentForgetOnRollback"][0] < sequence["AgentEnrollFromRegistry"][0] < 5900
    assert sequence["AgentEnrollFromRegistry"][1] == 'NOT REMOVE~="ALL"'
    assert "NOT UPGRADINGPRODUCTCODE" in sequence["AgentForget"][1]
    regs = {r.get("Name"): r for r in root.iter(WIX + "RegistryValue")}
    # Only the staging value: the agent writes Enrollment itself, once it verified it.
    assert {n: r.get("Value") for n, r in regs.items()} == {"PendingEnrollment": "[ENROLLMENT]"}
    assert {(r.get("Root"), r.get("Key")) for r in regs.values()} == {("HKLM", product.registry_key)}


def test_release_build_has_no_enrollment_and_enrolls_only_when_told():
    root, _ = parsed(render(None))
    props = {p.get("Id"): p.get("Value") for p in root.iter(WIX + "Property")}
    assert "ENROLLMENT" not in props and not set(msi.LEGACY_PROPERTIES) & set(props)
    assert props["MsiHiddenProperties"] == "ENROLLMENT"
    custom = {c.get("Action"): c.text for c in root.iter(WIX + "Custom")}
    assert custom["AgentEnrollFromRegistry"].endswith("AND ENROLLMENT")
    assert custom["AgentEnrollFromInstaller"].endswith("AND NOT ENROLLMENT")


# --- payload walk, codes, reading back ------------------------------------------------------

def test_payload_walk_skips_dot_files_and_requires_the_agent(tmp_path):
    (tmp_path / "lib" / ".cache").mkdir(parents=True)
    for rel in ("agent.exe", "lib/x.dll", ".agent-version", "lib/.DS_Store", "lib/.cache/y"):
        (tmp_path / rel).write_bytes(b"x")
    assert msi.payload_files(tmp_path, load_product()) == ["agent.exe", "lib/x.dll"]
    (tmp_path / "agent.exe").unlink()
    with pytest.raises(PayloadError, match="agent.exe"):
        msi.payload_files(tmp_path, load_product())


def test_codes_are_stable_and_follow_every_input():
    product = load_product()
    base = msi._input_digest(product, "1.0.0", hostile(), {"agent.exe": "00"})
    again = msi._input_digest(product, "1.0.0", hostile(), {"agent.exe": "00"})
    assert msi._codes(base, product) == msi._codes(again, product)
    other_group = signed(Enrollment(account_id="acct:0042@example.com", group_id="grp-B", token=Secret(TOKEN),
                                    console_url=HOSTILE_URL), issued_at=1767225600)
    others = [
        msi._input_digest(product, "1.0.1", hostile(), {"agent.exe": "00"}),
        msi._input_digest(product, "1.0.0", other_group, {"agent.exe": "00"}),
        msi._input_digest(product, "1.0.0", hostile(), {"agent.exe": "01"}),
        msi._input_digest(product, "1.0.0", None, {"agent.exe": "00"}),
    ]
    codes = {msi._codes(d, product) for d in [base, *others]}
    assert len(codes) == 5
    product_code, package_code = msi._codes(base, product)
    assert product_code != package_code and re.fullmatch(r"[0-9A-F-]{36}", product_code)


def test_parse_idt_unescapes_and_pads():
    data = b"Property\tValue\r\ns72\tl0\r\nProperty\tProperty\r\nA\tx\x15y\x19z\r\nB\r\n"
    assert msitools.parse_idt(data) == ("Property", [{"Property": "A", "Value": "x\ty\nz"}, {"Property": "B", "Value": ""}])


def test_same_version_upgrade_row_is_recognised():
    row = {"ActionProperty": "WIX_UPGRADE_DETECTED", "VersionMax": "1.0.0", "Attributes": "513"}
    assert msi._covers_same_version([row], "1.0.0")
    assert not msi._covers_same_version([{**row, "Attributes": "1"}], "1.0.0")  # what wixl writes
    assert not msi._covers_same_version([{**row, "VersionMax": "0.9.0"}], "1.0.0")


@pytest.mark.parametrize("content, why", [
    (b"", "not an MSI"),
    (b"MZ" + bytes(1022), "not an MSI"),
    (bytes.fromhex("D0CF11E0A1B11AE1") + bytes(22) + b"\x09\x00" + bytes(480) + bytes(100), "truncated"),
])
def test_container_check_names_the_file(tmp_path, content, why):
    path = tmp_path / "broken.msi"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=why) as info:
        msi._check_container(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="cannot read"):
        msi._check_container(tmp_path / "absent.msi")


def test_summary_time_is_utc():
    assert msi._summary_time(1767225600) == "2026/01/01 00:00:00"


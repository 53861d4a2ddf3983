"""The NSIS script and the reading back of an installer, without running makensis.

The script holds no enrollment: every EXE reads its signed enrollment from the slot in its own
signature, and checks it with the agent it carries before it touches an installed agent.
"""

from __future__ import annotations

import re
import struct
import zlib

import pytest

from builder.binfmt import nsis
from builder.config import TEMPLATES_DIR, load_product
from builder.enrollment import Secret
from builder.errors import FormatError, PayloadError
from builder.formats import exe
from builder.signing.authenticode import SigningKey

def render(relpaths=("agent.exe",), **kw) -> str:
    return exe.render_script(load_product(), "1.2.3", [*relpaths, "trust.json"], **kw)


# --- the rendered script --------------------------------------------------------------------

def test_every_quoted_string_is_safe_for_makensis():
    """Not only the pieces: no line anywhere carries `$%` (an environment variable of the build
    machine) and every `${...}` is one of the script's own defines or LogicLib macros."""
    text = render(sign_command='"./sign-uninstaller.sh"')
    assert "$%" not in text
    defines = set(re.findall(r"^!define (\w+)", text, re.MULTILINE)) | {"If", "ElseIf", "Else", "EndIf", "OrIf", "AndIf", "Do", "Loop", "Break", "UN"}
    used = set(re.findall(r"\$\{([^}]*)\}", text))
    assert used <= defines, f"unknown ${{...}}: {sorted(used - defines)}"


def test_the_enrollment_is_checked_before_an_installed_agent_is_touched():
    text = render()
    check = text.index('verify-enrollment --installer "$EXEPATH"')
    assert 'SetOutPath "$PLUGINSDIR\\agent"' in text[:check]
    assert 'File "files/agent.exe"' in text[:check] and 'File "files/trust.json"' in text[:check]
    # A refusal aborts before RemoveService (the installed agent keeps running) and files.
    abort = text.index("Abort", check)
    assert abort < text.index("Call RemoveService") < text.index('SetOutPath "$INSTDIR"')
    assert "SetErrorLevel 5" in text[check:abort]


def test_an_msi_install_is_refused_before_anything_is_done():
    """The EXE leaves an agent installed from the MSI alone: exit 1638 from .onInit, before
    the install section (which verifies the enrollment, then stops the service)."""
    text = render()
    init = text.split("Function .onInit", 1)[1].split("FunctionEnd", 1)[0]
    assert init.index("!insertmacro REQUIRE_ADMIN") < init.index("!insertmacro REFUSE_OVER_MSI")
    macro = text.split("!macro REFUSE_OVER_MSI", 1)[1].split("!macroend", 1)[0]
    assert "msi::MsiEnumRelatedProductsW(w \"${MSI_UPGRADE_CODE}\"" in macro
    assert f'!define MSI_UPGRADE_CODE "{{{load_product().upgrade_code}}}"' in text
    refuse = macro.split("${If} $0 == 0", 1)[1]
    assert refuse.index("SetErrorLevel 1638") < refuse.index("Quit") < refuse.index("${EndIf}")
    header = (TEMPLATES_DIR / exe.TEMPLATE).read_text().split("#}", 1)[0]
    assert "1638 (102 seen from Linux through wine) the agent is installed from its MSI" in header.replace("\n  ", " "), "the exit code is not in the template's list"


def test_no_enrollment_in_the_script_only_where_to_read_it():
    text = render()
    assert "builder-enrollment/" not in text and "WriteEnrollmentValue" not in text
    assert 'enroll-from-installer --installer "$EXEPATH" ${AGENT_ARGS}' in text
    assert "write-config" not in text
    # trust.json is installed beside the agent, where agents look for the pins.
    assert 'File "files/trust.json"' in text.split('SetOutPath "$INSTDIR"', 1)[1]


def test_uninstall_removes_the_enrollment_values():
    text = render()
    for name in ("Enrollment", "PendingEnrollment", "AccountId", "GroupId", "ConsoleUrl", "EnrollmentToken"):
        assert f'DeleteRegValue HKLM "${{REGKEY}}" "{name}"' in text


def test_product_values_come_from_the_config():
    product = load_product(overrides={"name": "Acme Agent (x64)", "vendor": "Acme, Inc", "service_name": "AcmeSvc", "service_display_name": "Acme Service",
                                      "install_folder": "Acme/Remote Agent", "registry_key": "SOFTWARE\\Acme\\RA",
                                      "agent_exe": "acme-agent.exe",
                                      "upgrade_code": "0A0A0A0A-1B1B-4C4C-8D8D-2E2E2E2E2E2E"})
    text = exe.render_script(product, "2.0.7", ["acme-agent.exe", "lib/x.dll", "trust.json"])
    assert '!define PRODUCT_NAME "Acme Agent (x64)"' in text
    assert '!define REGKEY "SOFTWARE\\Acme\\RA"' in text
    assert '!define INSTALL_FOLDER "Acme\\Remote Agent"' in text
    assert 'Uninstall\\AcmeSvc"' in text
    assert '!define MSI_UPGRADE_CODE "{0A0A0A0A-1B1B-4C4C-8D8D-2E2E2E2E2E2E}"' in text
    assert 'VIProductVersion "2.0.7.0"' in text
    assert 'SetOutPath "$INSTDIR\\lib"' in text and 'File "files/lib/x.dll"' in text
    assert 'Delete "$INSTDIR\\lib\\x.dll"' in text and 'RMDir "$INSTDIR\\lib"' in text
    assert 'DeleteRegKey /ifempty HKLM "SOFTWARE\\Acme\\RA"' in text
    assert 'DeleteRegKey /ifempty HKLM "SOFTWARE\\Acme"' in text
    assert 'DeleteRegKey /ifempty HKLM "SOFTWARE"' not in text
    assert 'RMDir "$PROGRAMFILES64\\Acme"' in text
    for word in ("Example", "ExampleRemoteAgent"):
        assert word not in text, f"a default name ({word}) is hard-coded"


def test_no_timestamp_in_the_script():
    assert render() == render()
    assert not re.search(r"__(DATE|TIME|TIMESTAMP)__", render())


def test_signing_hook_only_when_signing():
    assert "!uninstfinalize" not in render()
    assert "!uninstfinalize '\"./sign-uninstaller.sh\" \"%1\"' = 0" in render(sign_command='"./sign-uninstaller.sh"')


def test_sign_script_keeps_the_password_off_its_command_line(tmp_path):
    cert = tmp_path / "dir with $HOME and 'quote'" / "c.pem"
    cert.parent.mkdir()
    p12 = cert.parent / "k.p12"
    p12.write_bytes(b"x")
    key = SigningKey(pkcs12=p12, password=Secret("pa$$ w0rd'\""))
    script = exe._sign_script(key, 1767225600)
    assert "pa$$ w0rd" not in script
    assert "-readpass -" in script
    assert "'" + str(p12).replace("'", "'\"'\"'") + "'" in script  # one shell word, not expanded


def test_payload_names_are_checked(tmp_path):
    product = load_product()
    (tmp_path / "agent.exe").write_bytes(b"MZ")
    (tmp_path / ".agent-version").write_text("1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a b(1).dll").write_bytes(b"x")
    assert exe.payload_files(tmp_path, product) == ["agent.exe", "sub/a b(1).dll"]
    (tmp_path / "sub" / "$INSTDIR.dll").write_bytes(b"x")
    with pytest.raises(PayloadError, match=r"\$INSTDIR\.dll"):
        exe.payload_files(tmp_path, product)


def test_a_payload_cannot_bring_its_own_pins(tmp_path):
    # trust.json is written by builder from the release's keys and hosts, never taken from a payload.
    (tmp_path / "agent.exe").write_bytes(b"MZ")
    (tmp_path / "trust.json").write_text('{"keys": [], "console_hosts": ["evil.example"]}')
    with pytest.raises(PayloadError, match="trust.json"):
        exe.payload_files(tmp_path, load_product())


def test_missing_agent_is_a_payload_error(tmp_path):
    (tmp_path / "other.exe").write_bytes(b"MZ")
    with pytest.raises(PayloadError, match="agent.exe"):
        exe.payload_files(tmp_path, load_product())


# --- reading an installer back, on hand-made bytes ------------------------------------------

def nsis_header(strings: list[str]) -> bytes:
    """flags + 8 (u64 offset, u32 count) blocks, as an amd64 makensis packs them, then strings."""
    table = "\0".join(strings).encode("utf-16-le") + b"\0\0"
    start = 4 + 12 * 8
    offsets = [start] * 8
    offsets[nsis._NB_STRINGS] = start
    offsets[nsis._NB_LANGTABLES] = start + len(table)
    blocks = b"".join(struct.pack("<QI", off, 0) for off in offsets)
    return struct.pack("<I", 0) + blocks + table


def deflate(raw: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush()


def fake_installer(strings: list[str], *, flags: int = 0, extra_blocks: list[bytes] = ()) -> bytes:
    """A PE32+ with one section, then NSIS data: first header, the header block, more blocks, CRC."""
    pe = bytearray(0x400)
    pe[0:2] = b"MZ"
    struct.pack_into("<I", pe, 0x3C, 0x40)
    struct.pack_into("<4sHHIIIHH", pe, 0x40, b"PE\0\0", 0x8664, 1, 0, 0, 0, 240, 0x22)
    struct.pack_into("<H", pe, 0x58, 0x20B)
    struct.pack_into("<I", pe, 0x58 + 108, 16)
    struct.pack_into("<8sIIII", pe, 0x58 + 240, b".text", 0x200, 0x1000, 0x200, 0x200)
    header = nsis_header(strings)
    body = b""
    for raw in [header, *extra_blocks]:
        comp = deflate(raw)
        body += struct.pack("<I", len(comp) | 0x80000000) + comp
    first = struct.pack("<II12sII", flags, 0xDEADBEEF, b"NullsoftInst", len(header), 28 + len(body) + 4)
    return bytes(pe) + first + body + b"CRC!"


def test_embedded_uninstaller_is_found():
    uninstaller = fake_installer(["un"], flags=1)
    data = fake_installer(["x"], extra_blocks=[b"MZ not an nsis file" * 10, uninstaller])
    inst = nsis.locate(data, "setup.exe")
    assert nsis.embedded_uninstaller(data, inst, "setup.exe") == uninstaller
    assert nsis.embedded_uninstaller(fake_installer(["x"]), nsis.locate(fake_installer(["x"]), "s"), "s") is None


def string_entry(key: str, value: str) -> bytes:
    body = (key + "\0").encode("utf-16-le")
    body += bytes(-(6 + len(body)) % 4)
    body += (value + "\0").encode("utf-16-le")
    return struct.pack("<HHH", 6 + len(body), len(value) + 1, 1) + body


def test_version_strings_are_read_from_the_stub():
    blob = bytes(8) + string_entry("CompanyName", "Acme, Inc") + bytes(2) + string_entry("ProductVersion", "2.0.7") + bytes(4)
    got = exe.version_strings(blob, len(blob))
    assert got == {"CompanyName": "Acme, Inc", "ProductVersion": "2.0.7"}
    assert exe.version_strings(blob, 20) == {}  # past `end`: not looked at


@pytest.mark.parametrize("cut", [100, 0x300, 0x420, -10])
def test_truncated_input_names_the_file(cut):
    data = fake_installer(["Example", "$INSTDIR"] * 50)
    with pytest.raises(FormatError, match="setup.exe") as err:
        nsis.locate(data[:cut], "setup.exe")
    assert "truncated" in err.value.message or "not a PE" in err.value.message


def test_not_a_pe_and_not_nsis():
    with pytest.raises(FormatError, match=r"x\.exe is not a PE"):
        nsis.locate(b"PK\x03\x04" + bytes(100), "x.exe")
    plain = fake_installer([])[:0x400]
    with pytest.raises(FormatError, match="not an NSIS installer"):
        nsis.locate(plain, "plain.exe")


def test_damaged_header_is_a_format_error_inside_not_a_crash():
    data = bytearray(fake_installer(["Example", "$INSTDIR"] * 50))
    data[0x400 + 28 + 4 + 10] ^= 0xFF
    inst = nsis.locate(bytes(data), "setup.exe")
    with pytest.raises(FormatError, match="setup.exe"):
        nsis.script_strings(bytes(data), inst, "setup.exe")


# --- the makensis wrapper -------------------------------------------------------------------

def test_makensis_command_line(tmp_path):
    from builder.tools import nsis

    assert nsis.makensis_args(tmp_path / "installer.nsi") == ["-WX", "-V2", "-NOCD", "-INPUTCHARSET", "UTF8", "installer.nsi"]


def test_makensis_failures_name_their_cause():
    from builder.errors import SigningError, ToolFailedError
    from builder.tools import nsis

    wrong = "Failed to parse PKCS#12 file: k.p12 (Wrong password?)\nFailed\nUninstFinalize command returned 65280, aborting\nError - aborting creation process\n"
    err = nsis._failure(wrong)
    assert isinstance(err, SigningError) and "wrong password" in err.message
    other = nsis._failure("Failed to read key or certificates\nUninstFinalize command returned 256, aborting\n")
    assert isinstance(other, SigningError) and "Failed to read key or certificates" in other.message
    warn = nsis._failure('warning 6000: unknown variable/constant "X" detected, ignoring (installer.nsi:12)\nError: warning treated as error\n')
    assert isinstance(warn, ToolFailedError) and "unknown variable/constant" in warn.message


def test_names_too_long_for_an_nsis_string_are_refused():
    from builder.errors import ConfigError

    long_folder = "/".join(["Very Long Vendor Folder Name"] * 12)
    product = load_product(overrides={"install_folder": long_folder, "registry_key": "SOFTWARE\\" + "\\".join(["Key Part"] * 20)})
    with pytest.raises(ConfigError, match="1023"):
        exe.render_script(product, "1.0.0", ["agent.exe", "trust.json"])
    exe.check_string_lengths(load_product())  # the defaults fit

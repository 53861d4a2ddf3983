"""The macOS .dmg, read back with readers this project did not write.

dmg2img unpacks a real built (signed) image to exactly the HFS+ disk xorriso made; 7-Zip lists
the image's partitions and, inside the HFS+ one, the pkg; ds_store reads the Finder layout. The
stamp stage's path is run end to end: a signed release pkg with a group's sidecar enrollment on
the image, and the pkg's postinstall (taken out with 7z, bsdtar and cpio) run from there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from builder.config import load_product
from builder.errors import ConfigError, FormatError, ToolMissingError
from builder.formats import dmg as dmgformat
from builder.formats import macos_postinstall
from builder.signing.signers import Signers
from builder.formats.dmg import DmgFormat, make_dmg
from tests.integration.test_pkg import (  # noqa: F401 (fixtures)
    CONFIG,
    EPOCH,
    HOSTILE,
    SIGNED,
    config_of,
    PRODUCT,
    install_like_installer,
    mac_payload,
    mac_signers,
    release_pkg,
    request,
    run,
    run_postinstall,
    sha,
    under,
)


def build_dmg(payload, work, enrollment, signers, **kw) -> Path:
    return DmgFormat().build(request(payload, work, enrollment, signers, **kw)).path


@pytest.fixture(scope="module")
def signed_dmg(mac_payload, mac_signers, tmp_path_factory) -> Path:
    return build_dmg(mac_payload, tmp_path_factory.mktemp("dmg-baked"), SIGNED[0], mac_signers)


def hfs_listing(dmg: Path, tmp: Path) -> tuple[Path, str]:
    """7-Zip alone: the image's HFS+ partition, then what that volume holds."""
    parts = tmp / "parts"
    run(["7z", "x", "-y", f"-o{parts}", dmg, "*.hfs"])
    (hfs,) = parts.glob("*.hfs")
    return hfs, run(["7z", "l", hfs]).stdout.decode()


def test_7z_lists_the_pkg_inside_the_image(signed_dmg, tmp_path):
    partitions = run(["7z", "l", signed_dmg]).stdout.decode()
    assert "Type = Dmg" in partitions and ".hfs" in partitions
    hfs, listing = hfs_listing(signed_dmg, tmp_path)
    volume = PRODUCT.name
    for name in (f"{volume}/{PRODUCT.name}.pkg", f"{volume}/README.txt", f"{volume}/.DS_Store"):
        assert name in listing
    out = tmp_path / "volume"
    run(["7z", "x", "-y", f"-o{out}", hfs])
    pkg = out / volume / f"{PRODUCT.name}.pkg"
    listed = run(["7z", "l", pkg]).stdout.decode()
    assert "agent.pkg/Payload" in listed and "agent.pkg/Scripts" in listed


def test_dmg2img_gives_back_the_hfs_image(release_pkg, mac_signers, tmp_path):
    out, raw = tmp_path / "agent.dmg", tmp_path / "xorriso.img"
    make_dmg(release_pkg, out, PRODUCT, EPOCH, key=mac_signers.apple_application, keep_raw=raw)
    unpacked = tmp_path / "dmg2img.img"
    run(["dmg2img", out, unpacked])
    assert raw.stat().st_size == unpacked.stat().st_size
    assert sha(raw.read_bytes()) == sha(unpacked.read_bytes())


def test_finder_layout_read_with_ds_store(signed_dmg, tmp_path):
    from ds_store import DSStore

    hfs, _ = hfs_listing(signed_dmg, tmp_path)
    out = tmp_path / "volume"
    run(["7z", "x", "-y", f"-o{out}", hfs])
    settings = dmgformat.load_settings({"volume_name": "v", "pkg": "p", "pkg_name": f"{PRODUCT.name}.pkg",
                                        "readme": "r", "sidecar": "", "sidecar_name": "s"})
    with DSStore.open(str(out / PRODUCT.name / ".DS_Store"), "r") as store:
        assert store[f"{PRODUCT.name}.pkg"]["Iloc"] == settings["icon_locations"][f"{PRODUCT.name}.pkg"]
        assert store["README.txt"]["Iloc"] == settings["icon_locations"]["README.txt"]
        (left, top), (width, height) = settings["window_rect"]
        assert store["."]["bwsp"]["WindowBounds"] == f"{{{{{left}, {top}}}, {{{width}, {height}}}}}"
        icvp = store["."]["icvp"]
        assert icvp["iconSize"] == float(settings["icon_size"]) and icvp["backgroundType"] == 1
        assert store["."]["icvl"] == (b"type", b"icnv")  # icon view
        assert (icvp["backgroundColorRed"], icvp["backgroundColorGreen"], icvp["backgroundColorBlue"]) == (1.0, 1.0, 1.0)


def test_verify_reports_signatures_and_masked_enrollment(signed_dmg, dev_keys):
    report = DmgFormat().verify(signed_dmg, dev_keys.ca_cert)
    leaked = HOSTILE[0].token.reveal() in json.dumps(report)  # not `assert ... not in`: pytest would print it
    assert not leaked
    assert report["ok"], report["detail"]
    assert report["signature"]["ok"] and report["signature"]["signer"].startswith("Developer ID Application")
    assert report["pkg_signature"]["ok"] and report["pkg_signature"]["signer"].startswith("Developer ID Installer")
    assert report["volume_name"] == PRODUCT.name
    assert report["enrollment"] == {"state": "valid", **SIGNED[0].public()}
    assert DmgFormat().inspect(signed_dmg)["signature"] is None


def test_tampered_image_fails(signed_dmg, dev_keys, tmp_path):
    data = bytearray(signed_dmg.read_bytes())
    data[100] ^= 0xFF  # inside the data fork: a chunk checksum, then the signature, break
    bad = tmp_path / "bad.dmg"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError) as info:
        DmgFormat().verify(bad, dev_keys.ca_cert)
    assert str(bad) in str(info.value)


def test_release_dmg_with_a_group_sidecar_installs_that_group(release_pkg, mac_signers, dev_keys, tmp_path):
    """The stamp stage's path: the release's signed pkg, a group's enrollment beside it."""
    group = SIGNED[0]
    dmg = tmp_path / "group.dmg"
    make_dmg(release_pkg, dmg, PRODUCT, EPOCH, key=mac_signers.apple_application, sidecar=group.jws.reveal().encode())
    report = DmgFormat().verify(dmg, dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["enrollment"] == {"state": "valid", **group.public()}
    assert report["enrollment_source"].startswith("sidecar")
    # Installed from the volume as 7-Zip sees it: $1 is the pkg there, the sidecar beside it.
    hfs, listing = hfs_listing(dmg, tmp_path)
    sidecar = macos_postinstall.sidecar_name(PRODUCT)
    assert f"{PRODUCT.name}/{sidecar}" in listing
    root = tmp_path / "root"
    volumes = root / "Volumes"
    run(["7z", "x", "-y", f"-o{volumes}", hfs])
    pkg = volumes / PRODUCT.name / f"{PRODUCT.name}.pkg"
    assert sha(pkg.read_bytes()) == sha(release_pkg.read_bytes())
    script = install_like_installer(pkg, root, tmp_path / "x")
    run_postinstall(script, root, pkg)
    got, want = sha(under(root, CONFIG).read_bytes()), sha(config_of(group))
    assert got == want


def test_broken_sidecar_is_refused(release_pkg, tmp_path):
    from builder.errors import EnrollmentError

    with pytest.raises(EnrollmentError):
        make_dmg(release_pkg, tmp_path / "x.dmg", PRODUCT, EPOCH, key=None, sidecar=b"{not json")
    with pytest.raises(EnrollmentError):  # the attacker's trailing newline
        make_dmg(release_pkg, tmp_path / "y.dmg", PRODUCT, EPOCH, key=None, sidecar=SIGNED[0].jws.reveal().encode() + b"\n")
    assert not (tmp_path / "x.dmg").exists() and not (tmp_path / "y.dmg").exists()


def test_verify_of_a_dmg_with_a_forged_sidecar_fails(release_pkg, mac_signers, dev_keys, tmp_path):
    from tests.integration.test_pkg import attacks

    dmg = tmp_path / "forged.dmg"
    make_dmg(release_pkg, dmg, PRODUCT, EPOCH, key=mac_signers.apple_application,
             sidecar=attacks()["unpinned-key"])
    report = DmgFormat().verify(dmg, dev_keys.ca_cert)
    assert not report["ok"] and report["enrollment"]["state"] == "invalid" and "not pinned" in report["detail"]


def test_unsigned_builds_are_byte_identical(mac_payload, tmp_path):
    a = build_dmg(mac_payload, tmp_path / "a", SIGNED[1], Signers(unsigned=True))
    b = build_dmg(mac_payload, tmp_path / "b", SIGNED[1], Signers(unsigned=True))
    assert sha(a.read_bytes()) == sha(b.read_bytes())


def test_image_step_is_deterministic_when_signed(release_pkg, mac_signers, tmp_path):
    """Same signed pkg in, same signed dmg out (apple-platform honours the DMG's signing time)."""
    a, b = tmp_path / "a.dmg", tmp_path / "b.dmg"
    make_dmg(release_pkg, a, PRODUCT, EPOCH, key=mac_signers.apple_application)
    time.sleep(1.1)
    make_dmg(release_pkg, b, PRODUCT, EPOCH, key=mac_signers.apple_application)
    assert sha(a.read_bytes()) == sha(b.read_bytes())


def test_volume_name_is_cut_to_32_bytes(mac_payload, tmp_path):
    product = load_product(overrides={"name": "Example Remote Access Agent For Large Fleets"})
    path = build_dmg(mac_payload, tmp_path / "w", None, Signers(unsigned=True), product=product)
    report = DmgFormat().inspect(path)
    assert report["volume_name"] == "Example Remote Access Agent For L"[:32].rstrip()
    assert report["pkg"] == f"{product.name}.pkg"


def test_truncated_and_foreign_files_are_format_errors(signed_dmg, tmp_path):
    cut = tmp_path / "cut.dmg"
    cut.write_bytes(signed_dmg.read_bytes()[: signed_dmg.stat().st_size // 2])
    with pytest.raises(FormatError) as info:
        DmgFormat().inspect(cut)
    assert str(cut) in str(info.value)
    foreign = tmp_path / "foreign.dmg"
    foreign.write_bytes(bytes(4096))
    with pytest.raises(FormatError) as info:
        DmgFormat().inspect(foreign)
    assert str(foreign) in str(info.value)


def test_missing_xorriso_is_a_tool_missing_error(mac_payload, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ToolMissingError, match="xorriso"):
        build_dmg(mac_payload, tmp_path / "w", None, Signers(unsigned=True))


def test_linux_writer_refuses_settings_it_cannot_honour(tmp_path, monkeypatch):
    settings = tmp_path / "settings.py"
    text = dmgformat.SETTINGS_FILE.read_text() + '\nsymlinks = {"Applications": "/Applications"}\n'
    settings.write_text(text)
    loaded = dmgformat.load_settings({"volume_name": "v", "pkg": "p", "pkg_name": "n.pkg", "readme": "r",
                                      "sidecar": "", "sidecar_name": "s"}, settings)
    with pytest.raises(ConfigError, match="symlinks"):
        dmgformat._check_linux_settings(loaded, settings)



def test_signed_builds_are_byte_identical(mac_payload, mac_signers, dev_keys, tmp_path):
    """Same inputs and SOURCE_DATE_EPOCH, same signed dmg, the signed pkg inside it included."""
    a = build_dmg(mac_payload, tmp_path / "a", SIGNED[1], mac_signers)
    time.sleep(1.1)  # a different second, so a wall-clock time anywhere would show
    b = build_dmg(mac_payload, tmp_path / "b", SIGNED[1], mac_signers)
    assert sha(a.read_bytes()) == sha(b.read_bytes())
    report = DmgFormat().verify(a, dev_keys.ca_cert)
    assert report["ok"] and report["pkg_signature"]["ok"], report["detail"]

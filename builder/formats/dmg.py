"""The macOS disk image: the signed pkg, a README and a Finder window layout, as a signed UDZO .dmg.

Content and layout come from one dmgbuild settings file, templates/dmg/settings.py:
- on a macOS host, dmgbuild builds the image from it (hdiutil). That path is written but has
  never run here: it needs macOS.
- on Linux, the settings are executed the way dmgbuild does it, the files it lists are copied
  into a folder with a .DS_Store written from its window settings (ds_store package), xorriso
  makes an HFS+ image of the folder (builder.tools.xorriso) and builder.binfmt.udif wraps it as
  UDZO (zlib).
Then the image is signed with the Developer ID Application identity and, when credentials are
given, notarized. The volume name is the product name (cut to the 32 bytes ISO 9660 allows).

`make_dmg` is the image step alone (a signed pkg in, a signed dmg out, optionally with a group's
sidecar enrollment beside the pkg): what the stamp stage reuses.

Reading back (verify, inspect): the UDIF reader unpacks the raw disk, checking every checksum;
the Apple_HFS partition is cut out of it and extracted with `7z x -tHFS` (an independent HFS+
reader; the ISO 9660 side of the hybrid is ignored); the pkg found there is read like any pkg,
and a sidecar, if present, gives the enrollment.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

from builder import log
from builder.binfmt import udif
from builder.config import TEMPLATES_DIR, Product
from builder.trust import SignedEnrollment, describe
from builder.errors import ConfigError, EnrollmentError, FormatError, UsageError
from builder.formats import macos_postinstall, pkg_archive
from builder.formats import pkg as pkgformat
from builder.fileio import iter_range
from builder.formats.base import BuildRequest, Built
from builder.signing.signers import AppleKey
from builder.tools import runner, xorriso

SETTINGS_FILE = TEMPLATES_DIR / "dmg" / "settings.py"
UNSIGNED_NAME = "agent.unsigned.dmg"
SIGNED_NAME = "agent.dmg"
README_NAME = "README.txt"
UDIF_LEVEL = udif.DEFAULT_LEVEL
README_TEXT = """{name}

To install, open "{pkg_name}" on this disk image and follow the installer. It installs the
agent into /Library/Application Support/{install_folder} and starts it as a system service.

Run the installer from this disk image: it may read its enrollment from a file stored beside it
here.
"""

# dmgbuild's defaults for the settings the Linux writer implements (dmgbuild/core.py).
_DEFAULTS = {
    "format": "UDBZ",
    "filesystem": "HFS+",
    "files": [],
    "symlinks": {},
    "hide": [],
    "hide_extensions": [],
    "icon": None,
    "badge_icon": None,
    "background": None,
    "license": None,
    "show_status_bar": False,
    "show_tab_view": False,
    "show_toolbar": False,
    "show_pathbar": False,
    "show_sidebar": False,
    "sidebar_width": 180,
    "arrange_by": None,
    "grid_offset": (0, 0),
    "grid_spacing": 100.0,
    "scroll_position": (0.0, 0.0),
    "show_icon_preview": False,
    "show_item_info": False,
    "label_pos": "bottom",
    "text_size": 16.0,
    "icon_size": 128.0,
    "window_rect": ((100, 100), (640, 280)),
    "default_view": "icon-view",
    "icon_locations": {},
}
_UNSUPPORTED = ("symlinks", "hide", "hide_extensions", "icon", "badge_icon", "license")
_COLOUR = re.compile(r"^#([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})([0-9A-Fa-f]{2})$")


def volume_name(product: Product) -> str:
    return xorriso.check_volume_name(product.name.encode()[: xorriso.VOLUME_NAME_MAX].decode("ascii", "ignore").rstrip())


def pkg_name(product: Product) -> str:
    return f"{product.name}.pkg"


# ---------------------------------------------------------------------------------------------
# Settings and the Finder layout


def load_settings(defines: dict, settings_file: Path = SETTINGS_FILE) -> dict:
    """The settings file executed as dmgbuild executes it: its globals, over dmgbuild's defaults."""
    settings = {**_DEFAULTS, "defines": defines}
    try:
        source = Path(settings_file).read_text(encoding="utf-8")
        exec(compile(source, str(settings_file), "exec"), settings, settings)  # noqa: S102 - our own template
    except OSError as exc:
        raise ConfigError(f"{settings_file}: cannot read it ({exc.strerror})", "restore templates/dmg/settings.py") from None
    except (SyntaxError, KeyError, NameError, TypeError) as exc:
        raise ConfigError(f"{settings_file}: {type(exc).__name__}: {exc}", "fix the DMG settings file") from None
    return settings


def _check_linux_settings(settings: dict, settings_file: Path) -> None:
    problems = [key for key in _UNSUPPORTED if settings.get(key)]
    if settings["format"] != "UDZO":
        problems.append(f"format {settings['format']!r} (only UDZO)")
    if settings["filesystem"] != "HFS+":
        problems.append(f"filesystem {settings['filesystem']!r} (only HFS+)")
    if settings["default_view"] != "icon-view":
        problems.append(f"default_view {settings['default_view']!r} (only icon-view)")
    background = settings["background"]
    if background is not None and not (isinstance(background, str) and _COLOUR.fullmatch(background)):
        problems.append(f"background {background!r} (only a #rrggbb colour or None)")
    if problems:
        raise ConfigError(f"{settings_file}: not supported by the Linux DMG writer: {', '.join(map(str, problems))}",
                          "remove it, or build the DMG on macOS with dmgbuild")


def write_ds_store(settings: dict, path: Path) -> None:
    """The .DS_Store dmgbuild writes for an icon view (dmgbuild/core.py, same records and keys)."""
    from ds_store import DSStore

    (left, top), (width, height) = settings["window_rect"]
    bwsp = {
        "ShowStatusBar": bool(settings["show_status_bar"]),
        "WindowBounds": f"{{{{{left}, {top}}}, {{{width}, {height}}}}}",
        "ContainerShowSidebar": False,
        "PreviewPaneVisibility": False,
        "SidebarWidth": settings["sidebar_width"],
        "ShowTabView": bool(settings["show_tab_view"]),
        "ShowToolbar": bool(settings["show_toolbar"]),
        "ShowPathbar": bool(settings["show_pathbar"]),
        "ShowSidebar": bool(settings["show_sidebar"]),
    }
    icvp = {
        "viewOptionsVersion": 1,
        "backgroundType": 0,
        "backgroundColorRed": 1.0,
        "backgroundColorGreen": 1.0,
        "backgroundColorBlue": 1.0,
        "gridOffsetX": float(settings["grid_offset"][0]),
        "gridOffsetY": float(settings["grid_offset"][1]),
        "gridSpacing": float(settings["grid_spacing"]),
        "arrangeBy": "none" if settings["arrange_by"] is None else str(settings["arrange_by"]),
        "showIconPreview": bool(settings["show_icon_preview"]),
        "showItemInfo": bool(settings["show_item_info"]),
        "labelOnBottom": settings["label_pos"] == "bottom",
        "textSize": float(settings["text_size"]),
        "iconSize": float(settings["icon_size"]),
        "scrollPositionX": float(settings["scroll_position"][0]),
        "scrollPositionY": float(settings["scroll_position"][1]),
    }
    colour = _COLOUR.fullmatch(settings["background"] or "")
    if colour:
        icvp["backgroundType"] = 1
        icvp["backgroundColorRed"], icvp["backgroundColorGreen"], icvp["backgroundColorBlue"] = (
            int(c, 16) / 255.0 for c in colour.groups())
    path.unlink(missing_ok=True)
    with DSStore.open(str(path), "w+") as store:
        store["."]["vSrn"] = ("long", 1)
        store["."]["bwsp"] = bwsp
        store["."]["icvp"] = icvp
        store["."]["icvl"] = (b"type", b"icnv")
        for name, (x, y) in settings["icon_locations"].items():
            store[name]["Iloc"] = (int(x), int(y))


# ---------------------------------------------------------------------------------------------
# Building


def _raw_image_linux(settings: dict, stage: Path, raw: Path, epoch: int) -> None:
    _check_linux_settings(settings, SETTINGS_FILE)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(mode=0o755)
    names = set()
    for entry in settings["files"]:
        src, name = (entry if isinstance(entry, tuple) else (entry, os.path.basename(str(entry).rstrip("/"))))
        if "/" in name or name in names:
            raise ConfigError(f"{SETTINGS_FILE}: file name {name!r} is a path or given twice", "give plain, distinct names")
        names.add(name)
        target = stage / name
        try:
            os.link(src, target)  # a 30 MB pkg need not be copied: xorriso only reads it
        except OSError:
            shutil.copyfile(src, target)
    for name in settings["icon_locations"]:
        if name not in names:
            raise ConfigError(f"{SETTINGS_FILE}: icon_locations names {name!r}, which is not in files", "fix the DMG settings file")
    write_ds_store(settings, stage / ".DS_Store")
    xorriso.hfsplus_image(stage, raw, settings["volume_name"], epoch)


def make_dmg(pkg: Path, out: Path, product: Product, epoch: int, *, key: AppleKey | None,
             sidecar: bytes | None = None, work: Path | None = None, keep_raw: Path | None = None) -> dict:
    """A disk image of the signed `pkg` (+ README, + a sidecar enrollment when given), signed
    with `key` (None: unsigned), at `out`. Returns details for the build summary.
    `keep_raw`: where to keep the raw HFS+ disk the image holds (Linux path; for tests)."""
    if sidecar is not None and not re.fullmatch(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", sidecar):
        # The postinstall would refuse it on the customer's Mac: refuse it here.
        raise EnrollmentError("the sidecar enrollment is not a signed enrollment (JWS)", "stamp it with `builder stamp`")
    with tempfile.TemporaryDirectory(prefix="builder-dmg-", dir=work) as tmp:
        tmp_path = Path(tmp)
        readme = tmp_path / README_NAME
        readme.write_text(README_TEXT.format(name=product.name, pkg_name=pkg_name(product),
                                             install_folder=product.install_folder), encoding="utf-8")
        sidecar_file = ""
        if sidecar is not None:
            sidecar_file = str(tmp_path / "sidecar.jws")
            Path(sidecar_file).write_bytes(sidecar)
        defines = {"volume_name": volume_name(product), "pkg": str(pkg), "pkg_name": pkg_name(product),
                   "readme": str(readme), "sidecar": sidecar_file, "sidecar_name": macos_postinstall.sidecar_name(product)}
        unsigned = out.with_name(f".{out.stem}.unsigned.dmg")  # hdiutil appends .dmg to any other name
        written = None
        try:
            if platform.system() == "Darwin":  # pragma: no cover - not run on the Linux build machines
                import dmgbuild

                with log.step("dmg: dmgbuild (hdiutil)"):
                    dmgbuild.build_dmg(str(unsigned), defines["volume_name"], settings_file=str(SETTINGS_FILE),
                                       defines=defines)
            else:
                settings = load_settings(defines)
                raw = tmp_path / "image.hfs"
                with log.step("dmg: HFS+ image (xorriso)"):
                    _raw_image_linux(settings, tmp_path / "volume", raw, epoch)
                with log.step("dmg: UDIF (zlib)"):
                    written = udif.write(raw, unsigned, level=UDIF_LEVEL)
                if keep_raw is not None:
                    shutil.move(raw, keep_raw)
            if key is None:
                os.replace(unsigned, out)
            else:
                from builder.signing import apple

                # A fixed identifier: codesign's default, the file name, would differ per output name.
                apple.sign_dmg(key, unsigned, out, signing_time=apple.signing_time(epoch, key),
                               identifier=f"{product.bundle_id}.dmg")
        finally:
            unsigned.unlink(missing_ok=True)
    details = {"volume_name": defines["volume_name"], "pkg_name": defines["pkg_name"],
               "sidecar": sidecar is not None}
    if written is not None:
        details["raw_bytes"] = written.raw_size
    return details


def _subject(key: AppleKey | None) -> str | None:
    if key is None:
        return None
    from builder.signing import apple  # loads apple-platform's native library: only when signing

    return apple.identity_subject(key)


class DmgFormat:
    name = "dmg"
    platform = "macos"
    suffix = ".dmg"
    signed_with = ("apple_application", "apple_installer")  # the image, and the pkg inside  # Signers fields a signed build needs

    def build(self, request: BuildRequest) -> Built:
        signers = request.signers
        if not signers.unsigned and signers.apple_application is None:
            raise UsageError("the DMG needs a Developer ID Application identity to sign the disk image",
                             "give --mac-sign-pkcs12 with a 'Developer ID Application' .p12, or --no-sign")
        pkg_request = BuildRequest(product=request.product, version=request.version, payload=request.payload,
                                   enrollment=request.enrollment, trust=request.trust, work=request.work / "pkg",
                                   source_date_epoch=request.source_date_epoch, signers=signers)
        pkg_request.work.mkdir(mode=0o700, exist_ok=True)
        pkg_path, pkg_signer, pkg_details = pkgformat.PkgFormat().build_signed(pkg_request, label="dmg: its pkg")
        final = request.work / SIGNED_NAME
        final.unlink(missing_ok=True)
        key = None if signers.unsigned else signers.apple_application
        try:
            details = make_dmg(pkg_path, final, request.product, request.source_date_epoch, key=key, work=request.work)
        finally:
            pkg_path.unlink(missing_ok=True)
        # One notarization for the image: Apple's service also notarizes the pkg inside it.
        notarization = pkgformat.notarize(final, signers)
        signer = _subject(key)
        return Built(path=final, signer=signer, notarized=notarization["notarized"],
                     details={**details, "pkg_signer": pkg_signer, "agent": pkg_details["agent"],
                              "notarization": notarization})

    def release_entry(self, path: Path, product, *, signed: bool) -> dict:
        return {}  # a stamp re-bakes the pkg: no slot to record

    def stamp(self, release, enrollment: SignedEnrollment, signers, out: Path) -> Built:
        """A group's dmg: the release's signed pkg, unchanged, plus the group's enrollment
        beside it, which the pkg's postinstall reads through $1."""
        base, product = release.file("pkg"), release.product()
        key = None if signers.unsigned else signers.apple_application
        if key is None and not signers.unsigned:
            raise UsageError("a group's dmg is signed: give a Developer ID Application identity", "--mac-sign-pkcs12 FILE")
        make_dmg(base.path, out, product, release.manifest["source_date_epoch"], key=key,
                 sidecar=enrollment.jws.reveal().encode("ascii"), work=out.parent)
        notarization = pkgformat.notarize(out, signers)
        return Built(path=out, signer=_subject(key),
                     notarized=notarization["notarized"], details={"notarization": notarization})

    def verify(self, path: Path, ca: Path | None) -> dict:
        return self._read(Path(path), ca, check_signatures=True)

    def inspect(self, path: Path) -> dict:
        return self._read(Path(path), None, check_signatures=False)

    def _read(self, path: Path, ca: Path | None, *, check_signatures: bool) -> dict:
        if not path.is_file():
            raise FormatError(f"{path}: no such file", "check the path")
        with tempfile.TemporaryDirectory(prefix="builder-dmg-read-") as tmp:
            volume = Path(tmp) / "volume"
            name = extract_volume(path, Path(tmp), volume)
            pkgs = sorted(p for p in volume.iterdir() if p.suffix == ".pkg" and p.is_file())
            problems = []
            if len(pkgs) != 1:
                raise FormatError(f"{path}: the volume holds {len(pkgs)} .pkg files, expected one", "give a DMG made by builder")
            pkg = pkgs[0]
            contents = pkg_archive.read_pkg(pkg, f"{path}:{pkg.name}")
            problems += [f"{pkg.name}: {p}" for p in contents.problems]
            for required in (README_NAME, ".DS_Store"):
                if not (volume / required).is_file():
                    problems.append(f"{required} is missing from the volume")
            # What the pkg's postinstall would take: its baked enrollment, else the sidecar.
            jws, source = contents.enrollment, "baked into the pkg's postinstall"
            sidecar = volume / macos_postinstall.sidecar_name_from_pkg(contents)
            if sidecar.is_file():
                if jws is None:
                    jws, source = sidecar.read_bytes().decode("ascii", "replace"), f"sidecar {sidecar.name} beside the pkg"
                else:
                    problems.append(f"{sidecar.name} is ignored: the pkg has a baked enrollment, which wins")
            elif jws is None:
                source = "none (a release: the stamp stage adds a sidecar enrollment)"
            enrollment = None
            if jws is not None:
                enrollment, problem = describe(jws, contents.trust, int(time.time()))
                if problem:
                    problems.append(problem)
            report = {
                "format": self.name,
                "path": str(path),
                "ok": not problems,
                "detail": "; ".join(problems) or "structure ok",
                "volume_name": name,
                "pkg": pkg.name,
                "identifier": contents.identifier,
                "version": contents.version,
                "enrollment": enrollment,
                "enrollment_source": source,
                "signature": None,
                "pkg_signature": None,
            }
            if check_signatures:
                from builder.signing import apple

                signature = apple.verify_dmg(path, ca)
                pkg_signature = apple.verify_flat_package(pkg, ca)
                report["signature"], report["pkg_signature"] = signature, pkg_signature
                report.update(apple.notarization_report(path))
                failed = [f"{what}: {sig.get('detail')}" for what, sig in (("signature", signature), ("pkg signature", pkg_signature))
                          if not sig.get("ok")]
                if failed:
                    report["ok"] = False
                    report["detail"] = "; ".join(failed + problems)
        return report


def extract_volume(path: Path, tmp: Path, volume: Path) -> str:
    """Unpack the UDIF image (checksums checked), cut out its Apple_HFS partition and extract
    it with `7z x -tHFS` into `volume`; returns the volume name."""
    raw = tmp / "disk.raw"
    try:
        udif.extract(path, raw)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc.message}", exc.hint or "give a .dmg built by builder") from None
    hfs = tmp / "volume.hfs"
    with open(raw, "rb") as disk:
        size = disk.seek(0, os.SEEK_END)

        def read_at(offset: int, length: int) -> bytes:
            disk.seek(offset)
            return disk.read(length)

        try:
            regions = udif.partition_layout(read_at, size)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc.message}", "give a .dmg built by builder") from None
        found = [r for r in regions if "(Apple_HFS :" in r.name]
        if len(found) != 1:
            raise FormatError(f"{path}: the disk has {len(found)} Apple_HFS partitions, expected one", "give a .dmg built by builder")
        region = found[0]
        with open(hfs, "wb") as out:
            for chunk in iter_range(disk, region.first_sector * udif.SECTOR, region.sector_count * udif.SECTOR,
                                    too_short=f"{path}: the HFS+ partition runs past the end of the disk"):
                out.write(chunk)
    raw.unlink()
    extracted = tmp / "hfs"
    runner.run("7z", ["x", "-tHFS", "-y", "-bd", f"-o{extracted}", hfs])
    tops = [p for p in extracted.iterdir()] if extracted.is_dir() else []
    if len(tops) != 1 or not tops[0].is_dir():
        raise FormatError(f"{path}: the HFS+ volume did not extract as one folder", "give a .dmg built by builder")
    tops[0].rename(volume)
    return tops[0].name

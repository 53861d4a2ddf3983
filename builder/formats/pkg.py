"""The macOS flat package: a product archive as `productbuild` makes it, written on Linux.

    Distribution                 templates/macos/distribution.dist.j2
    agent.pkg/Bom                builder.binfmt.bom, from the same tree scan as the Payload
    agent.pkg/Payload            gzip odc cpio: the agent folder and the LaunchDaemon plist
    agent.pkg/Scripts            gzip odc cpio: ./postinstall (templates/macos/postinstall.sh.j2)
    agent.pkg/PackageInfo        templates/macos/packageinfo.xml.j2

Steps: stage the payload under its install path (work/root), sign the agent's code there with
the Developer ID Application identity, write the members, the xar (builder.binfmt.xar), sign
it with the Developer ID Installer identity, notarize when credentials are given. Ownership
root:wheel and every time SOURCE_DATE_EPOCH, signing times included: the same inputs give the
same unsigned pkg, byte for byte. The signed pkg differs between runs only in its CMS
<x-signature>: apple-platform-py ignores the signing time given for flat packages and writes
the clock's (it honours it for the agent's code signature and for DMGs).

For the stamp stage, `pkg_archive.rebake` turns a release pkg into a group's (unsigned) pkg
by replacing Scripts only; `sign_pkg` signs it.
"""

from __future__ import annotations

import os
import time
import shutil
from pathlib import Path

from builder import log
from builder.binfmt import xar
from builder.binfmt.bom import build_bom_entries
from builder.errors import FormatError, UsageError
from builder.fileio import atomic_output
from builder.formats import macos_payload, macos_postinstall, pkg_archive
from builder.formats.base import BuildRequest, Built
from builder.signing.signers import AppleKey
from builder.trust import SignedEnrollment, describe

UNSIGNED_NAME = "agent.unsigned.pkg"
SIGNED_NAME = "agent.pkg"
ROOT_NAME = "root"


def _apple():
    from builder.signing import apple  # loads apple-platform's native library: only when signing

    return apple


def require_keys(request: BuildRequest, payload: macos_payload.MacPayload | None, what: str) -> tuple[AppleKey | None, AppleKey | None]:
    """(application key, installer key) for a signed build, or UsageError naming what is missing."""
    signers = request.signers
    if signers.unsigned:
        return None, None
    if signers.apple_installer is None:
        raise UsageError(f"the {what} needs a Developer ID Installer identity to sign the pkg",
                         "give --mac-sign-pkcs12 with a 'Developer ID Installer' .p12, or --no-sign")
    if signers.apple_application is None and (payload is None or payload.code):
        need = "the DMG" if payload is None else f"the agent's code ({', '.join(payload.code)})"
        raise UsageError(f"{need} needs a Developer ID Application identity",
                         "give --mac-sign-pkcs12 with a 'Developer ID Application' .p12, or --no-sign")
    return signers.apple_application, signers.apple_installer


def build_unsigned(request: BuildRequest, payload: macos_payload.MacPayload, out: Path, app_key: AppleKey | None,
                   label: str = "pkg") -> dict:
    """Everything up to the pkg signature: stage, sign the code, write the members and the xar.
    `label` starts each progress line (the DMG's own pkg says so)."""
    product, epoch, enrollment = request.product, request.source_date_epoch, request.enrollment
    if enrollment is not None:
        log.register_secret(enrollment.token.reveal())
    work = request.work
    root = work / ROOT_NAME
    payload_file = work / "Payload"
    try:
        with log.step(f"{label}: stage the payload"):
            layout = macos_payload.stage_root(payload, product, root)
        if app_key is not None and payload.code:
            apple = _apple()
            when = apple.signing_time(epoch, app_key)
            for rel in payload.code:
                apple.sign_code(app_key, root / layout.install_dir.lstrip("/") / rel, signing_time=when)
        with log.step(f"{label}: Payload and Bom"):
            entries = macos_payload.payload_entries(root, epoch)
            stats = pkg_archive.write_payload(entries, payload_file)
            bom = build_bom_entries(entries)
        script = macos_postinstall.render_postinstall(product, request.trust, enrollment)
        scripts = macos_postinstall.scripts_archive(script, epoch)
        members = {
            pkg_archive.DISTRIBUTION: pkg_archive.render_distribution(product, request.version, stats).encode(),
            pkg_archive.BOM: bom,
            pkg_archive.PAYLOAD: payload_file,
            pkg_archive.SCRIPTS: scripts,
            pkg_archive.PACKAGE_INFO: pkg_archive.render_package_info(product, request.version, stats).encode(),
        }
        with log.step(f"{label}: xar"):
            with atomic_output(out) as fh:
                xar.write_xar(fh, [(m, members[m]) for m in pkg_archive.MEMBERS], epoch=epoch)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        payload_file.unlink(missing_ok=True)
    return {
        "agent": layout.agent_path,
        "payload_files": stats.number_of_files,
        "install_kbytes": stats.install_kbytes,
        "code_signed": list(payload.code) if app_key is not None else [],
    }


def sign_pkg(key: AppleKey, src: Path, dst: Path, epoch: int) -> None:
    """productsign `src` into `dst`, the CMS signing time fixed (see apple.signing_time)."""
    apple = _apple()
    apple.sign_flat_package(key, src, dst, signing_time=apple.signing_time(epoch, key))


def notarize(path: Path, signers) -> dict:
    """{"notarized", "stapled", "reason", "submission_id", "status"}: what the summary, --json and
    the manifest record. Without credentials apple.notarize says "not notarized" once per run."""
    if signers.unsigned:
        return {"notarized": False, "stapled": False, "reason": "unsigned build: not notarized",
                "submission_id": None, "status": None}
    return _apple().notarize(path, signers.notary).as_dict()


class PkgFormat:
    name = "pkg"
    platform = "macos"
    suffix = ".pkg"
    signed_with = ("apple_installer",)  # Signers fields a signed build needs

    def build(self, request: BuildRequest) -> Built:
        path, signer, details = self.build_signed(request)
        notarization = notarize(path, request.signers)
        return Built(path=path, signer=signer, notarized=notarization["notarized"],
                     details={**details, "notarization": notarization})

    def build_signed(self, request: BuildRequest, label: str = "pkg") -> tuple[Path, str | None, dict]:
        """The signed (not notarized) pkg in request.work: (path, signer, details). The DMG uses it."""
        payload = macos_payload.check_payload(request.payload_dir("macos"))
        app_key, installer_key = require_keys(request, payload, "pkg")
        unsigned = request.work / UNSIGNED_NAME
        final = request.work / SIGNED_NAME
        for stale in (unsigned, final):
            stale.unlink(missing_ok=True)
        details = build_unsigned(request, payload, unsigned, app_key, label)
        if installer_key is None:
            os.replace(unsigned, final)
            return final, None, details
        try:
            sign_pkg(installer_key, unsigned, final, request.source_date_epoch)
        finally:
            unsigned.unlink(missing_ok=True)
        return final, _apple().identity_subject(installer_key), details

    def release_entry(self, path: Path, product, *, signed: bool) -> dict:
        return {}  # a stamp re-bakes the pkg: no slot to record

    def stamp(self, release, enrollment: SignedEnrollment, signers, out: Path) -> Built:
        """A group's pkg from the release's: Scripts re-baked, then signed and notarized again."""
        base, product = release.file("pkg"), release.product()
        epoch = release.manifest["source_date_epoch"]
        key = None if signers.unsigned else signers.apple_installer
        if key is None and not signers.unsigned:
            raise UsageError("a group's pkg is signed again: give a Developer ID Installer identity", "--mac-sign-pkcs12 FILE")
        unsigned = out.with_name(f".{out.name}.unsigned")
        unsigned.write_bytes(pkg_archive.rebake(base.path, enrollment, product, epoch))
        try:
            if key is None:
                os.replace(unsigned, out)
            else:
                sign_pkg(key, unsigned, out, epoch)
        finally:
            unsigned.unlink(missing_ok=True)
        notarization = notarize(out, signers)
        return Built(path=out, signer=_apple().identity_subject(key) if key else None,
                     notarized=notarization["notarized"], details={"notarization": notarization})

    def verify(self, path: Path, ca: Path | None) -> dict:
        report = self.inspect(path)
        signature = _apple().verify_flat_package(Path(path), ca)
        report["signature"] = signature
        report.update(_apple().notarization_report(Path(path)))
        if not signature.get("ok"):
            report["ok"] = False
            report["detail"] = f"signature: {signature.get('detail')}" + ("" if report["detail"] == "structure ok" else f"; {report['detail']}")
        return report

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: no such file", "check the path")
        contents = pkg_archive.read_pkg(path, str(path))
        return contents_report(self.name, path, contents)


def contents_report(format_name: str, path: Path, contents: pkg_archive.PkgContents) -> dict:
    problems = list(contents.problems)
    enrollment = None
    if contents.enrollment is not None:
        enrollment, problem = describe(contents.enrollment, contents.trust, int(time.time()))
        if problem:
            problems.append(problem)
    return {
        "format": format_name,
        "path": str(path),
        "ok": not problems,
        "detail": "; ".join(problems) or "structure ok",
        "pins": contents.trust.as_dict() if contents.trust else None,
        "identifier": contents.identifier,
        "version": contents.version,
        "payload_files": contents.payload_entries,
        "enrollment": enrollment,
        "enrollment_source": ("baked into the postinstall" if enrollment
                              else "none baked in (a release reads the sidecar file beside the pkg at install time)"),
        "signature": None,
    }

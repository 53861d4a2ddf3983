"""The Windows EXE: an NSIS installer that gives the MSI's installed result.

Same folder under Program Files, same registry values, same config file written by the agent,
same auto-start service. Steps: stage the payload in the work folder (file times fixed to
SOURCE_DATE_EPOCH, as the MSI's), render templates/nsis/installer.nsi.j2 (0600: it holds the
token), makensis (which signs the uninstaller through !uninstfinalize), then Authenticode
signing of the installer through builder.signing.authenticode.

The enrollment is never in the script: every EXE reads its signed enrollment from the slot in
its own Authenticode signature (a release's is empty until `builder stamp`; `builder build`
stamps it right after signing). Before it touches an installed agent, the installer runs the
agent it carries, from its plugins folder beside the trust.json it carries, on its own file
(`verify-enrollment --installer`): a refused enrollment leaves the machine as it was.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from builder import render
from builder.binfmt.nsis import embedded_uninstaller, locate, version_strings
from builder.config import Product
from builder.errors import ConfigError, FormatError, ToolFailedError, UsageError, VerificationError
from builder.formats.base import BuildRequest, Built
from builder.signing.authenticode import SigningKey
from builder.formats import slotted
from builder.formats.windows_payload import EXE_UNINSTALLER, exe_arp_key, installed_trust, payload_files, stage_trust
from builder.signing import authenticode
from builder.tools import nsis, runner
from builder.trust import TRUST_FILE, describe

TEMPLATE = "nsis/installer.nsi.j2"
SCRIPT_NAME = "installer.nsi"
UNSIGNED_NAME = "setup.unsigned.exe"
SIGNED_NAME = "setup.exe"
SIGN_SCRIPT_NAME = "sign-uninstaller.sh"
STAGE_NAME = "files"
CONFIG_NAME = "enrollment.json"  # the MSI's name for the agent's config, in the same folder
UNINSTALLER_NAME = EXE_UNINSTALLER
# REG_SZ values under HKLM\<registry_key> the uninstaller removes: the agent's verified
# enrollment, the installers' staging value, and the unsigned values of earlier versions.
REGISTRY_VALUE_NAMES = ("Enrollment", "PendingEnrollment", "AccountId", "GroupId", "ConsoleUrl", "EnrollmentToken")


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Dir:
    windows_suffix: str  # "" for the install folder itself, else "\\sub\\dir"
    files: list[dict] = field(default_factory=list)


def _dirs(relpaths: list[str], staged_as: str) -> list[_Dir]:
    """Folders in creation order (a parent before its children), each with its files."""
    dirs: dict[str, _Dir] = {"": _Dir("")}
    for rel in relpaths:
        parts = PurePosixPath(rel).parts
        for i in range(1, len(parts)):
            key = "/".join(parts[:i])
            dirs.setdefault(key, _Dir("\\" + "\\".join(parts[:i])))
        parent = "/".join(parts[:-1])
        dirs[parent].files.append({"name": parts[-1], "source": f"{staged_as}/{rel}"})
    return [dirs[k] for k in sorted(dirs)]


# The longest run-time string the script builds is the `sc create` command line. NSIS cuts
# strings at 1024 characters without a word, so a product config that could make it longer is
# refused. Worst cases: $INSTDIR given with /D= (MAX_PATH), a relocated ProgramData.
_NSIS_MAX_STRLEN = 1024
_SC_CREATE_FIXED = 180  # sc.exe's path, its keywords, quotes and the agent's option names
_WORST_INSTDIR, _WORST_APPDATA = 260, 64


def check_string_lengths(product: Product) -> None:
    longest = (_SC_CREATE_FIXED + len(product.service_name) + len(product.service_display_name) + _WORST_INSTDIR
               + len(product.agent_exe) + len(product.registry_key) + _WORST_APPDATA
               + len(product.windows_install_folder) + len(CONFIG_NAME))
    if longest >= _NSIS_MAX_STRLEN:
        raise ConfigError(
            f"the EXE's service command line could reach {longest} characters, over NSIS' limit of {_NSIS_MAX_STRLEN - 1}",
            "shorten product.install_folder, product.registry_key or product.service_display_name",
        )


def render_script(
    product: Product,
    version: str,
    relpaths: list[str],
    *,
    payload_bytes: int = 0,
    sign_command: str | None = None,
    outfile: str = UNSIGNED_NAME,
    staged_as: str = STAGE_NAME,
) -> str:
    """The NSIS script. It holds no enrollment: that is stamped into the signature's slot."""
    check_string_lengths(product)
    key_parts = product.registry_key.split("\\")
    return render.render(
        TEMPLATE,
        product=product,
        version=version,
        file_version=version + ".0",
        outfile=outfile,
        config_name=CONFIG_NAME,
        uninstaller_name=UNINSTALLER_NAME,
        arp_key=exe_arp_key(product),
        msi_upgrade_code="{" + product.upgrade_code + "}",
        dirs=_dirs(relpaths, staged_as),
        agent_source=f"{staged_as}/{product.agent_exe}",
        trust_source=f"{staged_as}/{TRUST_FILE}",
        install_parents=["\\".join(product.install_parts[:i]) for i in range(len(product.install_parts) - 1, 0, -1)],
        registry_value_names=list(REGISTRY_VALUE_NAMES),
        # The key, then its parents up to (not including) the first part (SOFTWARE).
        registry_keys_to_prune=["\\".join(key_parts[:i]) for i in range(len(key_parts), 1, -1)],
        estimated_size_kb=(payload_bytes + 1023) // 1024,
        sign_uninstaller=sign_command,
    )


def _sign_script(key: SigningKey, signing_time: int) -> str:
    """A POSIX sh script for !uninstfinalize: sign "$1" in place. Paths only, no secret: a
    password is read by osslsigncode from its standard input (`-readpass -`), which it inherits
    from makensis."""
    osslsigncode = runner.TOOLS["osslsigncode"].path()
    sign = shlex.join([osslsigncode, "sign", *key.args(signing_time)])
    return (
        "#!/bin/sh\n"
        "# Run by makensis (!uninstfinalize) with the uninstaller's path; osslsigncode never overwrites.\n"
        "set -eu\n"
        'rm -f "$1.signed"\n'
        f'{sign} -in "$1" -out "$1.signed" >&2\n'
        'mv -f "$1.signed" "$1"\n'
    )


# ---------------------------------------------------------------------------------------------
# The format


def _stage(folder: Path, relpaths: list[str], dest: Path, mtime: int) -> int:
    """Copy the payload to `dest`, every mtime set to `mtime` (File stores it and the installer
    sets it on the installed file); returns the bytes copied."""
    total = 0
    for rel in relpaths:
        src, dst = folder / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.utime(dst, (mtime, mtime))
        total += dst.stat().st_size
    return total


class ExeFormat:
    name = "exe"
    platform = "windows"
    suffix = ".exe"
    signed_with = ("authenticode",)  # Signers fields a signed build needs
    stamp_signed_with = ()  # stamped into its slot

    def build(self, request: BuildRequest) -> Built:
        product, version, enrollment, signers = request.product, request.version, request.enrollment, request.signers
        key = None if signers.unsigned else signers.authenticode
        if key is None and not signers.unsigned:
            raise UsageError("the EXE needs an Authenticode signing key", "give --sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11, or --no-sign")
        if enrollment is not None and key is None:
            raise UsageError("an EXE's enrollment lives in its Authenticode signature: an unsigned EXE cannot carry one",
                             "sign it, or build an unsigned release (builder release --no-sign) for development")
        work = request.work
        folder = request.payload_dir(self.platform)
        relpaths = payload_files(folder, product)
        staged = work / STAGE_NAME
        script = work / SCRIPT_NAME
        sign_script = work / SIGN_SCRIPT_NAME
        unsigned = work / UNSIGNED_NAME
        final = work / SIGNED_NAME
        for stale in (unsigned, final):
            stale.unlink(missing_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        try:
            payload_bytes = _stage(folder, relpaths, staged, request.source_date_epoch)
            relpaths = sorted([*relpaths, stage_trust(staged, request.trust, request.source_date_epoch)])
            sign_command = None
            if key is not None:
                render.write_private(sign_script, _sign_script(key, request.source_date_epoch))
                sign_script.chmod(0o700)
                sign_command = f'"./{SIGN_SCRIPT_NAME}"'
            text = render_script(product, version, relpaths, payload_bytes=payload_bytes, sign_command=sign_command)
            render.write_private(script, text)
            makensis_seconds = nsis.compile_script(
                script,
                # The password or PIN, for osslsigncode inside !uninstfinalize.
                stdin=key.stdin() if key is not None else None,
            )
        finally:
            script.unlink(missing_ok=True)
            sign_script.unlink(missing_ok=True)
            shutil.rmtree(staged, ignore_errors=True)
        if not unsigned.is_file():
            raise ToolFailedError(f"makensis reported success but wrote no {UNSIGNED_NAME}", "run with -v for its output")
        details = {"makensis_seconds": round(makensis_seconds, 3), "uninstaller_signed": key is not None}
        if key is None:
            os.replace(unsigned, final)
            return Built(path=final, signer=None, details=details)
        start = time.perf_counter()
        try:
            authenticode.sign(key, unsigned, final, signing_time=request.source_date_epoch)
        finally:
            unsigned.unlink(missing_ok=True)
        # An empty slot in the signature, filled per group by `builder stamp`, or here.
        slotted.add_slot(final, "exe", product.slot_size)
        if enrollment is not None:
            slotted.fill_slot(final, "exe", enrollment.jws.reveal().encode("ascii"))
        details["sign_seconds"] = round(time.perf_counter() - start, 3)
        return Built(path=final, signer=authenticode.signer_subject(key), details=details)

    def release_entry(self, path: Path, product: Product, *, signed: bool) -> dict:
        # The slot lives in the Authenticode signature: an unsigned release has none.
        return slotted.release_entry(path, "exe") if signed else {}

    def verify(self, path: Path, ca: Path | None) -> dict:
        path = Path(path)
        report, problems, uninstaller = self._read(path)
        signature = authenticode.verify(path, ca)
        report["signature"] = signature.as_dict()
        if not signature.ok:
            problems.insert(0, f"signature: {signature.detail}")
        if uninstaller is None:
            problems.append("the uninstaller is not signed")
        else:
            # Written onto the machine byte for byte: checked as the file Windows will run.
            with tempfile.TemporaryDirectory(prefix="builder-uninstaller-") as tmp:
                copy = Path(tmp) / UNINSTALLER_NAME
                copy.write_bytes(uninstaller)
                check = authenticode.verify(copy, ca)
            report["uninstaller"] = {"size": len(uninstaller), "signature": check.as_dict()}
            if not check.ok:
                problems.append(f"uninstaller signature: {check.detail}")
        report["ok"] = not problems
        report["detail"] = "; ".join(problems) or "signatures ok, structure ok"
        return report

    def inspect(self, path: Path) -> dict:
        report, _, uninstaller = self._read(Path(path))
        if uninstaller is not None:
            report["uninstaller"] = {"size": len(uninstaller), "signature": None}
        return report

    def _read(self, path: Path) -> tuple[dict, list[str], bytes | None]:
        """The report, its problems and the whole (signed) uninstaller if there is one.
        FormatError when the file is not a whole NSIS installer; damage inside it is a problem
        in the report, so that verify can say "not ok" about a changed byte."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FormatError(f"{path}: cannot read it ({exc.strerror})", "check the path") from None
        name = str(path)
        inst = locate(data, name)
        problems: list[str] = []
        enrollment = uninstaller = None
        if inst.is_uninstaller:
            problems.append("this is an NSIS uninstaller, not an installer")
        enrollment = None
        try:
            uninstaller = embedded_uninstaller(data, inst, name)
        except FormatError as exc:
            problems.append(exc.message.removeprefix(f"{name}: "))
        try:
            jws, _ = slotted.stamped_jws(data, "exe", name)
        except VerificationError as exc:
            problems.append(exc.message.removeprefix(f"{name}: "))
            jws = None
        if jws is not None:
            enrollment, problem = describe(jws, installed_trust(path, TRUST_FILE), int(time.time()))
            if problem:
                problems.append(problem)
        info = version_strings(data, inst.firstheader_offset)
        report = {
            "format": self.name,
            "path": name,
            "ok": not problems,
            "detail": "; ".join(problems) or "structure ok",
            # The same shape as the MSI's report: product name and version at the top.
            "product": info.get("ProductName"),
            "version": info.get("ProductVersion"),
            "exe": {"manufacturer": info.get("CompanyName")},
            # In the signature's slot (by `stamp` or `build`); None for a release, whose slot is
            # still empty.
            "enrollment": enrollment,
            "enrollment_source": "slot" if enrollment else None,
            "signature": None,
        }
        return report, problems, uninstaller

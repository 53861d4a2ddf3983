"""The Windows EXE: an NSIS installer that gives the MSI's installed result.

Same folder under Program Files, same registry values, same config file written by the agent,
same auto-start service. Steps: stage the payload in the work folder (file times fixed to
SOURCE_DATE_EPOCH, as the MSI's), render templates/nsis/installer.nsi.j2 (0600: it holds the
token), makensis (which signs the uninstaller through !uninstfinalize), then Authenticode
signing of the installer through builder.signing.authenticode.

Reading an enrollment back (verify, inspect): each enrollment value is written by the script
from pieces, and each piece is an NSIS string that starts with a marker naming its field and
place (`builder-enrollment/1:group_id:0/1:`), skipped at run time by StrCpy. The pieces live in
the script's string table, inside the zlib-compressed header; `script_strings` inflates it and
`enrollment_from_strings` puts the values back together. So verify reports the enrollment this installer really writes,
with the token fingerprinted from the real token, not a copy recorded beside it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from builder import log, render
from builder.binfmt.nsis import embedded_uninstaller, locate, script_strings, version_strings
from builder.config import Product
from builder.enrollment import Enrollment, Secret
from builder.errors import ConfigError, EnrollmentError, FormatError, ToolFailedError, UsageError
from builder.formats.base import BuildRequest, Built, SigningKey
from builder.formats import slotted
from builder.formats.windows_payload import payload_files
from builder.signing import authenticode
from builder.tools import nsis, runner

TEMPLATE = "nsis/installer.nsi.j2"
SCRIPT_NAME = "installer.nsi"
UNSIGNED_NAME = "setup.unsigned.exe"
SIGNED_NAME = "setup.exe"
SIGN_SCRIPT_NAME = "sign-uninstaller.sh"
STAGE_NAME = "files"
CONFIG_NAME = "enrollment.json"  # the MSI's name for the agent's config, in the same folder
UNINSTALLER_NAME = "uninstall.exe"
# Enrollment field -> the REG_SZ value under HKLM\<registry_key> the agent reads.
REGISTRY_VALUES = {
    "account_id": "AccountId",
    "group_id": "GroupId",
    "console_url": "ConsoleUrl",
    "enrollment_token": "EnrollmentToken",
}
# An NSIS string holds 1024 characters at run time; a piece and its marker stay well below.
PIECE_CHARS = 500
MARKER_PREFIX = "builder-enrollment/1:"
_MARKER_RE = re.compile(r"^builder-enrollment/1:([a-z_]+):(\d+)/(\d+):(.*)$", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Rendering


def split_pieces(value: str, size: int = PIECE_CHARS) -> list[str]:
    """`value` cut into pieces of at most `size` characters.

    makensis replaces `$%NAME%` with the build machine's environment variable NAME, and
    `${NAME}` with a define, before it turns `$$` into `$`: a `$` followed by `%` or `{` in one
    string would be expanded however it is escaped. A cut between the two characters makes
    each piece safe; the installer joins the pieces back at run time.
    """
    pieces: list[str] = []
    current = ""
    for char in value:
        if len(current) >= size or (current.endswith("$") and char in "%{"):
            pieces.append(current)
            current = ""
        current += char
    pieces.append(current)
    return pieces


def marker(field_name: str, index: int, count: int) -> str:
    return f"{MARKER_PREFIX}{field_name}:{index}/{count}:"


def enrollment_context(enrollment: Enrollment) -> list[dict]:
    """The four values as the template writes them. Holds the token in clear."""
    values = {
        "account_id": enrollment.account_id,
        "group_id": enrollment.group_id,
        "console_url": enrollment.console_url,
        "enrollment_token": enrollment.token.reveal(),
    }
    out = []
    for field_name, value in values.items():
        pieces = split_pieces(value)
        out.append({
            "name": REGISTRY_VALUES[field_name],
            "length": len(value),
            "buffer_bytes": (len(value) + 1) * 2,
            "pieces": [{"marker": marker(field_name, i, len(pieces)), "text": text} for i, text in enumerate(pieces)],
        })
    return out


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
    enrollment: Enrollment | None,
    relpaths: list[str],
    *,
    payload_bytes: int = 0,
    sign_command: str | None = None,
    outfile: str = UNSIGNED_NAME,
    staged_as: str = STAGE_NAME,
) -> str:
    """The NSIS script. Contains the token in clear when `enrollment` is given: write it with
    render.write_private and delete it after the build."""
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
        arp_key_name=product.service_name,
        dirs=_dirs(relpaths, staged_as),
        install_parents=["\\".join(product.install_parts[:i]) for i in range(len(product.install_parts) - 1, 0, -1)],
        registry_value_names=list(REGISTRY_VALUES.values()),
        # The key, then its parents up to (not including) the first part (SOFTWARE).
        registry_keys_to_prune=["\\".join(key_parts[:i]) for i in range(len(key_parts), 1, -1)],
        estimated_size_kb=(payload_bytes + 1023) // 1024,
        enrollment=enrollment_context(enrollment) if enrollment is not None else None,
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
# The baked enrollment, read back from the script strings (builder/binfmt/nsis.py reads those)


def enrollment_from_strings(strings: list[str], name: str) -> Enrollment | None:
    """The enrollment the script writes, from its marked pieces; None when it has none (a
    release, which reads its enrollment from its signature slot at install time)."""
    found: dict[str, dict[int, str]] = {}
    counts: dict[str, int] = {}
    for text in strings:
        m = _MARKER_RE.match(text)
        if not m:
            continue
        field_name, index, count, piece = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if field_name not in REGISTRY_VALUES or index >= count or counts.setdefault(field_name, count) != count:
            raise EnrollmentError(f"{name}: the baked enrollment's {field_name} pieces are inconsistent", "rebuild the installer")
        found.setdefault(field_name, {})[index] = piece
    if not found:
        return None
    values = {}
    for field_name in REGISTRY_VALUES:
        pieces = found.get(field_name, {})
        if len(pieces) != counts.get(field_name, -1):
            raise EnrollmentError(f"{name}: the baked enrollment lacks (part of) {field_name}", "rebuild the installer")
        values[field_name] = "".join(pieces[i] for i in range(len(pieces)))
    return Enrollment(
        account_id=values["account_id"],
        group_id=values["group_id"],
        token=Secret(values["enrollment_token"]),
        console_url=values["console_url"],
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

    def build(self, request: BuildRequest) -> Built:
        product, version, enrollment, signers = request.product, request.version, request.enrollment, request.signers
        key = None if signers.unsigned else signers.authenticode
        if key is None and not signers.unsigned:
            raise UsageError("the EXE needs an Authenticode signing key", "give --sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11, or --no-sign")
        if enrollment is not None:
            log.register_secret(enrollment.token.reveal())
            # makensis quotes a bad line in its error; a line holds one piece of the token.
            for piece in split_pieces(enrollment.token.reveal()):
                log.register_secret(piece)
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
            sign_command = None
            if key is not None:
                render.write_private(sign_script, _sign_script(key, request.source_date_epoch))
                sign_script.chmod(0o700)
                sign_command = f'"./{SIGN_SCRIPT_NAME}"'
            text = render_script(product, version, enrollment, relpaths, payload_bytes=payload_bytes, sign_command=sign_command)
            render.write_private(script, text)
            makensis_seconds = nsis.compile_script(
                script,
                # The password or PIN, for osslsigncode inside !uninstfinalize.
                stdin=key.stdin() if key is not None else None,
            )
        finally:
            script.unlink(missing_ok=True)  # holds the token in clear
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
        if enrollment is None:
            # A release: an empty slot in the signature, filled per group by `builder stamp`.
            slotted.add_slot(final, "exe", product.slot_size)
        details["sign_seconds"] = round(time.perf_counter() - start, 3)
        return Built(path=final, signer=authenticode.signer_subject(key), details=details)

    def release_entry(self, path: Path, product: Product) -> dict:
        return slotted.release_entry(path, "exe")

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
        stamped = "script"
        try:
            enrollment = enrollment_from_strings(script_strings(data, inst, name), name)
            uninstaller = embedded_uninstaller(data, inst, name)
            if enrollment is None:
                enrollment, has_slot = slotted.stamped_enrollment(data, "exe", name)
                stamped = "slot" if has_slot else None
        except (FormatError, EnrollmentError) as exc:  # an EnrollmentError names the field, never the value
            problems.append(exc.message.removeprefix(f"{name}: "))
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
            # Baked into the script by `build`, or in the signature's slot by `stamp`; None for
            # a release, whose slot is still empty.
            "enrollment": enrollment.public() if enrollment else None,
            "enrollment_source": stamped if enrollment else None,
            "signature": None,
        }
        return report, problems, uninstaller

"""The Windows MSI: a per-machine x64 install of the agent as an auto-start service, built with wixl.

Steps: copy the payload into the work folder (fixed mtimes), render templates/wix/agent.wxs.j2
(0600: it holds the token), wixl, post-build edits with msibuild (same-version Upgrade row,
SecureCustomProperties, deterministic package code and times), then Authenticode signing.
Every msibuild edit happens before signing: any edit afterwards breaks the signature.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from builder import log, render
from builder.binfmt.cfb import SIGNATURE as CFB_MAGIC
from builder.config import TEMPLATES_DIR, Product
from builder.errors import FormatError, ToolFailedError, UsageError, VerificationError
from builder.formats.base import BuildRequest, Built
from builder.formats import slotted
from builder.formats.windows_payload import EXE_UNINSTALLER, UNINSTALL_ROOT, exe_arp_key, installed_trust, payload_files, stage_trust
from builder.signing import authenticode
from builder.tools import msitools
from builder.trust import TRUST_FILE, SignedEnrollment, describe

TEMPLATE = "wix/agent.wxs.j2"
AGENT_FILE_ID = "AgentExe"
# The cabinet member name of trust.json (the File table key): `builder verify` reads it back.
TRUST_FILE_ID = "TrustJson"
CONFIG_NAME = "enrollment.json"
# The public property that carries the signed enrollment (templates/wix/agent.wxs.j2 stages it
# in the registry for the agent), and the unsigned ones of earlier versions, which the MSI refuses.
ENROLLMENT_PROPERTY = "ENROLLMENT"
LEGACY_PROPERTIES = ("ACCOUNT_ID", "CONSOLE_URL", "ENROLLMENT_TOKEN", "GROUP_ID")
UPGRADE_PROPERTY = "WIX_UPGRADE_DETECTED"
DOWNGRADE_PROPERTY = "WIX_DOWNGRADE_DETECTED"
# Set by AppSearch when the EXE installed the agent (templates/wix/agent.wxs.j2): this MSI takes
# that install over.
EXE_INSTALLED_PROPERTY = "AGENT_EXE_INSTALLED"
# Passed from the client to the elevated server side of a per-machine install (what WiX's
# Secure="yes" does; wixl drops that attribute and breaks when the property is set by hand).
SECURE_PROPERTIES = (ENROLLMENT_PROPERTY, *LEGACY_PROPERTIES, DOWNGRADE_PROPERTY, UPGRADE_PROPERTY, EXE_INSTALLED_PROPERTY)
# msidbUpgradeAttributesMigrateFeatures | msidbUpgradeAttributesVersionMaxInclusive
UPGRADE_ATTRIBUTES = 1 | 512
# CustomAction.Type bits: EXE in an installed file (18), ignore exit code (64), rollback (256),
# deferred (1024), no impersonation (2048). wixl 0.101 writes Execute="rollback" as an
# immediate action, so every type is set again after the build and checked by inspect().
_EXE_FILE, _CONTINUE, _ROLLBACK, _IN_SCRIPT, _NO_IMPERSONATE = 18, 64, 256, 1024, 2048
CUSTOM_ACTION_TYPES = {
    "AgentEnrollFromRegistry": _EXE_FILE | _IN_SCRIPT | _NO_IMPERSONATE,
    "AgentForget": _EXE_FILE | _CONTINUE | _IN_SCRIPT | _NO_IMPERSONATE,
    "AgentForgetOnRollback": _EXE_FILE | _CONTINUE | _ROLLBACK | _IN_SCRIPT | _NO_IMPERSONATE,
}
# Only in a release's MSI (no enrollment baked in): reads the signature slot at install time.
ENROLL_FROM_INSTALLER = ("AgentEnrollFromInstaller", _EXE_FILE | _IN_SCRIPT | _NO_IMPERSONATE)
REMOVE_EXISTING_SEQUENCE = 1401  # after InstallValidate (1400), before InstallInitialize (1500)
# Taking an EXE install over: what the EXE leaves beyond the files, service, registry values and
# config this MSI replaces (builder/formats/windows_payload.py) is removed when this MSI is
# installed, by RemoveRegistryValues (2600) and RemoveFiles (3500), which Windows Installer rolls
# back with the rest of a failed install (wine 8 does not: tests/integration/test_one_product.py).
# Rows of the registry component, which every install installs and which is 64-bit (so the key
# is the 64-bit view's).
TAKEOVER_COMPONENT = "EnrollmentRegistry"
TAKEOVER_ROWS = ("ExeArpEntry", "ExeUninstaller")
_REMOVE_KEY = "-"  # RemoveRegistry.Name: the key, its values and subkeys
_REMOVE_ON_INSTALL = 1  # msidbRemoveFileInstallModeOnInstall
# wixl 0.101 writes no RemoveRegistry table (it has no element for one).
REMOVE_REGISTRY_SCHEMA = ("CREATE TABLE `RemoveRegistry` (`RemoveRegistry` CHAR(72) NOT NULL, `Root` SHORT NOT NULL, "
                          "`Key` CHAR(255) NOT NULL LOCALIZABLE, `Name` CHAR(255) LOCALIZABLE, `Component_` CHAR(72) NOT NULL "
                          "PRIMARY KEY `RemoveRegistry`)")
REQUIRED_TABLES = ("Property", "File", "Component", "ServiceInstall", "CustomAction", "InstallExecuteSequence", "Upgrade")


@dataclass
class _File:
    relpath: str  # POSIX, relative to payload/windows
    source: str  # relative to the .wxs file's folder
    name: str
    file_id: str
    component_id: str
    guid: str
    is_agent: bool


@dataclass
class _Dir:
    id: str
    name: str
    files: list[_File] = field(default_factory=list)
    children: list["_Dir"] = field(default_factory=list)


# wixl's preprocessor evaluates `$` in every attribute and text node (`$(var.X)`, `$(env.X)`,
# `$(sys.CURRENTDIR)`), drops a lone `$`, and its `$$` escape is broken before `(`. A variable's
# expansion is not evaluated again, so each literal `$` is written as this variable, which the
# template defines as "$". XML escaping is jinja's autoescape; this is the layer below it.
WIX_DOLLAR = "$(var.Dollar)"


def wix_text(value: str) -> str:
    """`value` for a .wxs attribute or text node, so that wixl's preprocessor gives back `value`."""
    return value.replace("$", WIX_DOLLAR)


def _short_id(prefix: str, relpath: str) -> str:
    """A valid MSI identifier ([A-Za-z_][A-Za-z0-9_.]*, <= 72 chars), stable for a path."""
    return prefix + hashlib.sha256(relpath.encode()).hexdigest()[:32]


def _stage_payload(folder: Path, relpaths: list[str], dest: Path, mtime: int) -> dict[str, str]:
    """Copy the payload to `dest` with every mtime set to `mtime` (the cabinet stores it);
    returns relpath -> sha256 of the bytes copied."""
    digests = {}
    for rel in relpaths:
        src, dst = folder / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
        os.utime(dst, (mtime, mtime))
        digests[rel] = h.hexdigest()
    return digests


def _tree(relpaths: list[str], product: Product, staged_as: str) -> tuple[_Dir, list[_File]]:
    root = _Dir(id="INSTALLFOLDER", name="")
    dirs: dict[str, _Dir] = {"": root}
    files = []
    for rel in relpaths:
        parts = PurePosixPath(rel).parts
        parent = root
        for i in range(len(parts) - 1):
            key = "/".join(parts[: i + 1])
            if key not in dirs:
                dirs[key] = _Dir(id=_short_id("d", key), name=wix_text(parts[i]))
                parent.children.append(dirs[key])
            parent = dirs[key]
        is_agent = rel == product.agent_exe
        item = _File(
            relpath=rel,
            source=wix_text(f"{staged_as}/{rel}"),
            name=wix_text(parts[-1]),
            file_id=AGENT_FILE_ID if is_agent else TRUST_FILE_ID if rel == TRUST_FILE else _short_id("f", rel),
            component_id=_short_id("c", rel),
            guid=product.component_guid(rel),
            is_agent=is_agent,
        )
        parent.files.append(item)
        files.append(item)
    return root, files


def _input_digest(product: Product, version: str, enrollment: SignedEnrollment | None, payload: dict[str, str]) -> str:
    """Everything the MSI is made from. Equal inputs give equal product and package codes; a
    different group, payload byte or template line gives new ones."""
    h = hashlib.sha256(b"builder-msi-1\0")
    h.update(json.dumps(dataclasses.asdict(product), sort_keys=True).encode() + b"\0")
    h.update(version.encode() + b"\0")
    h.update((enrollment.jws.reveal().encode() if enrollment else b"") + b"\0")
    h.update((TEMPLATES_DIR / TEMPLATE).read_bytes() + b"\0")
    for rel, digest in sorted(payload.items()):
        h.update(f"{rel}\0{digest}\0".encode())
    return h.hexdigest()


def _dir_chain(parts: list[str], prefix: str, last_id: str, product: Product) -> list[dict]:
    """The folders from Program Files (or ProgramData) down to `last_id`; each one above it has
    a component of its own (`component`, `guid`) that creates it, so that uninstall removes it
    once empty (Windows Installer removes empty folders it created for a component; seen under
    wine: without these, an empty "C:\\Program Files\\<vendor>" stayed)."""
    chain = []
    for i, name in enumerate(parts):
        folder_id = last_id if i == len(parts) - 1 else f"{prefix}{i}"
        chain.append({"id": folder_id, "name": wix_text(name), "component": f"Folder{folder_id}",
                      "guid": product.component_guid(f":folder:{folder_id}")})
    return chain


def agent_arguments(product: Product, command: str) -> str:
    """The agent's command line after the executable: no secret, only where to find one."""
    config = f"[CommonAppDataFolder]{product.windows_install_folder}\\{CONFIG_NAME}"
    installer = ' --installer "[OriginalDatabase]"' if command == "enroll-from-installer" else ""
    return f'{command}{installer} --registry-key "{product.registry_key}" --config "{config}"'


def render_wxs(
    product: Product,
    version: str,
    enrollment: SignedEnrollment | None,
    relpaths: list[str],
    *,
    product_code: str,
    staged_as: str = "files",
) -> str:
    """The WiX source. Contains the token in clear when `enrollment` is given: write it with
    render.write_private and delete it after the build. Every text value passes wix_text here;
    jinja escapes it for XML."""
    root, files = _tree(relpaths, product, staged_as)
    # The one place the signed enrollment (it holds the token) leaves its Secret.
    enrollment_ctx = wix_text(enrollment.jws.reveal()) if enrollment is not None else None
    product_ctx = {k: wix_text(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(product).items()}
    return render.render(
        TEMPLATE,
        product=product_ctx,
        version=wix_text(version),
        product_code=product_code,
        enrollment=enrollment_ctx,
        install_dirs=_dir_chain(product.install_parts, "InstallPart", "INSTALLFOLDER", product),
        data_dirs=_dir_chain(product.install_parts, "DataPart", "DATAFOLDER", product),
        payload_root=root,
        all_files=files,
        agent_file_id=AGENT_FILE_ID,
        agent_args=lambda command: wix_text(agent_arguments(product, command)),
        agent_args_installer=wix_text(agent_arguments(product, "enroll-from-installer")),
        exe_arp_key=wix_text(exe_arp_key(product)),
        registry_guid=product.component_guid(":registry"),
        data_guid=product.component_guid(":data-folder"),
    )


def _codes(digest: str, product: Product) -> tuple[str, str]:
    ns = uuid.UUID(product.upgrade_code)
    product_code = str(uuid.uuid5(ns, "product:" + digest)).upper()
    package_code = str(uuid.uuid5(ns, "package:" + digest)).upper()
    return product_code, package_code


def _summary_time(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y/%m/%d %H:%M:%S")


def _post_build(msi: Path, product: Product, version: str, package_code: str, epoch: int) -> None:
    """msibuild edits wixl cannot express. Must run before signing."""
    rows = [r for r in msitools.export_table(msi, "Upgrade") if r.get("ActionProperty") == UPGRADE_PROPERTY]
    if len(rows) != 1 or rows[0].get("VersionMax") != version:
        raise ToolFailedError(f"wixl wrote an unexpected Upgrade table ({len(rows)} {UPGRADE_PROPERTY} rows)",
                              "check the wixl version (built for msitools 0.101)")
    upgrade_code = "{" + product.upgrade_code + "}"
    existing = msitools.tables(msi)
    msitools.query(
        msi,
        # MajorUpgrade covers versions below this one only, so group B's MSI of the same version
        # would install beside group A's. Attributes is part of the table's key: DELETE + INSERT.
        f"DELETE FROM Upgrade WHERE ActionProperty = '{UPGRADE_PROPERTY}'",
        "INSERT INTO Upgrade (UpgradeCode, VersionMin, VersionMax, Language, Attributes, Remove, ActionProperty) "
        f"VALUES ('{upgrade_code}', '', '{version}', '', {UPGRADE_ATTRIBUTES}, '', '{UPGRADE_PROPERTY}')",
        f"UPDATE Property SET Value = '{';'.join(SECURE_PROPERTIES)}' WHERE Property = 'SecureCustomProperties'",
        *(f"UPDATE CustomAction SET Type = {t} WHERE Action = '{a}'" for a, t in (*CUSTOM_ACTION_TYPES.items(), ENROLL_FROM_INSTALLER)),
        # wixl 0.101 schedules RemoveExistingProducts after InstallFinalize (6601): the old
        # product's uninstall would then run after the new install and take its registry values
        # and service with it (measured under wine). WiX's default instead: right after
        # InstallValidate, the old product removed before anything new is written.
        f"UPDATE InstallExecuteSequence SET Sequence = {REMOVE_EXISTING_SEQUENCE} WHERE Action = 'RemoveExistingProducts'",
        # Over an EXE install: its Add/Remove Programs entry and its uninstaller go, so that one
        # entry is left, this one (templates/wix/agent.wxs.j2).
        *(() if "RemoveRegistry" in existing else (REMOVE_REGISTRY_SCHEMA,)),
        "INSERT INTO `RemoveRegistry` (`RemoveRegistry`, `Root`, `Key`, `Name`, `Component_`) "
        f"VALUES ('{TAKEOVER_ROWS[0]}', 2, '{exe_arp_key(product)}', '{_REMOVE_KEY}', '{TAKEOVER_COMPONENT}')",
        "INSERT INTO `RemoveFile` (`FileKey`, `Component_`, `FileName`, `DirProperty`, `InstallMode`) "
        f"VALUES ('{TAKEOVER_ROWS[1]}', '{TAKEOVER_COMPONENT}', '{EXE_UNINSTALLER}', 'INSTALLFOLDER', {_REMOVE_ON_INSTALL})",
    )
    # wixl's package code is random and its times are the build's: both fixed from the inputs.
    stamp = _summary_time(epoch)
    msitools.set_summary(msi, {9: "{" + package_code + "}", 12: stamp, 13: stamp})


class MsiFormat:
    name = "msi"
    platform = "windows"
    suffix = ".msi"
    signed_with = ("authenticode",)  # Signers fields a signed build needs
    stamp_signed_with = ("authenticode",)  # the baked msi (msi-tagged is stamped into its slot)

    def build(self, request: BuildRequest) -> Built:
        product, version, enrollment = request.product, request.version, request.enrollment
        signers = request.signers
        if not signers.unsigned and signers.authenticode is None:
            raise UsageError("the MSI needs an Authenticode signing key", "give --sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11, or --no-sign")
        if enrollment is not None:
            log.register_secret(enrollment.token.reveal())
        folder = request.payload_dir(self.platform)
        relpaths = payload_files(folder, product)
        staged = request.work / "files"
        if staged.exists():
            shutil.rmtree(staged)
        payload = _stage_payload(folder, relpaths, staged, request.source_date_epoch)
        trust_rel = stage_trust(staged, request.trust, request.source_date_epoch)
        payload[trust_rel] = hashlib.sha256(request.trust.to_json_bytes()).hexdigest()
        relpaths = sorted([*relpaths, trust_rel])
        digest = _input_digest(product, version, enrollment, payload)
        product_code, package_code = _codes(digest, product)

        wxs = request.work / "agent.wxs"
        unsigned = request.work / "agent.unsigned.msi"
        try:
            render.write_private(wxs, render_wxs(product, version, enrollment, relpaths, product_code=product_code))
            wixl_seconds = msitools.wixl(wxs, unsigned)
        finally:
            wxs.unlink(missing_ok=True)  # holds the token in clear
            shutil.rmtree(staged, ignore_errors=True)
        final = request.work / "agent.msi"
        final.unlink(missing_ok=True)
        details = {"product_code": "{" + product_code + "}", "package_code": "{" + package_code + "}",
                   "upgrade_code": "{" + product.upgrade_code + "}", "wixl_seconds": round(wixl_seconds, 3)}
        try:
            _post_build(unsigned, product, version, package_code, request.source_date_epoch)
            if signers.unsigned:
                os.replace(unsigned, final)
                return Built(path=final, signer=None, details=details)
            authenticode.sign(signers.authenticode, unsigned, final, signing_time=request.source_date_epoch)
        finally:
            unsigned.unlink(missing_ok=True)  # no half-edited or unsigned copy is left beside the result
        if enrollment is None:
            # A release: an empty slot in the signature, for `builder stamp --format msi-tagged`.
            slotted.add_slot(final, "msi", product.slot_size)
        return Built(path=final, signer=authenticode.signer_subject(signers.authenticode), details=details)

    def release_entry(self, path: Path, product: Product, *, signed: bool) -> dict:
        # The slot lives in the Authenticode signature: an unsigned release has none.
        return slotted.release_entry(path, "msi") if signed else {}

    def stamp(self, release, enrollment: SignedEnrollment, signers, out: Path) -> Built:
        """The baked per-group MSI (GPO, Intune): the release MSI with the enrollment as Property
        defaults, a new ProductCode (a same-version group swap is a major upgrade, not a repair)
        and PackageCode, then signed once. No wixl rebuild."""
        if not signers.unsigned and signers.authenticode is None:
            raise UsageError("a baked MSI is signed again: give an Authenticode signing key",
                             "--sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11; or stamp --format msi-tagged")
        base, product = release.file("msi"), release.product()
        log.register_secret(enrollment.token.reveal())
        digest = hashlib.sha256(f"{base.entry['sha256']}\0".encode() + enrollment.jws.reveal().encode()).hexdigest()
        product_code, package_code = _codes(digest, product)
        with tempfile.TemporaryDirectory(prefix="builder-msi-", dir=out.parent) as tmp:
            unsigned = Path(tmp) / "agent.msi"
            # The release's signature stream stays in the copy: the edits void it, and signing
            # replaces it (osslsigncode re-signs a signed MSI), which saves a removal pass.
            shutil.copyfile(base.path, unsigned)
            values = {ENROLLMENT_PROPERTY: enrollment.jws.reveal(), "ProductCode": "{" + product_code + "}"}
            stamp_time = _summary_time(release.manifest["source_date_epoch"])
            msitools.set_properties(unsigned, values, {9: "{" + package_code + "}", 12: stamp_time, 13: stamp_time})
            if signers.unsigned:
                if release.manifest.get("signed"):
                    authenticode.remove_signature(unsigned, out)  # no stale, invalid signature left in it
                else:
                    os.replace(unsigned, out)
                return Built(path=out, signer=None)
            authenticode.sign(signers.authenticode, unsigned, out, signing_time=release.manifest["source_date_epoch"])
        return Built(path=out, signer=authenticode.signer_subject(signers.authenticode),
                     details={"product_code": "{" + product_code + "}", "package_code": "{" + package_code + "}"})

    def verify(self, path: Path, ca: Path | None) -> dict:
        report = self.inspect(path)
        signature = authenticode.verify(Path(path), ca)
        report["signature"] = signature.as_dict()
        if not signature.ok:
            report["ok"] = False
            report["detail"] = f"signature: {signature.detail}" + ("" if report["detail"] == "structure ok" else f"; {report['detail']}")
        return report

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        _check_container(path)
        msitools.tables(path)  # FormatError when libmsi cannot open it
        tables = msitools.dump_tables(path)
        problems = [f"table {t} is missing" for t in REQUIRED_TABLES if t not in tables]
        props = {row["Property"]: row["Value"] for row in tables.get("Property", [])}
        summary = {int(r["PropertyId"]): r["Value"] for r in tables.get("_SummaryInformation", []) if r.get("PropertyId", "").isdigit()}

        # Exactly what the agent would do with it: the property first, else the slot.
        jws, source = props.get(ENROLLMENT_PROPERTY) or None, "property"
        legacy = [p for p in LEGACY_PROPERTIES if props.get(p)]
        if legacy:
            problems.append(f"unsigned enrollment properties {', '.join(legacy)}: the MSI refuses to install")
        try:
            slot_jws, has_slot = slotted.stamped_jws(path.read_bytes(), "msi", str(path))
        except VerificationError as exc:
            problems.append(exc.message)
            slot_jws, has_slot = None, True
        if jws is None:
            jws, source = slot_jws, "slot"
        enrollment = None
        if jws is not None:
            enrollment, problem = describe(jws, installed_trust(path, TRUST_FILE_ID), int(time.time()))
            if problem:
                problems.append(problem)
        if ENROLLMENT_PROPERTY not in props.get("MsiHiddenProperties", "").split(";"):
            problems.append(f"MsiHiddenProperties does not list {ENROLLMENT_PROPERTY}: the token would be logged")
        secure = props.get("SecureCustomProperties", "").split(";")
        missing_secure = [p for p in (ENROLLMENT_PROPERTY, *LEGACY_PROPERTIES) if p not in secure]
        if missing_secure:
            problems.append(f"SecureCustomProperties lacks {', '.join(missing_secure)}")
        version = props.get("ProductVersion", "")
        if not _covers_same_version(tables.get("Upgrade", []), version):
            problems.append("the Upgrade table does not replace the same version: another group's MSI would install beside this one")
        services = [r.get("Name") for r in tables.get("ServiceInstall", [])]
        if not _takes_exe_over(tables, services):
            problems.append("it does not remove the EXE's Add/Remove Programs entry and uninstaller: over an EXE install, "
                            "the machine would list the agent twice")
        actions = {r["Action"]: r.get("Sequence") for r in tables.get("InstallExecuteSequence", []) if "Action" in r}
        ca_types = {r["Action"]: r.get("Type") for r in tables.get("CustomAction", []) if "Action" in r}
        remove_at, initialize_at = actions.get("RemoveExistingProducts"), actions.get("InstallInitialize")
        if remove_at and initialize_at and int(remove_at) > int(initialize_at):
            problems.append("RemoveExistingProducts runs after InstallInitialize: an upgrade would remove what it installs")
        if has_slot and ENROLL_FROM_INSTALLER[0] not in actions:
            problems.append(f"a slot but no {ENROLL_FROM_INSTALLER[0]} action: the enrollment would never be read")
        for action, want in CUSTOM_ACTION_TYPES.items():
            if action not in actions:
                problems.append(f"custom action {action} is not scheduled")
            elif ca_types.get(action) != str(want):
                problems.append(f"custom action {action} has type {ca_types.get(action)}, not {want}")

        return {
            "format": self.name,
            "path": str(path),
            "ok": not problems,
            "detail": "; ".join(problems) or "structure ok",
            "version": version,
            "product": props.get("ProductName"),
            "msi": {
                "manufacturer": props.get("Manufacturer"),
                "product_code": props.get("ProductCode"),
                "upgrade_code": props.get("UpgradeCode"),
                "package_code": summary.get(9),
                "created": summary.get(12),
            },
            "kind": "msi-tagged" if has_slot else "msi",
            "enrollment": enrollment,
            "enrollment_source": source if enrollment else None,
            "services": services,
            "custom_actions": {a: actions[a] for a in CUSTOM_ACTION_TYPES if a in actions},
            "files": len(tables.get("File", [])),
            "signature": None,
        }


def _check_container(path: Path) -> None:
    """A quick look at the OLE compound-file header: an MSI starts with its magic and consists
    of whole sectors, so a non-MSI or a cut-off download is named before any tool runs."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read it ({exc.strerror})", "check the path") from None
    if len(head) < 512 or head[:8] != CFB_MAGIC:
        raise FormatError(f"{path}: not an MSI (no OLE compound-file header)", "give a Windows Installer .msi file")
    sector = 1 << int.from_bytes(head[30:32], "little")
    if sector not in (512, 4096) or size % sector:
        raise FormatError(f"{path}: truncated or damaged MSI ({size} bytes is not a whole number of {sector}-byte sectors)",
                          "download or copy the file again")


def _takes_exe_over(tables: dict[str, list[dict[str, str]]], services: list[str | None]) -> bool:
    """The rows _post_build adds: on install, the EXE's Add/Remove Programs key (named after the
    service) and its uninstaller are removed."""
    arp_keys = {f"{UNINSTALL_ROOT}\\{name}".lower() for name in services if name}
    key = any(r.get("Key", "").lower() in arp_keys and r.get("Name") == _REMOVE_KEY and r.get("Root") == "2"
              and r.get("Component_") == TAKEOVER_COMPONENT for r in tables.get("RemoveRegistry", []))
    file = any(r.get("FileName") == EXE_UNINSTALLER and r.get("DirProperty") == "INSTALLFOLDER"
               and r.get("Component_") == TAKEOVER_COMPONENT and int(r.get("InstallMode") or 0) & _REMOVE_ON_INSTALL
               for r in tables.get("RemoveFile", []))
    return key and file


def _covers_same_version(rows: list[dict[str, str]], version: str) -> bool:
    for row in rows:
        if row.get("ActionProperty") != UPGRADE_PROPERTY:
            continue
        try:
            attributes = int(row.get("Attributes") or 0)
        except ValueError:
            continue
        if row.get("VersionMax") == version and attributes & 512 and not attributes & 2:
            return True
    return False

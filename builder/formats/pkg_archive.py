"""The pkg's product archive, as `productbuild` makes it: its members, written (Distribution,
PackageInfo, Payload) and read back and checked without signatures, and a release pkg re-baked
with a group's enrollment.

    Distribution                 templates/macos/distribution.dist.j2
    agent.pkg/Bom                builder.binfmt.bom, from the same tree scan as the Payload
    agent.pkg/Payload            gzip odc cpio: the agent folder and the LaunchDaemon plist
    agent.pkg/Scripts            gzip odc cpio: ./postinstall (builder.formats.macos_postinstall)
    agent.pkg/PackageInfo        templates/macos/packageinfo.xml.j2
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from builder import render
from builder.binfmt import xar
from builder.binfmt.cpio import PayloadStats, TreeEntry, iter_cpio, read_cpio, write_cpio_entries
from builder.binfmt.gzipstream import ParallelGzip, gunzip
from builder.config import Product
from builder.errors import EnrollmentError, FormatError
from builder.formats.macos_payload import ROOT_UID, WHEEL_GID
from builder.formats.macos_postinstall import POSTINSTALL, baked_jws, baked_trust, render_postinstall, scripts_archive
from builder.trust import SignedEnrollment, Trust

COMPONENT = "agent.pkg"  # the one component package inside the product archive
DISTRIBUTION = "Distribution"
BOM = f"{COMPONENT}/Bom"
PAYLOAD = f"{COMPONENT}/Payload"
SCRIPTS = f"{COMPONENT}/Scripts"
PACKAGE_INFO = f"{COMPONENT}/PackageInfo"
# Member order of the xar, so the heap order, fixed: a rebake writes the same order.
MEMBERS = (DISTRIBUTION, BOM, PAYLOAD, SCRIPTS, PACKAGE_INFO)


def render_package_info(product: Product, version: str, stats: PayloadStats) -> str:
    return render.render("macos/packageinfo.xml.j2", identifier=product.pkg_identifier, version=version,
                         number_of_files=stats.number_of_files, install_kbytes=stats.install_kbytes,
                         postinstall=POSTINSTALL)


def render_distribution(product: Product, version: str, stats: PayloadStats) -> str:
    return render.render("macos/distribution.dist.j2", title=product.name, identifier=product.pkg_identifier,
                         version=version, install_kbytes=stats.install_kbytes, component=COMPONENT)


def write_payload(entries: list[TreeEntry], out: Path) -> PayloadStats:
    """The Payload member: a gzip-compressed odc cpio of `entries`."""
    with open(out, "wb") as raw, ParallelGzip(raw) as gz:
        return write_cpio_entries(entries, gz)


@dataclass(frozen=True)
class PkgContents:
    """What a product archive from here holds, read and checked without signatures."""

    identifier: str | None
    version: str | None
    number_of_files: int | None
    payload_entries: int | None
    postinstall: str | None
    enrollment: str | None  # the baked signed enrollment (holds the token)
    trust: Trust | None
    problems: tuple[str, ...]
    members: tuple[str, ...]


def read_pkg(source: bytes | Path, name: str, *, payload: bool = True) -> PkgContents:
    """Structure of the pkg `source`: xar TOC checksum, members, Distribution, PackageInfo, Bom,
    the Payload (every entry root:wheel, count as PackageInfo says; skipped with payload=False)
    and the postinstall with its baked enrollment.

    FormatError (naming `name`) when it is not a complete xar; anything else found wrong is
    listed in `problems`.
    """
    problems: list[str] = []
    with xar.read_xar(source, name=name) as archive:  # checks the header and the TOC checksum
        names = tuple(archive.names())
        missing = [m for m in MEMBERS if m not in names]
        if missing:
            problems.append(f"members missing: {', '.join(missing)} (a product archive with one component {COMPONENT})")

        def member(member_name: str) -> bytes | None:
            if member_name not in names:
                return None
            try:
                return archive.read(member_name)  # checks the member's checksums
            except FormatError as exc:
                problems.append(exc.message.removeprefix(f"{name}: "))
                return None

        identifier = version = None
        number_of_files = payload_count = None
        postinstall = None
        enrollment = trust = None
        if (data := member(DISTRIBUTION)) is not None:
            problems += _check_distribution(data)
        if (data := member(PACKAGE_INFO)) is not None:
            identifier, version, number_of_files, info_problems = _check_package_info(data)
            problems += info_problems
        if (data := member(BOM)) is not None and data[:8] != b"BOMStore":
            problems.append("agent.pkg/Bom is not a BOM (no BOMStore magic)")
        if payload and (data := member(PAYLOAD)) is not None:
            try:
                payload_count, owner_problems = _check_payload(data)
                problems += owner_problems
                if number_of_files is not None and payload_count != number_of_files:
                    problems.append(f"Payload holds {payload_count} entries, PackageInfo says {number_of_files}")
            except (FormatError, OSError, EOFError, zlib.error) as exc:
                problems.append(f"agent.pkg/Payload: {getattr(exc, 'message', exc)}")
        if (data := member(SCRIPTS)) is not None:
            try:
                with gunzip(data, "agent.pkg/Scripts") as stream:
                    entries = {e.name: e for e in read_cpio(stream, with_data=True, name="agent.pkg/Scripts")}
                script = entries.get(f"./{POSTINSTALL}")
                if script is None or script.data is None:
                    problems.append("agent.pkg/Scripts has no ./postinstall")
                else:
                    if script.mode & 0o111 == 0:
                        problems.append("agent.pkg/Scripts: postinstall is not executable")
                    postinstall = script.data.decode("utf-8")
                    try:
                        enrollment = baked_jws(postinstall, f"{name}: postinstall")
                        trust = baked_trust(postinstall, f"{name}: postinstall")
                    except EnrollmentError as exc:  # names the field, never the value
                        problems.append(exc.message)
                    if trust is None:
                        problems.append("the postinstall carries no pins (trust_json): agents would refuse every enrollment")
            except (FormatError, OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
                problems.append(f"agent.pkg/Scripts: {getattr(exc, 'message', exc)}")
    return PkgContents(identifier, version, number_of_files, payload_count, postinstall, enrollment, trust,
                       tuple(problems), names)


def _xml(data: bytes, what: str):
    import xml.etree.ElementTree as ET

    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise FormatError(f"{what} has a DOCTYPE or entity declaration")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise FormatError(f"{what} is not well-formed XML: {exc}") from None


def _check_distribution(data: bytes) -> list[str]:
    try:
        doc = _xml(data, "Distribution")
    except FormatError as exc:
        return [exc.message]
    problems = []
    if doc.tag != "installer-gui-script":
        problems.append(f"Distribution's root is <{doc.tag}>, not <installer-gui-script>")
    domains = doc.find("domains")
    want = {"enable_anywhere": "false", "enable_currentUserHome": "false", "enable_localSystem": "true"}
    if domains is None or any(domains.get(k) != v for k, v in want.items()):
        problems.append("Distribution: <domains> must set enable_anywhere=false, enable_currentUserHome=false, enable_localSystem=true")
    refs = [(ref.text or "").strip() for ref in doc.findall("pkg-ref") if (ref.text or "").strip()]
    if refs != [f"#{COMPONENT}"]:
        problems.append(f"Distribution refers to {refs or 'no component'}, expected #{COMPONENT}")
    return problems


def _check_package_info(data: bytes) -> tuple[str | None, str | None, int | None, list[str]]:
    try:
        doc = _xml(data, "PackageInfo")
    except FormatError as exc:
        return None, None, None, [exc.message]
    problems = []
    if doc.tag != "pkg-info":
        problems.append(f"PackageInfo's root is <{doc.tag}>, not <pkg-info>")
    if doc.get("install-location") != "/" or doc.get("auth") != "root":
        problems.append("PackageInfo: install-location must be / and auth root")
    payload = doc.find("payload")
    count = None
    try:
        count = int(payload.get("numberOfFiles")) if payload is not None else None
    except (TypeError, ValueError):
        problems.append("PackageInfo: <payload numberOfFiles> is not a number")
    if count is None and payload is None:
        problems.append("PackageInfo has no <payload>")
    script = doc.find("scripts/postinstall")
    if script is None or script.get("file") != f"./{POSTINSTALL}":
        problems.append("PackageInfo names no ./postinstall script")
    return doc.get("identifier"), doc.get("version"), count, problems


def _check_payload(data: bytes) -> tuple[int, list[str]]:
    problems = []
    count = 0
    with gunzip(data, "agent.pkg/Payload") as stream:
        for entry in iter_cpio(stream, name="agent.pkg/Payload"):
            count += 1
            if (entry.uid, entry.gid) != (ROOT_UID, WHEEL_GID) and len(problems) < 5:
                problems.append(f"Payload: {entry.name} is owned by {entry.uid}:{entry.gid}, not root:wheel (0:0)")
    return count, problems


def rebake(release_pkg: bytes | Path, enrollment: SignedEnrollment, product: Product, epoch: int) -> bytes:
    """A release pkg (signed or not) with `enrollment` baked into its postinstall: the same
    members with Scripts replaced, as an UNSIGNED product archive to sign.

    Costs a xar rewrite (the Payload is copied, not rebuilt). Given the release's inputs and
    epoch, the result is byte-identical to a pkg built with the enrollment from the start.
    """
    name = str(release_pkg) if isinstance(release_pkg, Path) else "release pkg"
    contents = read_pkg(release_pkg, name, payload=False)
    if contents.problems:
        raise FormatError(f"{name}: not a pkg this builder made: {'; '.join(contents.problems)}", "rebuild the release")
    if contents.identifier != product.pkg_identifier:
        raise FormatError(f"{name}: its identifier is {contents.identifier!r}, the product's is {product.pkg_identifier!r}",
                          "use the release built for this product")
    if contents.trust is None:
        raise FormatError(f"{name}: its postinstall carries no pins", "rebuild the release")
    scripts = scripts_archive(render_postinstall(product, contents.trust, enrollment), epoch)
    with xar.read_xar(release_pkg, name=name) as archive:
        members = [(m, scripts if m == SCRIPTS else archive.read(m)) for m in MEMBERS]
    return xar.build_xar(members, epoch=epoch)

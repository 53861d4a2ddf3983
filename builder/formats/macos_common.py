"""What the pkg and dmg formats share: the installed layout, the payload checks, the postinstall
with its enrollment, the component package's members, and reading all of it back.

Installed by the pkg (install-location "/", owner root:wheel, every mtime SOURCE_DATE_EPOCH):

    /Library/Application Support/<install_folder>/   the macOS payload (agent or Agent.app)
    /Library/LaunchDaemons/<launchd_label>.plist     runs `<agent> run --config <config>`
    /Library/Application Support/<install_folder>/enrollment.json    written by postinstall, 0600

The postinstall (templates/macos/postinstall.sh.j2) carries the release's pins (keys and console
hosts) and takes the signed enrollment baked into it at build time, else from a sidecar file
beside the package (`$(dirname "$1")/<sidecar>`, what a release pkg on a group's disk image
uses), else keeps an existing config. It verifies a new enrollment (ES256 with openssl, expiry,
console host) before it writes anything: the sidecar is not covered by any signature.
"""

from __future__ import annotations

import collections
import datetime as dt
import gzip
import io
import json
import os
import plistlib
import re
import shlex
import shutil
import stat
import struct
import tempfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from builder import render
from builder.binfmt import udif
from builder.binfmt import xar
from builder.binfmt.cpio import PayloadStats, TreeEntry, iter_cpio, read_cpio, scan_tree, write_cpio_entries
from builder.config import Product
from builder.errors import ConfigError, EnrollmentError, FormatError, PayloadError
from builder.formats.base import refuse_symlinks
from builder.trust import TRUST_FILE, SignedEnrollment, Trust

COMPONENT = "agent.pkg"  # the one component package inside the product archive
DISTRIBUTION = "Distribution"
BOM = f"{COMPONENT}/Bom"
PAYLOAD = f"{COMPONENT}/Payload"
SCRIPTS = f"{COMPONENT}/Scripts"
PACKAGE_INFO = f"{COMPONENT}/PackageInfo"
# Member order of the xar, so the heap order, fixed: a rebake writes the same order.
MEMBERS = (DISTRIBUTION, BOM, PAYLOAD, SCRIPTS, PACKAGE_INFO)
POSTINSTALL = "postinstall"
CONFIG_NAME = "enrollment.json"  # the Windows formats' name for the same file
SIDECAR_SUFFIX = ".enrollment.jws"  # a signed enrollment: base64url and dots, no newline
INSTALL_ROOT_ENV = "BUILDER_INSTALL_ROOT"
AGENT_NAME = "agent"  # a plain executable at the payload's top level wins over a .app
ROOT_UID = 0
WHEEL_GID = 0  # cpio's default is 80 (admin); the brief and launchd want root:wheel
_MACHO_MAGICS = (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xfe\xed\xfa\xce")
_FAT_MAGICS = (b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf")


def plist_path(product: Product) -> str:
    return f"/Library/LaunchDaemons/{product.launchd_label}.plist"


def sidecar_name(product: Product) -> str:
    """The enrollment file a release pkg reads from beside itself. A leading dot: Finder hides it
    on the disk image, so the window shows the installer and the README only."""
    return f".{product.bundle_id}{SIDECAR_SUFFIX}"


def sidecar_name_from_pkg(contents: "PkgContents") -> str:
    """The sidecar name a pkg's postinstall reads (from the script itself, so a reader needs no
    product configuration)."""
    name = _baked_word(contents.postinstall or "", "postinstall", "sidecar_name")
    return name or f".unknown{SIDECAR_SUFFIX}"


# ---------------------------------------------------------------------------------------------
# The payload


@dataclass(frozen=True)
class MacPayload:
    """What the macOS payload folder holds, checked."""

    folder: Path
    agent: str  # path of the executable launchd runs, relative to the folder
    code: tuple[str, ...]  # .app bundles and loose Mach-O files to sign, relative, sorted


@dataclass(frozen=True)
class Layout:
    install_dir: str
    config_path: str
    plist_path: str
    agent_path: str

    @classmethod
    def of(cls, product: Product, payload: MacPayload) -> "Layout":
        install_dir = product.mac_install_folder
        return cls(
            install_dir=install_dir,
            config_path=f"{install_dir}/{CONFIG_NAME}",
            plist_path=plist_path(product),
            agent_path=f"{install_dir}/{payload.agent}",
        )


def _visible(name: str) -> bool:
    # The Windows formats' rule: dot-files (build stamps, .DS_Store) are not part of the agent.
    return not name.startswith(".")


def is_macho(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] in _FAT_MAGICS:
        # A Java class file starts with the same magic, then its version (45 and up) where a
        # universal binary has its slice count; `file` tells them apart the same way.
        return len(head) == 8 and struct.unpack(">I", head[4:])[0] < 20
    return head[:4] in _MACHO_MAGICS


def bundle_executable(app: Path) -> str:
    """`Contents/MacOS/<CFBundleExecutable>` of a .app, relative to it; PayloadError naming the file."""
    info = app / "Contents" / "Info.plist"
    if not info.is_file():
        raise PayloadError(f"{info}: missing; {app.name} is not a complete .app bundle",
                           "a .app needs Contents/Info.plist naming its executable (CFBundleExecutable)")
    try:
        plist = plistlib.loads(info.read_bytes())
    except (plistlib.InvalidFileException, ValueError, OSError) as exc:
        raise PayloadError(f"{info}: not a readable property list ({type(exc).__name__})", "fix or regenerate it") from None
    name = plist.get("CFBundleExecutable") if isinstance(plist, dict) else None
    if not isinstance(name, str) or not name or "/" in name:
        raise PayloadError(f"{info}: no CFBundleExecutable", "name the bundle's executable in Contents/Info.plist")
    if not isinstance(plist.get("CFBundleIdentifier"), str) or not plist["CFBundleIdentifier"]:
        raise PayloadError(f"{info}: no CFBundleIdentifier", "give the bundle an identifier in Contents/Info.plist")
    exe = app / "Contents" / "MacOS" / name
    if not exe.is_file():
        raise PayloadError(f"{exe}: missing (named by {info.name} CFBundleExecutable)", "put the agent's executable there")
    return f"Contents/MacOS/{name}"


def check_payload(folder: Path) -> MacPayload:
    """The agent and the code to sign in the macOS payload folder, or PayloadError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PayloadError(f"{folder}: no such folder", "put the macOS agent there (make payload-test for the test agent)")
    refuse_symlinks(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        for name in [*dirnames, *filenames]:
            if not name.isprintable():
                raise PayloadError(f"{str(Path(dirpath) / name)!r}: the name has a control character", "rename it")
    top = sorted(p for p in folder.iterdir() if _visible(p.name))
    apps = [p for p in top if p.suffix == ".app" and p.is_dir() and not p.is_symlink()]
    executables = {app.name: bundle_executable(app) for app in apps}
    plain = folder / AGENT_NAME
    if plain.is_file():
        agent = AGENT_NAME
        if not os.access(plain, os.X_OK):
            raise PayloadError(f"{plain}: not executable", f"chmod +x {plain}")
    elif len(apps) == 1:
        agent = f"{apps[0].name}/{executables[apps[0].name]}"
    else:
        found = ", ".join(a.name for a in apps) or "none"
        raise PayloadError(f"{folder}: no agent to run (no `{AGENT_NAME}` executable, and .app bundles: {found})",
                           f"put the agent there as `{AGENT_NAME}` or as exactly one .app bundle")
    code = [app.name for app in apps]
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if _visible(d) and not (rel_dir == Path(".") and d.endswith(".app")))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _visible(name) and not path.is_symlink() and is_macho(path):
                code.append((rel_dir / name).as_posix())
    return MacPayload(folder=folder, agent=agent, code=tuple(sorted(code)))


def stage_root(payload: MacPayload, product: Product, root: Path) -> Layout:
    """The tree the Payload installs under "/": the agent folder and the LaunchDaemon plist."""
    layout = Layout.of(product, payload)
    if root.exists():
        shutil.rmtree(root)
    target = root / layout.install_dir.lstrip("/")
    shutil.copytree(payload.folder, target, symlinks=True,
                    ignore=lambda _d, names: [n for n in names if not _visible(n)])
    plist = root / layout.plist_path.lstrip("/")
    plist.parent.mkdir(parents=True, exist_ok=True)
    plist.write_text(render_launchdaemon(product, layout), encoding="utf-8")
    return layout


# ---------------------------------------------------------------------------------------------
# Templates


def render_launchdaemon(product: Product, layout: Layout) -> str:
    text = render.render("macos/launchdaemon.plist.j2", label=product.launchd_label,
                         agent_path=layout.agent_path, config_path=layout.config_path)
    parsed = plistlib.loads(text.encode())
    assert parsed["ProgramArguments"] == [layout.agent_path, "run", "--config", layout.config_path]
    return text


def render_package_info(product: Product, version: str, stats: PayloadStats) -> str:
    return render.render("macos/packageinfo.xml.j2", identifier=product.pkg_identifier, version=version,
                         number_of_files=stats.number_of_files, install_kbytes=stats.install_kbytes,
                         postinstall=POSTINSTALL)


def render_distribution(product: Product, version: str, stats: PayloadStats) -> str:
    return render.render("macos/distribution.dist.j2", title=product.name, identifier=product.pkg_identifier,
                         version=version, install_kbytes=stats.install_kbytes, component=COMPONENT)


def render_postinstall(product: Product, trust: Trust, enrollment: SignedEnrollment | None) -> str:
    """The postinstall script, with the release's pins. Holds the token in clear when
    `enrollment` is given (the signed enrollment, baked in)."""
    text = render.render(
        "macos/postinstall.sh.j2",
        install_dir=product.mac_install_folder,
        config_name=CONFIG_NAME,
        trust_name=TRUST_FILE,
        plist_path=plist_path(product),
        label=product.launchd_label,
        sidecar_name=sidecar_name(product),
        trust_json=trust.to_json_bytes().decode(),
        console_hosts=" ".join(trust.console_hosts),
        keys=[{"kid": k.kid, "pem": k.pem()} for k in trust.keys],
        enrollment=enrollment.jws.reveal() if enrollment is not None else None,
    )
    # What verify will read back must be what was meant: quoting round-trips or the build fails.
    if baked_jws(text, "rendered postinstall") != (enrollment.jws.reveal() if enrollment else None) \
            or baked_trust(text, "rendered postinstall") != trust:
        raise AssertionError("the baked enrollment or pins do not read back from the rendered postinstall")
    return text


def _baked_word(script: str, name: str, var: str) -> str | None:
    found = re.findall(rf"^{var}=(.*)$", script, re.MULTILINE)
    if not found:
        return None
    words = None
    try:
        words = shlex.split(found[0], comments=False, posix=True)
    except ValueError:
        pass
    if len(found) != 1 or words is None or len(words) > 1:
        raise EnrollmentError(f"{name}: the baked {var} is not one shell word", "rebuild the installer")
    return words[0] if words else ""


def baked_jws(script: str, name: str) -> str | None:
    """The signed enrollment a postinstall carries; None when it has none (a release's)."""
    return _baked_word(script, name, "baked") or None


def baked_trust(script: str, name: str) -> Trust | None:
    """The pins a postinstall writes to trust.json; None when it has none (an older pkg)."""
    raw = _baked_word(script, name, "trust_json")
    if raw is None:
        return None
    try:
        return Trust.from_json_bytes(raw.encode(), f"{name}: trust_json")
    except ConfigError:
        return None


# ---------------------------------------------------------------------------------------------
# gzip, in parallel and deterministic


GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, OS unknown
PAYLOAD_LEVEL = 6  # gzip's default; incompressible chunks are stored instead (see below)
CHUNK = 1 << 20
def _deflate_chunk(data: bytes, level: int) -> bytes:
    """Raw deflate blocks for `data`, ending on a byte boundary, not final: chunks made
    independently concatenate into one valid stream (as pigz does, without a shared window)."""
    compressor = zlib.compressobj(0 if udif.incompressible(data) else level, zlib.DEFLATED, -15, 9)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """A write-only gzip stream: 1 MiB chunks deflated in threads (zlib releases the GIL),
    written in order. The bytes depend only on the data and the level, not on the threads.
    Any gunzip reads it; gzip's mtime is 0 and no file name is stored."""

    def __init__(self, out: BinaryIO, level: int = PAYLOAD_LEVEL, workers: int | None = None):
        self._out = out
        self._level = level
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._pending: collections.deque[Future] = collections.deque()
        self._buffer = bytearray()
        self._crc = 0
        self._size = 0
        self.compressed = len(GZIP_HEADER)
        out.write(GZIP_HEADER)

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            chunk = bytes(self._buffer[:CHUNK])
            del self._buffer[:CHUNK]
            self._submit(chunk)
        return len(data)

    def _submit(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(_deflate_chunk, chunk, self._level))
        self._drain(2 * self._workers)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            packed = self._pending.popleft().result()
            self._out.write(packed)
            self.compressed += len(packed)

    def close(self) -> None:
        try:
            if self._buffer:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
            self._drain(0)
            final = zlib.compressobj(self._level, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty final block
            trailer = struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF)
            self._out.write(final + trailer)
            self.compressed += len(final) + len(trailer)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ParallelGzip":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The component package


def payload_entries(root: Path, epoch: int) -> list[TreeEntry]:
    return scan_tree(root, mtime=epoch, uid=ROOT_UID, gid=WHEEL_GID)


def write_payload(entries: list[TreeEntry], out: Path) -> PayloadStats:
    """The Payload member: a gzip-compressed odc cpio of `entries`."""
    with open(out, "wb") as raw, ParallelGzip(raw) as gz:
        return write_cpio_entries(entries, gz)


def scripts_archive(script: str, epoch: int) -> bytes:
    """The Scripts member: a gzip-compressed odc cpio of "." and "./postinstall" (0755, root:wheel).

    The script holds the token when baked: it touches the disk only as a 0600 file in a private
    temporary folder, removed at once."""
    with tempfile.TemporaryDirectory(prefix="builder-scripts-") as tmp:
        path = render.write_private(Path(tmp) / POSTINSTALL, script)
        entries = [
            TreeEntry("", "dir", stat.S_IFDIR | 0o755, ROOT_UID, WHEEL_GID, epoch, 0),
            TreeEntry(POSTINSTALL, "file", stat.S_IFREG | 0o755, ROOT_UID, WHEEL_GID, epoch,
                      path.stat().st_size, source=path),
        ]
        buffer = io.BytesIO()
        with ParallelGzip(buffer, workers=1) as gz:
            write_cpio_entries(entries, gz)
        return buffer.getvalue()


@dataclass(frozen=True)
class IdentityInfo:
    """What the formats need of a signing identity: no key material, so it may be cached."""

    subject: str
    not_before: dt.datetime
    not_after: dt.datetime


_identities: dict[tuple, IdentityInfo] = {}


def identity_info(key) -> IdentityInfo:
    """Subject and validity of `key`'s certificate. Opening a PKCS#12 costs ~0.2 s (its key
    derivation); a build asks several times, so the answer is kept per file version."""
    from builder.signing import apple

    st = os.stat(key.pkcs12)
    cache_key = (os.path.abspath(key.pkcs12), st.st_mtime_ns, st.st_size)
    if cache_key not in _identities:
        identity = apple.open_identity(key)
        cert = identity.certificate
        _identities[cache_key] = IdentityInfo(identity.subject, cert.not_valid_before_utc, cert.not_valid_after_utc)
    return _identities[cache_key]


def signing_time(epoch: int, key) -> dt.datetime:
    """The CMS signing time: SOURCE_DATE_EPOCH (reproducible signatures), moved into the signing
    certificate's validity when the epoch lies outside it."""
    info = identity_info(key)
    when = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return min(max(when, info.not_before), info.not_after)


# ---------------------------------------------------------------------------------------------
# Reading a pkg back


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


def _gunzip(data: bytes, what: str) -> io.BufferedIOBase:
    if data[:2] != b"\x1f\x8b":
        raise FormatError(f"{what} is not gzip-compressed")
    return gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")


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
                with _gunzip(data, "agent.pkg/Scripts") as stream:
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
    with _gunzip(data, "agent.pkg/Payload") as stream:
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

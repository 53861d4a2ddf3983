"""`builder release`: every format built and signed once per agent version, no enrollment inside.

EXE and MSI carry an empty, fixed-size enrollment slot inside their Authenticode signature
(builder/binfmt/slot.py); the pkg's postinstall reads a sidecar enrollment file. Every installer
carries the release's pins (enrollment public keys, console hosts) in signed bytes. The manifest
(`manifest.json`, written last) records each base file with size, sha256, signer, timestamp,
slot location, tool versions and SOURCE_DATE_EPOCH: everything a stamp needs, so stamping
never parses a signature or runs a tool it can avoid.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from builder import __version__, build, fileio, formats, log
from builder.config import Product
from builder.errors import FormatError, OutputError, VerificationError
from builder.fileio import write_atomic
from builder.signing.signers import Signers
from builder.tools import runner
from builder.trust import Trust

MANIFEST = "manifest.json"
SCHEMA = 1
# Tools whose versions go into the manifest: what a rebuild must match to reproduce a release.
_RECORDED_TOOLS = ("wixl", "makensis", "osslsigncode", "xorriso")


def check_out_folder(out: Path, version: str) -> None:
    """A release folder holds one version: building 1.0.1 into 1.0.0's folder would leave both
    sets of files beside a manifest naming one. OutputError before anything is built."""
    try:
        held = json.loads((Path(out) / MANIFEST).read_text()).get("version")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        raise OutputError(f"{{field}} {out}: holds an unreadable {MANIFEST}",
                          "give an empty folder per release, e.g. releases/" + version, field="out") from None
    if held != version:
        raise OutputError(f"{{field}} {out}: holds release {held}; a release folder holds one version",
                          f"give a folder per release, e.g. {Path(out).parent / version}", field="out")
    raise OutputError(f"{{field}} {out}: holds release {held} already",
                      "remove the folder to build it again, or give a new folder", field="out")


def release(*, format_names: list[str], product: Product, version: str, payload: Path, signers: Signers,
            trust: Trust, out: Path, source_date_epoch: int) -> dict:
    """Build every format into `out` and write the manifest last. Any failure leaves `out` as it
    found it (build.build places nothing on failure; what it placed is removed if a later step fails)."""
    check_out_folder(out, version)
    outputs = build.build(format_names=format_names, product=product, version=version, payload=payload,
                          enrollment=None, trust=trust, signers=signers, out=out, source_date_epoch=source_date_epoch)
    try:
        return _write_manifest(outputs, product=product, version=version, signers=signers, trust=trust, out=out,
                               source_date_epoch=source_date_epoch)
    except BaseException:
        for o in outputs:
            o.path.unlink(missing_ok=True)
        raise
    finally:
        # The summary build.build wrote is superseded by the manifest (or by the error).
        for stale in out.glob("*.summary.json"):
            stale.unlink(missing_ok=True)


def _write_manifest(outputs, *, product: Product, version: str, signers: Signers, trust: Trust, out: Path,
                    source_date_epoch: int) -> dict:
    files = {}
    for o in outputs:
        fmt = formats.get(o.format)
        entry = {"file": o.path.name, "size": o.size, "sha256": o.sha256, "signer": o.signer,
                 "timestamp": o.details.get("timestamp"), "notarized": o.notarized,
                 "notarization": o.details.get("notarization")}
        # An unsigned release has no slot (stamp --format exe|msi-tagged refuses it).
        entry.update(fmt.release_entry(o.path, product, signed=not signers.unsigned))
        files[o.format] = entry
    manifest = {
        "schema": SCHEMA,
        "builder": __version__,
        "version": version,
        "product": {k: getattr(product, k) for k in product.__dataclass_fields__},
        "source_date_epoch": source_date_epoch,
        "signed": not signers.unsigned,
        # The pins every installer of this release carries in signed bytes (trust.json): a stamp
        # is refused unless its enrollment key and console host are among them.
        "trust": json.loads(trust.to_json_bytes()),
        "tools": {name: runner.version(runner.TOOLS[name]) for name in _RECORDED_TOOLS},
        "files": files,
    }
    try:
        write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as exc:
        raise OutputError(f"{{field}} {out}: cannot write {MANIFEST} ({exc.strerror or exc})", "check free space and permissions", field="out") from None
    return manifest


@dataclass(frozen=True)
class ReleaseFile:
    format: str
    path: Path
    entry: dict

    @property
    def slot(self) -> dict | None:
        return self.entry.get("slot")


@dataclass(frozen=True)
class Release:
    """A release folder opened once: manifest read; each file checked against it (existence,
    size, sha256 and, for a signed release, its signature) once, before anything uses it."""

    folder: Path
    manifest: dict
    ca: Path | None = None
    verify: bool = True
    # Only files signed under a root this host trusts (the service): an unsigned release, or an
    # untrusted root, is refused instead of warned about.
    signed_only: bool = False
    # Formats whose file passed its checks in this Release: `file()` checks a format once.
    _checked: set = field(default_factory=set, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def product(self) -> Product:
        return self._product

    def trust(self) -> Trust:
        return self._trust

    # Read from the manifest once per Release: every stamp (and every request) asks for them.
    @functools.cached_property
    def _product(self) -> Product:
        fields = dict(self.manifest["product"])
        fields["console_hosts"] = tuple(fields.get("console_hosts") or ())
        return Product(**fields)

    @functools.cached_property
    def _trust(self) -> Trust:
        if "trust" not in self.manifest:
            raise FormatError(f"release {self.folder} pins no enrollment keys (made by an older builder)",
                              "build the release again: its agents would refuse every enrollment")
        return Trust.from_json_bytes(json.dumps(self.manifest["trust"]).encode(), f"release {self.folder}")

    def file(self, fmt: str) -> ReleaseFile:
        """The release's `fmt` file, checked against the manifest (and its signature verified)
        the first time it is asked for: nothing reads a base file that was not checked."""
        f = self._entry(fmt)
        if fmt not in self._checked:
            with self._lock:
                if fmt not in self._checked:
                    self._check(f)
                    self._checked.add(fmt)
        return f

    def verify_all(self) -> None:
        """Check every format's file now (what `open` does unless `lazy`)."""
        for fmt in self.manifest["files"]:
            self.file(fmt)

    def _entry(self, fmt: str) -> ReleaseFile:
        entry = self.manifest["files"].get(fmt)
        if entry is None:
            raise FormatError(f"release {self.folder} has no {fmt} installer", f"it has: {', '.join(self.manifest['files'])}")
        name = entry.get("file") if isinstance(entry, dict) else None
        # A name, never a path: an edited manifest must not point a stamp outside the release.
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise FormatError(f"release {self.folder}: the manifest's {fmt} file is not a file name in the release",
                              "re-run `builder release`")
        return ReleaseFile(fmt, self.folder / name, entry)

    def _check(self, f: ReleaseFile) -> None:
        try:
            st = os.lstat(f.path)
        except OSError:
            st = None
        # lstat: a link planted in place of a release file is refused, not followed (whatever it
        # points at now could change between the check and the stamp that reads it).
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != f.entry["size"]:
            what = "is a link or not a regular file" if st is not None and not stat.S_ISREG(st.st_mode) else \
                "is missing or has changed size"
            raise FormatError(f"release file {f.path} {what}", "re-run `builder release`")
        if not self.verify:
            return
        if self.signed_only and not self.manifest.get("signed"):
            raise UntrustedRelease(f"release {self.folder} is unsigned", "publish a signed release (`builder release` with signing keys)")
        digest = fileio.sha256_file(f.path)
        if digest != f.entry["sha256"]:
            raise VerificationError(f"release file {f.path} does not match its sha256 in the manifest", "re-run `builder release`")
        # The file is the one the manifest names (its hash matched): its signature needs
        # checking once per file and CA in a process, not on every open.
        if self.manifest.get("signed"):
            known = _verified.get(self._key(f))  # None: not checked; False: only its root was untrusted
            if known is None or (self.signed_only and not known):
                _verified[self._key(f)] = _check_signature(f, self.ca, strict=self.signed_only)

    def _key(self, f: ReleaseFile) -> tuple:
        return (str(f.path.resolve()), f.format, f.entry["sha256"], str(self.ca) if self.ca else None)

    def require_trusted_signature(self, fmt: str) -> ReleaseFile:
        """The `fmt` file, when a signature this machine trusts vouches for it: what a stamp
        that signs again may sign (it vouches, with the vendor's key, for the pins and console
        hosts inside). VerificationError for an unsigned release, or one signed under a root
        that is neither a system root nor --ca's (which opening only warns about)."""
        f = self.file(fmt)
        if not self.manifest.get("signed"):
            raise UntrustedRelease(f"release {self.folder} is unsigned: signing its {fmt} again would vouch for bytes "
                                    "no one signed", "stamp it with --no-sign (development), or stamp a signed release")
        if not _verified.get(self._key(f)):  # not checked in this process, or its root not trusted
            _verified[self._key(f)] = _check_signature(f, self.ca, strict=True)
        return f

    @classmethod
    def open(cls, folder: Path, *, ca: Path | None = None, verify: bool = True, lazy: bool = False,
             signed_only: bool = False) -> "Release":
        """Read the manifest and check every base file's size and sha256 and, with `verify`,
        its signature: a release whose files changed since it was made is refused here, once,
        not on every stamp. With `lazy`, each format's file is checked the first time `file()`
        asks for it instead (a stamp of one format pays for that format only); what is refused
        and with which error is the same. With `signed_only` (the service), a release that is
        unsigned or signed under a root this host does not trust is refused (UntrustedRelease),
        not warned about."""
        path = Path(folder) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise FormatError(f"{{field}} {folder}: no {MANIFEST}", "give a folder made by `builder release`", field="release") from None
        except (OSError, ValueError) as exc:
            raise FormatError(f"{{field}} {folder}: {MANIFEST} is unreadable ({exc.__class__.__name__})", "re-run `builder release`", field="release") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            got = manifest.get("schema") if isinstance(manifest, dict) else None
            raise FormatError(f"{{field}} {folder}: manifest schema {got} is not {SCHEMA}", "re-run `builder release` with this builder", field="release")
        if not isinstance(manifest.get("files"), dict):
            raise FormatError(f"{{field}} {folder}: {MANIFEST} lists no files", "re-run `builder release`", field="release")
        rel = cls(Path(folder), manifest, ca, verify, signed_only)
        if not lazy:
            rel.verify_all()
        log.debug(f"release {folder} {rel.version}: {', '.join(manifest['files'])}")
        return rel


class UntrustedRelease(VerificationError):
    """A release no trusted signature vouches for, asked to be signed again (a baked msi, a pkg,
    a dmg): unsigned, or signed under a root this machine does not trust."""


# (release file, format, its sha256, CA) whose signatures verified in this process -> whether
# their chain ends at a trusted root (False: only the root was missing, and opening warned).
_verified: dict[tuple, bool] = {}


def _signatures(report: dict) -> list[dict]:
    found = [report.get("signature"), report.get("pkg_signature"), (report.get("uninstaller") or {}).get("signature")]
    return [s for s in found if s]


def _check_signature(f: ReleaseFile, ca: Path | None, *, strict: bool = False) -> bool:
    """VerificationError unless `f`'s signatures verify; True when their chain ends at a trusted
    root. A chain that fails only because its root is not trusted here is a warning without
    --ca (the file's hash matches the manifest the release wrote after verifying it; False) and
    an error with a --ca that lacks the root, or when `strict`."""
    fmt = formats.get(f.format)
    report = fmt.verify(f.path, ca)
    if report.get("ok"):
        return True
    failing = [s for s in _signatures(report) if not s.get("ok")]
    root_only = bool(failing) and all(s.get("root_missing") for s in failing) and fmt.inspect(f.path).get("ok")
    detail = "; ".join(str(s.get("detail")) for s in failing) or report.get("detail")
    if root_only and ca is None and strict:
        raise UntrustedRelease(f"release {f.format}: {f.path.name} is signed under a root this machine does not trust "
                               "(what is signed again, or served, must be vouched for by a trusted signature)",
                               "give --ca the root certificate the release was signed under")
    if root_only and ca is None:
        log.warning(f"release {f.format}: {f.path.name} is signed by a root this machine does not trust; its hash "
                    "matches the manifest, its chain is not checked (give --ca ROOT.pem to check it)")
        return False
    if root_only:
        raise VerificationError(f"release {f.format}: {f.path.name}'s signing root is not in --ca {ca} ({detail})",
                                f"give --ca the root certificate the release's {f.format} was signed under")
    raise VerificationError(f"release {f.format}: {f.path}: signature does not verify ({detail})",
                            "re-run `builder release`" + ("" if ca else ", or give --ca ROOT.pem if its root is private"))

"""`builder release`: every format built and signed once per agent version, no enrollment inside.

EXE and MSI carry an empty, fixed-size enrollment slot inside their Authenticode signature
(builder/binfmt/slot.py); the pkg's postinstall reads a sidecar enrollment file. Every installer
carries the release's pins (enrollment public keys, console hosts) in signed bytes. The manifest
(`manifest.json`, written last) records each base file with size, sha256, signer, timestamp,
slot location, tool versions and SOURCE_DATE_EPOCH: everything a stamp needs, so stamping
never parses a signature or runs a tool it can avoid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from builder import __version__, build, formats, log
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
        raise OutputError(f"--out {out}: holds an unreadable {MANIFEST}",
                          "give an empty folder per release, e.g. releases/" + version) from None
    if held != version:
        raise OutputError(f"--out {out}: holds release {held}; a release folder holds one version",
                          f"give a folder per release, e.g. {Path(out).parent / version}")
    raise OutputError(f"--out {out}: holds release {held} already",
                      "remove the folder to build it again, or give a new folder")


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
        raise OutputError(f"--out {out}: cannot write {MANIFEST} ({exc.strerror or exc})", "check free space and permissions") from None
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
    """A release folder opened once: manifest read, files checked against it."""

    folder: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def product(self) -> Product:
        fields = dict(self.manifest["product"])
        fields["console_hosts"] = tuple(fields.get("console_hosts") or ())
        return Product(**fields)

    def trust(self) -> Trust:
        if "trust" not in self.manifest:
            raise FormatError(f"release {self.folder} pins no enrollment keys (made by an older builder)",
                              "build the release again: its agents would refuse every enrollment")
        return Trust.from_json_bytes(json.dumps(self.manifest["trust"]).encode(), f"release {self.folder}")

    def file(self, fmt: str) -> ReleaseFile:
        entry = self.manifest["files"].get(fmt)
        if entry is None:
            raise FormatError(f"release {self.folder} has no {fmt} installer", f"it has: {', '.join(self.manifest['files'])}")
        return ReleaseFile(fmt, self.folder / entry["file"], entry)

    @classmethod
    def open(cls, folder: Path, *, ca: Path | None = None, verify: bool = True) -> "Release":
        """Read the manifest and check every base file's size and sha256 and, with `verify`,
        its signature: a release whose files changed since it was made is refused here,
        once, not on every stamp."""
        path = Path(folder) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise FormatError(f"--release {folder}: no {MANIFEST}", "give a folder made by `builder release`") from None
        except (OSError, ValueError) as exc:
            raise FormatError(f"--release {folder}: {MANIFEST} is unreadable ({exc.__class__.__name__})", "re-run `builder release`") from None
        if manifest.get("schema") != SCHEMA:
            raise FormatError(f"--release {folder}: manifest schema {manifest.get('schema')} is not {SCHEMA}", "re-run `builder release` with this builder")
        rel = cls(Path(folder), manifest)
        hashes = []
        for fmt in manifest["files"]:
            f = rel.file(fmt)
            if not f.path.is_file() or f.path.stat().st_size != f.entry["size"]:
                raise FormatError(f"release file {f.path} is missing or has changed size", "re-run `builder release`")
            if verify:
                digest = build.sha256_file(f.path)
                if digest != f.entry["sha256"]:
                    raise VerificationError(f"release file {f.path} does not match its sha256 in the manifest", "re-run `builder release`")
                hashes.append(digest)
        # The files are the ones the manifest names (their hashes matched): their signatures
        # need checking once per release and CA in a process, not on every open.
        key = (str(Path(folder).resolve()), tuple(hashes), str(ca) if ca else None)
        if verify and manifest.get("signed") and key not in _verified:
            for fmt in manifest["files"]:
                _check_signature(rel.file(fmt), ca)
            _verified.add(key)
        log.debug(f"release {folder} {rel.version}: {', '.join(manifest['files'])}")
        return rel


# (release folder, file hashes, CA) whose signatures verified in this process.
_verified: set[tuple] = set()


def _signatures(report: dict) -> list[dict]:
    found = [report.get("signature"), report.get("pkg_signature"), (report.get("uninstaller") or {}).get("signature")]
    return [s for s in found if s]


def _check_signature(f: ReleaseFile, ca: Path | None) -> None:
    """VerificationError unless `f`'s signatures verify. A chain that fails only because its root
    is not trusted here is a warning without --ca (the file's hash matches the manifest the
    release wrote after verifying it) and an error with a --ca that lacks the root."""
    fmt = formats.get(f.format)
    report = fmt.verify(f.path, ca)
    if report.get("ok"):
        return
    failing = [s for s in _signatures(report) if not s.get("ok")]
    root_only = bool(failing) and all(s.get("root_missing") for s in failing) and fmt.inspect(f.path).get("ok")
    detail = "; ".join(str(s.get("detail")) for s in failing) or report.get("detail")
    if root_only and ca is None:
        log.warning(f"release {f.format}: {f.path.name} is signed by a root this machine does not trust; its hash "
                    "matches the manifest, its chain is not checked (give --ca ROOT.pem to check it)")
        return
    if root_only:
        raise VerificationError(f"release {f.format}: {f.path.name}'s signing root is not in --ca {ca} ({detail})",
                                f"give --ca the root certificate the release's {f.format} was signed under")
    raise VerificationError(f"release {f.format}: {f.path}: signature does not verify ({detail})",
                            "re-run `builder release`" + ("" if ca else ", or give --ca ROOT.pem if its root is private"))

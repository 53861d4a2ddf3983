"""`builder release`: every format built and signed once per agent version, no enrollment inside.

EXE and MSI carry an empty, fixed-size enrollment slot inside their Authenticode signature
(builder/binfmt/slot.py); the pkg's postinstall reads a sidecar enrollment file. The manifest
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
from builder.formats.base import Signers
from builder.tools import runner

MANIFEST = "manifest.json"
SCHEMA = 1
# Tools whose versions go into the manifest: what a rebuild must match to reproduce a release.
_RECORDED_TOOLS = ("wixl", "makensis", "osslsigncode", "xorriso")


def release(*, format_names: list[str], product: Product, version: str, payload: Path, signers: Signers,
            out: Path, source_date_epoch: int) -> dict:
    outputs = build.build(format_names=format_names, product=product, version=version, payload=payload,
                          enrollment=None, signers=signers, out=out, source_date_epoch=source_date_epoch)
    files = {}
    for o in outputs:
        fmt = formats.get(o.format)
        entry = {"file": o.path.name, "size": o.size, "sha256": o.sha256, "signer": o.signer,
                 "timestamp": o.details.get("timestamp"), "notarized": o.notarized}
        entry.update(fmt.release_entry(o.path, product) if hasattr(fmt, "release_entry") else {})
        files[o.format] = entry
    manifest = {
        "schema": SCHEMA,
        "builder": __version__,
        "version": version,
        "product": {k: getattr(product, k) for k in product.__dataclass_fields__},
        "source_date_epoch": source_date_epoch,
        "signed": not signers.unsigned,
        "tools": {name: runner.version(runner.TOOLS[name]) for name in _RECORDED_TOOLS},
        "files": files,
    }
    try:
        write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write {MANIFEST} ({exc.strerror or exc})", "check free space and permissions") from None
    # The summary build.build wrote is superseded by the manifest.
    for stale in out.glob("*.summary.json"):
        stale.unlink()
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
        return Product(**self.manifest["product"])

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
        for fmt in manifest["files"]:
            f = rel.file(fmt)
            if not f.path.is_file() or f.path.stat().st_size != f.entry["size"]:
                raise FormatError(f"release file {f.path} is missing or has changed size", "re-run `builder release`")
            if verify:
                if build.sha256_file(f.path) != f.entry["sha256"]:
                    raise VerificationError(f"release file {f.path} does not match its sha256 in the manifest", "re-run `builder release`")
                if manifest.get("signed"):
                    report = formats.get(fmt).verify(f.path, ca)
                    if not (report.get("signature") or {}).get("ok"):
                        raise VerificationError(f"release file {f.path}: signature does not verify ({(report.get('signature') or {}).get('detail')})",
                                                "re-run `builder release`, or give the right --ca")
        log.debug(f"release {folder} {rel.version}: {', '.join(manifest['files'])}")
        return rel

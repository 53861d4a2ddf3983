"""The releases a service serves: listed from storage, downloaded once into its cache, verified
once, refused (with a reason that names no path of this host) when they do not verify.

Published releases never change, so what is opened or refused stays so for the process's life.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from builder import formats, log
from builder.config import is_version, version_key
from builder.errors import FormatError, StorageError, VerificationError
from builder.fileio import write_atomic
from builder.release import MANIFEST, Release
from builder.service.problems import FormatNotInRelease, ReleaseRefused, UnknownRelease
from builder.storage import ObjectNotFoundError, Store
from builder.storage.published import index_key, parse_index, published_versions

VERIFIED_MARKER = ".verified-index.json"
VERSIONS_TTL_S = 5.0

# Why a release is refused, in words that name no path of this host (for /healthz and answers).
REFUSAL_REASONS = {
    "signature": "a signature does not verify with the CA this service trusts",
    "checksum": "a file does not match the sha256 its manifest or index gives",
    "malformed": "its index, manifest or files are not what builder publishes",
    "incomplete": "an object its index names is missing from storage",
}


def stamp_formats(rel: Release) -> list[str]:
    """The formats a release can be stamped into (msi-tagged from its msi, dmg from its pkg)."""
    return formats.kinds_of(rel.manifest["files"])


def warn_line(message: str) -> None:
    """A warning on one line however long: log.warning wraps at the terminal's width (80
    columns when stderr is a file), which splits one event over several log lines."""
    log.console.print(f"[bold yellow]warning:[/] {escape(log.redact(message))}", soft_wrap=True)


class Damaged(VerificationError):
    """A release object that is missing or does not match the release's index."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Refusal:
    version: str
    reason: str  # a key of REFUSAL_REASONS
    detail: str  # the whole error, for the log: it may name this host's paths and options

    @property
    def why(self) -> str:
        return REFUSAL_REASONS[self.reason]

    @classmethod
    def of(cls, version: str, exc: Exception) -> "Refusal":
        if isinstance(exc, Damaged):
            reason = exc.reason
        elif isinstance(exc, VerificationError):
            reason = "checksum" if "does not match its sha256" in str(exc) else "signature"
        else:
            reason = "malformed"
        return cls(version, reason, log.redact(str(exc)))

    def error(self) -> ReleaseRefused:
        return ReleaseRefused(f"release {self.version} does not verify on this service ({self.why})",
                              "ask for another release or for latest; the service's operators see why in its log and /healthz")


class ReleaseCache:
    """The published releases under `prefix` in `store`, opened from copies in `cache_dir`.
    Thread-safe; one per process."""

    def __init__(self, store: Store, cache_dir: Path, prefix: str, ca: Path | None, *, signed_only: bool = True):
        self.store = store
        self.cache_dir = cache_dir
        self.prefix = prefix
        self.ca = ca
        # Serve only releases whose every file is signed under a root this host trusts (the
        # system's or --ca's); False only for a service that signs nothing itself (--no-sign).
        self.signed_only = signed_only
        self._opened: dict[str, tuple[Release, dict]] = {}
        self._refused: dict[str, Refusal] = {}
        self._open_lock = threading.Lock()  # held while a release is fetched and verified
        self._states_lock = threading.Lock()  # what /healthz reads meanwhile: held for a copy
        self._versions: tuple[float, list[str]] | None = None

    def versions(self) -> list[str]:
        """Published versions, oldest first; listed at most once per VERSIONS_TTL_S seconds."""
        now = time.monotonic()
        if self._versions is not None and now - self._versions[0] < VERSIONS_TTL_S:
            return self._versions[1]
        versions = published_versions(self.store, self.prefix)
        self._versions = (now, versions)
        return versions

    def resolve(self, release: str, fmt: str | None = None) -> str:
        """The version a request names. `latest` is the newest release that verifies here and
        has `fmt` (any format when None): a Windows-only release does not hide the last pkg, and a
        release that does not verify is skipped. A named version must have `fmt`."""
        if release != "latest":
            if not is_version(release):
                raise UnknownRelease(f"release {release!r} is not a version or 'latest'", "for example 1.2.3")
            if fmt is not None:
                self._require_format(self.open(release)[0], release, fmt)
            return release
        versions = self.versions()
        if not versions:
            raise UnknownRelease("no release is published yet", "publish one with `builder publish`")
        refused = []
        for version in reversed(versions):
            try:
                rel = self.open(version)[0]
            except ReleaseRefused:
                refused.append(version)
                continue
            if fmt is None or formats.kind(fmt).base in rel.manifest["files"]:
                return version
        if len(refused) == len(versions):
            raise ReleaseRefused(f"no published release verifies on this service (refused: {', '.join(refused)})",
                                 "its operators must publish a release signed under the CA the service trusts")
        skipped = f" (releases that do not verify were skipped: {', '.join(refused)})" if refused else ""
        raise FormatNotInRelease(f"no published release has a {fmt} installer{skipped}",
                                 f"ask for one of: {', '.join(self._formats_published())}")

    @staticmethod
    def _require_format(rel: Release, version: str, fmt: str) -> None:
        if formats.kind(fmt).base not in rel.manifest["files"]:
            raise FormatNotInRelease(f"release {version} has no {fmt} installer",
                                     f"it has {', '.join(stamp_formats(rel))}; ask for one of those, or for release latest")

    def _formats_published(self) -> list[str]:
        with self._states_lock:
            opened = [rel for rel, _index in self._opened.values()]
        return sorted({f for rel in opened for f in stamp_formats(rel)}) or ["none"]

    def states(self) -> tuple[list[str], dict[str, Refusal]]:
        """(versions opened and verified, oldest first; refused versions -> why). What this
        process knows, without asking storage, nor waiting for a release being verified: for
        /healthz and /metrics."""
        with self._states_lock:
            ok, refused = list(self._opened), dict(self._refused)
        return sorted(ok, key=version_key), {v: refused[v] for v in sorted(refused, key=version_key)}

    def formats_of(self, version: str) -> list[str]:
        return stamp_formats(self.open(version)[0])

    def open(self, version: str) -> tuple[Release, dict]:
        """The release, downloaded once into the cache and verified once, and its storage index.
        A release that does not verify (signed under another CA, a file that does not match its
        hash, a malformed index) is refused, reported once, and refused again at once when asked:
        published releases never change."""
        with self._open_lock:
            if version in self._opened:
                return self._opened[version]
            if version in self._refused:
                raise self._refused[version].error()
            try:
                opened = self._fetch_and_open(version)
            except (FormatError, VerificationError, Damaged) as exc:
                refusal = Refusal.of(version, exc)
                with self._states_lock:
                    self._refused[version] = refusal
                warn_line(f"release {version} is refused, the service serves the others: {refusal.detail}")
                raise refusal.error() from None
            with self._states_lock:
                self._opened[version] = opened
            return opened

    def _fetch_and_open(self, version: str) -> tuple[Release, dict]:
        key = index_key(self.prefix, version)
        try:
            index_bytes = self.store.get(key)
        except ObjectNotFoundError:
            raise UnknownRelease(f"release {version} is not published", "GET /v1/releases lists what is") from None
        index = parse_index(index_bytes, f"release {version}: index {key}")  # names, keys, hashes checked
        folder = self.cache_dir / "releases" / version
        if not (folder / MANIFEST).is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.cache_dir))
            try:
                for name, entry in index["files"].items():
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    try:  # streamed: a 30 MB installer is not held in memory
                        digest, _ = self.store.download(entry["key"], staging / name)
                    except ObjectNotFoundError:
                        raise Damaged("incomplete", f"release {version}: object {entry['key']} named by its index is missing") from None
                    if digest != entry["sha256"]:
                        raise Damaged("checksum", f"release {version}: object {entry['key']} does not match its sha256")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging, folder)
            except OSError:  # another process won the race: use its copy
                shutil.rmtree(staging, ignore_errors=True)
        return self._open_cached(folder, index_bytes)

    def _open_cached(self, folder: Path, index_bytes: bytes) -> tuple[Release, dict]:
        """Release.open on the cached copy: with full verification (sha256 + signatures) the
        first time, and with a size check only when this cache already verified the same index
        under the same CA (a marker any process of this host writes after verifying): a service
        restarted with another CA verifies again."""
        marker = folder / VERIFIED_MARKER
        seen = marker.read_bytes() if marker.is_file() else None
        verified_as = (index_bytes + b"\0ca:" + (hashlib.sha256(self.ca.read_bytes()).hexdigest().encode() if self.ca else b"system")
                       + (b"\0signed-only" if self.signed_only else b""))
        rel = Release.open(folder, ca=self.ca, verify=seen != verified_as, signed_only=self.signed_only)
        if seen != verified_as:
            write_atomic(marker, verified_as)
        return rel, json.loads(index_bytes)

    def open_all(self) -> list[Release] | None:
        """Open and verify every published release now. A release that does not verify is
        reported (one line) and refused; the others are returned. Best effort: storage that is
        down now is reported, here (None) and when a request needs it."""
        try:
            versions = self.versions()
        except StorageError as exc:
            log.warning(f"releases not prepared ahead: {exc}")
            return None
        opened = []
        for version in versions:
            try:
                opened.append(self.open(version)[0])
            except (ReleaseRefused, UnknownRelease):
                continue  # reported by open; or gone since the listing
            except StorageError as exc:
                log.warning(f"releases not prepared ahead: {exc}")
                return None
        return opened

    def report_refused(self) -> None:
        ok, refused = self.states()
        if refused:
            warn_line(f"serving releases {', '.join(ok) or 'none'}; refused (do not verify): {', '.join(refused)}")

    def msi_name(self, version: str) -> str:
        """The file name of the release's MSI (what `msiexec /i` names in a ready command line)."""
        rel = self.open(version)[0]
        return rel.file("msi").path.name if "msi" in rel.manifest["files"] else "agent.msi"

    def default_console_url(self, version: str) -> str:
        return self.open(version)[0].product().console_url

    def download_name(self, version: str, group_id: str, fmt: str) -> str:
        """An ASCII file name for the browser: product, version, group."""
        product = self.open(version)[0].product()
        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in group_id)
        return f"{product.service_name}-{version}-{safe}{formats.kind(fmt).suffix}"

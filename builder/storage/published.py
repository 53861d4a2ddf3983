"""Releases published to storage: each one's index, publishing, listing and pruning.

Publishing a release folder stores every file as a content-addressed object, then the index LAST.
Layout under `prefix`:
    objects/<sha256[:2]>/<sha256><suffix>   each file's bytes (the release's manifest.json too)
    releases/<version>/index.json           {"format", "version", "files": {name: {key, sha256, size}}}

The index is created only after every object it names is present, with create-if-absent, so
a reader that finds it finds every file. Publishing the same folder again is a no-op (the index
bytes are deterministic: sorted, no timestamps); a different folder under the same version is
refused with ReleaseConflictError and changes nothing the index names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from builder import log
from builder.fileio import sha256_and_size
from builder.config import is_version, version_key
from builder.errors import FormatError, PayloadError, StorageError
from builder.storage.errors import ReleaseConflictError
from builder.storage.keys import content_key, is_valid_key, join_key, validate_key, validate_prefix
from builder.storage.store import Store

INDEX_FORMAT = "builder-release-index/1"
INDEX_NAME = "index.json"  # the index's object name under releases/<version>/
# The release folder's own manifest (builder.release.MANIFEST): published as one of its files.
RELEASE_MANIFEST = "manifest.json"
_SUFFIX_RE = re.compile(r"\.[A-Za-z0-9]{1,16}")


def index_key(prefix: str, version: str) -> str:
    """The key of release `version`'s index under `prefix`."""
    validate_key(version, "release version")
    if "/" in version:
        raise StorageError(f"release version {version!r} must be a single path segment")
    return join_key(validate_prefix(prefix), "releases", version, INDEX_NAME)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def parse_index(data: bytes, where: str) -> dict:
    """A release index read from storage, which is not trusted to hold one: JSON of this
    format, each file a relative name (validate_key: nothing climbs out of a folder it is
    written under) with an object key, a sha256 and a size. FormatError naming `where` else."""
    try:
        index = json.loads(data)
    except ValueError:
        raise FormatError(f"{where} is not JSON", "publish the release again") from None
    files = index.get("files") if isinstance(index, dict) else None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(files, dict):
        raise FormatError(f"{where} is not a release index", "publish the release again")
    for name, entry in files.items():
        if (not is_valid_key(name) or not isinstance(entry, dict) or not is_valid_key(entry.get("key"))
                or not isinstance(entry.get("sha256"), str) or not _SHA256_HEX.fullmatch(entry["sha256"])
                or type(entry.get("size")) is not int or entry["size"] < 0):
            raise FormatError(f"{where}: its entry {name[:80]!r} is not a file name in the release with an object "
                              "key, a sha256 and a size", "publish the release again")
    return index


def published_versions(store: Store, prefix: str) -> list[str]:
    """The versions with an index under `prefix`, oldest first: one listing, no index read."""
    seen = set()
    for obj in store.list(join_key(validate_prefix(prefix), "releases")):
        parts = obj.key.split("/")
        if parts[-1] == INDEX_NAME and is_version(parts[-2]):
            seen.add(parts[-2])
    return sorted(seen, key=version_key)


def _release_files(local_dir: Path) -> list[tuple[str, Path]]:
    if not (local_dir / RELEASE_MANIFEST).is_file():
        raise PayloadError(f"{local_dir} has no {RELEASE_MANIFEST}: the release is incomplete",
                           "build the release again; its manifest is written last")
    files = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_symlink():
            raise PayloadError(f"{path} is a symbolic link", "a release folder holds regular files only")
        if path.is_file():
            name = path.relative_to(local_dir).as_posix()
            validate_key(name, f"release file name {name!r}")
            files.append((name, path))
    return files


def publish_release(local_dir: Path, store: Store, prefix: str, *, version: str | None = None) -> str:
    """Upload `local_dir` (a release: signed base installers + manifest.json) under `prefix` and
    return the index's key. `version` defaults to the folder's name."""
    local_dir = Path(local_dir)
    version = version or local_dir.name
    ikey = index_key(prefix, version)
    objects = join_key(validate_prefix(prefix), "objects")

    entries = {}
    for name, path in _release_files(local_dir):
        sha, size = sha256_and_size(path)
        suffix = path.suffix if _SUFFIX_RE.fullmatch(path.suffix) else ""
        entries[name] = {"key": content_key(objects, sha, suffix), "sha256": sha, "size": size}
    index = (json.dumps({"format": INDEX_FORMAT, "version": version, "files": entries},
                        indent=2, sort_keys=True) + "\n").encode()

    def same_or_conflict(existing: bytes) -> str:
        if existing == index:
            log.debug(f"release {version} is already published as {ikey}")
            return ikey
        raise ReleaseConflictError(
            f"release {version} is already published at {store.url} with other content",
            "a published release never changes: publish the new build under a new version")

    if store.exists(ikey):
        return same_or_conflict(store.get(ikey))

    for name, entry in entries.items():
        result = store.put_if_absent(entry["key"], local_dir / name)
        if result.sha256 != entry["sha256"] or result.size != entry["size"]:
            raise StorageError(f"{local_dir / name} changed while it was published", "publish again")
        if not result.created:
            # Content-addressed: present means same bytes; the size check catches a truncated copy.
            if store.head(entry["key"]).size != entry["size"]:
                raise StorageError(f"storage {store.url}: object {entry['key']} has the wrong size",
                                   "it was not written by this tool; remove it and publish again")
        log.debug(f"release {version}: {name} -> {entry['key']} ({'uploaded' if result.created else 'present'})")

    if not store.put_if_absent(ikey, index).created:
        return same_or_conflict(store.get(ikey))
    return ikey


def published_releases(store: Store, prefix: str) -> list[dict]:
    """Every release published under `prefix`, oldest version first: {version, formats, signed,
    builder}, read from each index and the release manifest it names."""
    base = join_key(validate_prefix(prefix), "releases")
    found = []
    for info in store.list(base):
        if not info.key.endswith("/" + INDEX_NAME):
            continue
        index = parse_index(store.get(info.key), f"index {info.key}")
        entry = index["files"].get(RELEASE_MANIFEST)
        manifest = json.loads(store.get(entry["key"])) if entry else {}
        found.append({"version": index.get("version"), "formats": sorted(manifest.get("files", {})),
                      "signed": manifest.get("signed"), "builder": manifest.get("builder")})
    # Only MAJOR.MINOR.BUILD names are releases (what publish and the service accept).
    return sorted((r for r in found if is_version(r["version"])), key=lambda r: version_key(r["version"]))


def latest_per_format(releases: list[dict]) -> dict[str, str]:
    """format -> the newest version holding it, from published_releases() (oldest first)."""
    return {fmt: r["version"] for r in releases for fmt in r["formats"]}


def prune_plan(store: Store, prefix: str, keep: int) -> dict:
    """What `builder prune --keep N` removes: the releases older than the newest `keep` (the newest
    release of each format always stays: `latest` keeps meaning something for every format), the
    installers and records issued from them, and the objects no kept release names.

    Returns {"keep": [versions], "remove": [versions], "keys": [keys to delete, in a safe order]}:
    records first (no record may name a missing installer), then installers and stamps, then
    release indexes (no index may name a missing object), then the objects."""
    releases = published_releases(store, prefix)
    kept = {r["version"] for r in releases[-keep:]} | set(latest_per_format(releases).values())
    base = validate_prefix(prefix)
    indexes = {r["version"]: parse_index(store.get(index_key(base, r["version"])), f"release {r['version']}'s index")
               for r in releases}
    remove = [v for v in indexes if v not in kept]
    needed = {e["key"] for v in kept for e in indexes[v]["files"].values()}
    records, issued = [], []
    for info in store.list("records"):
        record = json.loads(store.get(info.key))
        if record.get("release") in remove:
            records.append(info.key)
            # Only what the service stores per installer: a record naming anything else (a
            # release object, another record) removes nothing but itself.
            if str(record.get("key", "")).startswith(("installers/", "stamps/")):
                issued.append(record["key"])
    objects = sorted({e["key"] for v in remove for e in indexes[v]["files"].values()} - needed)
    keys = records + sorted(set(issued)) + [index_key(base, v) for v in remove] + objects
    return {"keep": [r["version"] for r in releases if r["version"] in kept], "remove": remove, "keys": keys}


def prune(store: Store, plan: dict) -> None:
    for key in plan["keys"]:
        store.delete(key)

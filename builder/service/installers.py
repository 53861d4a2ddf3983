"""Stamped installers in storage, content-addressed and never overwritten:

    installers/<sha256[:2]>/<sha256><suffix>   a stamped installer
    stamps/<sha256[:2]>/<sha256>.json          a stamp document: a slot stamp described as pieces
                                               of its release object (base[0:off] + slot +
                                               base[off+len:]), which the download route streams

A store without presigned links (local disk) gets stamp documents: the service serves its
downloads anyway, so a few KiB are stored per group instead of a 30 MB copy. S3 and Azure need an
object to presign: the stamp is materialised there, server-side where the backend can.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from builder.fileio import iter_range
from builder.release import ReleaseFile
from builder.storage import Store, content_key

STAMP_FORMAT = "builder-stamp/1"
# Hash states of release prefixes (one per release file with a slot), least recently used out.
PREFIX_CACHE = 32


@dataclass(frozen=True)
class Stored:
    key: str
    sha256: str
    size: int
    streamed: bool  # `key` names a stamp document, not the installer's bytes


def store_slot_stamp(store: Store, base: ReleaseFile, base_key: str, pieces: list, suffix: str) -> Stored:
    """Store the slot stamp `pieces` (builder.stamp.stamp_ranges) of `base`, whose object is
    `base_key`: as a stamp document where the store has no presigned links, else as an object."""
    sha = pieces_sha256(base.path, pieces)
    size = base.entry["size"]
    if not store.presigned_links:
        key = content_key("stamps", sha, ".json")
        doc = {"format": STAMP_FORMAT, "base_key": base_key, "size": size, "sha256": sha,
               "pieces": [list(p) if p[0] == "base" else ["bytes", base64.b64encode(p[1]).decode()] for p in pieces]}
        store.put_if_absent(key, json.dumps(doc, sort_keys=True).encode())
        return Stored(key, sha, size, True)
    key = content_key("installers", sha, suffix)
    if not store.exists(key):
        store.put_pieces_if_absent(key, base_key, pieces)
    return Stored(key, sha, size, False)


def store_file(store: Store, path: Path, sha256: str, size: int, suffix: str) -> Stored:
    """Store a stamped installer written to `path` (a baked msi, a pkg, a dmg)."""
    key = content_key("installers", sha256, suffix)
    store.put_if_absent(key, path)
    return Stored(key, sha256, size, False)


def read_stamp_document(store: Store, key: str) -> tuple[str, list]:
    """(base object key, pieces) of the stamp document `key`, for Store.stream_pieces."""
    doc = json.loads(store.get(key))
    pieces = [("base", p[1], p[2]) if p[0] == "base" else ("bytes", base64.b64decode(p[1])) for p in doc["pieces"]]
    return doc["base_key"], pieces


def hash_prefix(base: ReleaseFile) -> None:
    """Hash the unchanged prefix of a slotted release file now (base[0:the slot's first
    extent], the first piece of every stamp of it), so that its first stamp does not pay for it."""
    pieces_sha256(base.path, [("base", 0, base.slot["extents"][0][0])])


_prefix_hashes: collections.OrderedDict[tuple[str, int], "hashlib._Hash"] = collections.OrderedDict()
_prefix_lock = threading.Lock()


def pieces_sha256(base: Path, pieces) -> str:
    """SHA-256 of the stamped file without writing it. The slot sits near the end of the base,
    so the hash state of the unchanged prefix (base[0:off]) is computed once per release and
    copied: a stamp then hashes only the slot and the few bytes after it."""
    pieces = list(pieces)
    h = None
    if pieces and pieces[0][0] == "base" and pieces[0][1] == 0:
        cache_key = (str(base), pieces[0][2])
        with _prefix_lock:
            cached = _prefix_hashes.get(cache_key)
            if cached is not None:
                _prefix_hashes.move_to_end(cache_key)
        if cached is None:
            cached = hashlib.sha256()
            _hash_range(base, 0, pieces[0][2], cached)
            with _prefix_lock:
                _prefix_hashes[cache_key] = cached
                while len(_prefix_hashes) > PREFIX_CACHE:
                    _prefix_hashes.popitem(last=False)
        h = cached.copy()
        pieces = pieces[1:]
    h = h or hashlib.sha256()
    for piece in pieces:
        if piece[0] == "bytes":
            h.update(piece[1])
        else:
            _hash_range(base, piece[1], piece[2], h)
    return h.hexdigest()


def _hash_range(base: Path, start: int, length: int, h) -> None:
    with open(base, "rb") as fh:
        for chunk in iter_range(fh, start, length, too_short=f"{base}: shorter than the release says"):
            h.update(chunk)

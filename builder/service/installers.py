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
import json
from dataclasses import dataclass
from pathlib import Path

from builder.release import ReleaseFile
from builder.stamp import pieces_sha256
from builder.storage import Store, content_key

STAMP_FORMAT = "builder-stamp/1"


@dataclass(frozen=True)
class Stored:
    key: str
    sha256: str
    size: int
    streamed: bool  # `key` names a stamp document, not the installer's bytes


def store_slot_stamp(store: Store, base: ReleaseFile, base_key: str, pieces: list, suffix: str) -> Stored:
    """Store the slot stamp `pieces` (builder.stamp.stamp_ranges) of `base`, whose object is
    `base_key`: as a stamp document where the store has no presigned links, else as an object."""
    sha = pieces_sha256(base.path, pieces)  # from the pieces: the stamp is never written here
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

"""Storage of releases and stamped installers: local disk, S3 or Azure behind one `Store`.

    store = open_store("s3://bucket/prefix", StorageSettings.from_env(os.environ))
    store.put_if_absent(key, path_or_bytes)              # create once, never overwrite
    store.put_pieces_if_absent(key, base_key, pieces)    # a stamp, server-side where possible
    store.stream_pieces(base_key, pieces)                # a stamp, streamed, not stored
    store.presigned_url(key, expires_s)                  # where store.presigned_links (S3, Azure)
    publish_release(folder, store, prefix)               # objects first, index last

Modules: store (the base and what every backend shares), local, s3, azure (one per backend),
remote (what s3 and azure share), backends (open_store: URL scheme -> backend), published (the
published releases' indexes), links (signed download links), keys, pieces, settings, errors.
"""

from builder.storage.backends import open_store
from builder.storage.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    ReleaseConflictError,
    StorageUnavailableError,
)
from builder.storage.keys import content_key, validate_key
from builder.storage.links import LinkStatus
from builder.storage.pieces import Piece
from builder.storage.published import index_key, publish_release
from builder.storage.settings import StorageSettings
from builder.storage.store import ObjectInfo, PutResult, StampResult, Store

__all__ = [
    "InvalidKeyError",
    "LinkStatus",
    "ObjectInfo",
    "ObjectNotFoundError",
    "Piece",
    "PutResult",
    "ReleaseConflictError",
    "StampResult",
    "StorageSettings",
    "StorageUnavailableError",
    "Store",
    "content_key",
    "index_key",
    "open_store",
    "publish_release",
    "validate_key",
]

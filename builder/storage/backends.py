"""The backends by URL scheme, and `open_store`: the one module that knows them all.

Backends import `store` (their base) and nothing imports them back but this module.
"""

from __future__ import annotations

from builder import log
from builder.errors import UsageError
from builder.storage.azure import AzureContainerStore
from builder.storage.local import LocalDiskStore
from builder.storage.s3 import S3BucketStore
from builder.storage.settings import StorageSettings
from builder.storage.store import Store

BACKENDS: dict[str, type[Store]] = {
    "file": LocalDiskStore,
    "s3": S3BucketStore,
    "s3a": S3BucketStore,
    "az": AzureContainerStore,
    "azure": AzureContainerStore,
    "abfs": AzureContainerStore,
}


def open_store(url: str, settings: StorageSettings | None = None) -> Store:
    """The store for `url`: file:///abs/path, s3://bucket[/prefix] or az://container[/prefix]."""
    settings = settings or StorageSettings()
    for secret in settings.secrets():
        log.register_secret(secret.reveal(), permanent=True)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise UsageError(f"unsupported storage URL scheme {scheme or url[:20]!r}",
                         "use file:///path, s3://bucket/prefix or az://container/prefix")
    return backend.from_url(url, settings)

"""What the S3 and Azure backends share: obstore's client and retry options, and bucket URLs."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit

from builder.errors import UsageError
from builder.storage.settings import StorageSettings


def obstore_client_options(settings: StorageSettings, endpoint: str | None) -> tuple[dict, dict]:
    """(client_options, retry_config) for an obstore S3Store or AzureStore."""
    client = {
        "connect_timeout": timedelta(seconds=settings.connect_timeout_s),
        "read_timeout": timedelta(seconds=settings.read_timeout_s),
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
    }
    retry = {
        "max_retries": settings.max_retries,
        "retry_timeout": timedelta(seconds=settings.retry_timeout_s),
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
    }
    return client, retry


def split_bucket_url(url: str, *, scheme: str, service: str, noun: str, valid: re.Pattern,
                     credentials_hint: str) -> tuple[str, str]:
    """(bucket or container, prefix) of an object-store URL, which must carry nothing else."""
    parts = urlsplit(url)
    name = parts.hostname or ""
    if parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError(f"an {scheme}:// storage URL carries only the {noun} and a prefix", credentials_hint)
    if not valid.fullmatch(name) or ".." in name:
        raise UsageError(f"{url!r} does not name a valid {service} {noun}", f"use {scheme}://{noun}-name/optional/prefix")
    return name, parts.path.strip("/")

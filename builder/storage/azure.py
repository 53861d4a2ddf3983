"""The Azure Blob store (`az://container/prefix`), all through obstore.

Create-if-absent is Put Blob with `If-None-Match: *` (obstore `mode="create"`), one request
with the object in memory once. Stamps take the generic path (built in memory once, then
created): Azure's server-side range copy (Put Block From URL) is not exposed by obstore.
Presigned URLs are service SAS URLs signed with the account key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from obstore.store import AzureStore

from builder.storage.keys import validate_key
from builder.storage.remote import obstore_client_options, split_bucket_url
from builder.storage.settings import StorageSettings
from builder.storage.store import PutResult, Store

_CONTAINER_RE = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")


class AzureContainerStore(Store):
    kind = "az"
    presigned_links = True
    pins_ranges_to_etag = True

    def __init__(self, container: str, prefix: str, settings: StorageSettings):
        creds = settings.azure_credentials()
        config: dict = {}
        endpoint = None
        if creds is not None:
            config = {"account_name": creds.account_name, "account_key": creds.account_key.reveal()}
            endpoint = creds.endpoint
            if endpoint:
                config["endpoint"] = endpoint
        client, retry = obstore_client_options(settings, endpoint)
        account = creds.account_name if creds else "?"
        url = f"az://{container}/{prefix}".rstrip("/") + f" (account {account}" + (f" at {endpoint})" if endpoint else ")")
        super().__init__(url, settings, prefix, AzureStore(container, config=config, client_options=client, retry_config=retry))
        self.container = container

    @classmethod
    def from_url(cls, url: str, settings: StorageSettings) -> "AzureContainerStore":
        container, prefix = split_bucket_url(url, scheme="az", service="Azure", noun="container", valid=_CONTAINER_RE,
                                             credentials_hint="put credentials in AZURE_STORAGE_CONNECTION_STRING")
        return cls(container, prefix, settings)

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview | Path) -> PutResult:
        validate_key(key)  # before any read: a bad key is refused with nothing done
        if isinstance(data, Path):
            with self._errors("read", str(data)):
                data = data.read_bytes()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("put_if_absent takes bytes or a pathlib.Path")
        view = memoryview(data)
        return PutResult(self._create(key, view), key, hashlib.sha256(view).hexdigest(), view.nbytes)

    def presigned_url(self, key: str, expires_s: int) -> str:
        return self._sign_with_obstore(key, expires_s)

"""Where storage lives and how to reach it: one frozen dataclass, resolved once by the caller.

`StorageSettings.from_env(environ)` is the only place the storage layer looks at environment
variables, and only at the mapping it is given (`builder.config.Environment.storage`). Secrets are
`Secret`s: masked in repr, registered with the log redactor when a store is opened.

Note: obstore's S3Store/AzureStore constructors also read AWS_* / AZURE_* variables of the
process for any option not passed explicitly; everything this project relies on is passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

from builder.enrollment import Secret
from builder.errors import UsageError

MIN_HMAC_KEY_CHARS = 32


def _check_endpoint(name: str, value: str | None) -> None:
    if value is None:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{name} must be an http:// or https:// URL", "for example http://127.0.0.1:8333")
    if parts.username or parts.password:
        raise UsageError(f"{name} must not carry credentials",
                         "put them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")


@dataclass(frozen=True)
class AzureCredentials:
    account_name: str
    account_key: Secret
    endpoint: str | None


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: Secret | None = None
    s3_session_token: Secret | None = None
    azure_connection_string: Secret | None = None
    azure_account_name: str | None = None
    azure_account_key: Secret | None = None
    azure_endpoint: str | None = None
    # Key of the HMAC that signs local-disk download links (the file:// store has no presigner).
    hmac_key: Secret | None = None
    # A refused or silent backend must fail in seconds, not after obstore's 3-minute default.
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_retries: int = 3
    retry_timeout_s: float = 20.0
    # What a service tells its clients (Retry-After) when the backend is unavailable.
    retry_after_s: int = 30

    def __post_init__(self) -> None:
        _check_endpoint("the S3 endpoint (AWS_ENDPOINT_URL)", self.s3_endpoint)
        _check_endpoint("the Azure endpoint", self.azure_endpoint)
        if self.hmac_key is not None and len(self.hmac_key.reveal()) < MIN_HMAC_KEY_CHARS:
            raise UsageError(f"BUILDER_STORAGE_HMAC_KEY must be at least {MIN_HMAC_KEY_CHARS} characters",
                             "generate one with: openssl rand -hex 32")
        if not (0 < self.connect_timeout_s <= 300 and 0 < self.read_timeout_s <= 3600 and 0 < self.retry_timeout_s <= 3600):
            raise UsageError("storage timeouts must be positive (connect <= 300 s, read and retry <= 3600 s)")
        if not 0 <= self.max_retries <= 10:
            raise UsageError("storage max_retries must be between 0 and 10")
        if not 1 <= self.retry_after_s <= 3600:
            raise UsageError("storage retry_after_s must be between 1 and 3600")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides) -> "StorageSettings":
        """Settings from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
        AWS_REGION, AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME +
        AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_ENDPOINT) and BUILDER_STORAGE_HMAC_KEY.
        Empty values count as unset; `overrides` (e.g. timeouts from the command line) win."""

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        def secret(name: str) -> Secret | None:
            value = get(name)
            return Secret(value) if value else None

        values = dict(
            s3_endpoint=get("AWS_ENDPOINT_URL"),
            s3_region=get("AWS_REGION") or "us-east-1",
            s3_access_key_id=get("AWS_ACCESS_KEY_ID"),
            s3_secret_access_key=secret("AWS_SECRET_ACCESS_KEY"),
            s3_session_token=secret("AWS_SESSION_TOKEN"),
            azure_connection_string=secret("AZURE_STORAGE_CONNECTION_STRING"),
            azure_account_name=get("AZURE_STORAGE_ACCOUNT_NAME"),
            azure_account_key=secret("AZURE_STORAGE_ACCOUNT_KEY"),
            azure_endpoint=get("AZURE_STORAGE_ENDPOINT"),
            hmac_key=secret("BUILDER_STORAGE_HMAC_KEY"),
        )
        values.update(overrides)
        return cls(**values)

    def secrets(self) -> list[Secret]:
        return [s for s in (self.s3_secret_access_key, self.s3_session_token, self.azure_connection_string,
                            self.azure_account_key, self.hmac_key) if s is not None]

    def azure_credentials(self) -> AzureCredentials | None:
        """Account, key and blob endpoint, from the connection string when given, else the separate values."""
        if self.azure_connection_string is not None:
            fields: dict[str, str] = {}
            for part in self.azure_connection_string.reveal().split(";"):
                name, sep, value = part.partition("=")
                if sep:
                    fields[name.strip()] = value.strip()
            if "AccountName" not in fields or "AccountKey" not in fields:
                raise UsageError("AZURE_STORAGE_CONNECTION_STRING lacks AccountName or AccountKey",
                                 "copy the connection string from the storage account's Access keys page")
            endpoint = fields.get("BlobEndpoint")
            _check_endpoint("BlobEndpoint in AZURE_STORAGE_CONNECTION_STRING", endpoint)
            return AzureCredentials(fields["AccountName"], Secret(fields["AccountKey"]), endpoint or self.azure_endpoint)
        if self.azure_account_name and self.azure_account_key:
            return AzureCredentials(self.azure_account_name, self.azure_account_key, self.azure_endpoint)
        return None

"""Building the issuer, the app and the workers from resolved options: shared by `builder
serve`, `builder worker` and `builder issue` (the demo's code path), so all three agree."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.config import Environment
from builder.errors import UsageError
from builder.signing.signers import Signers
from builder.service.issuer import Audit, Issuer
from builder.storage import StorageSettings, open_store

RELEASES_PREFIX = "dist"
AUDIT_FILE = "audit.sqlite"  # in --state


@dataclass(frozen=True, kw_only=True)
class ServiceOptions:
    storage_url: str
    state_dir: Path
    signers: Signers
    ca: Path | None = None
    redis_url: str | None = None
    enrollment_key: object | None = None  # builder.signing.enrollment_key.EnrollmentKey


def make_issuer(opts: ServiceOptions, env: Environment) -> Issuer:
    settings = StorageSettings.from_env(env.storage)
    store = open_store(opts.storage_url, settings)
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cache = opts.state_dir / "cache"
    cache.mkdir(exist_ok=True)
    issuer = Issuer(store, signers=opts.signers, cache_dir=cache, audit=Audit(opts.state_dir / AUDIT_FILE),
                    releases_prefix=RELEASES_PREFIX, ca=opts.ca, enrollment_key=opts.enrollment_key)
    if opts.redis_url:
        from builder.service import jobs

        issuer.queue = jobs.RedisQueue(opts.redis_url, jobs.fernet_from(env.queue_key))
    return issuer


def api_keys_from(env: Environment) -> dict[str, str]:
    from builder.service.app import ServiceSettings

    if env.api_keys_file is not None:
        try:
            text = env.api_keys_file.read_text()
        except OSError as exc:
            raise UsageError(f"BUILDER_API_KEYS_FILE={env.api_keys_file}: cannot read it ({exc.strerror})",
                             "check the path") from None
    else:
        text = env.api_keys.reveal() if env.api_keys is not None else ""
    return ServiceSettings.parse_api_keys(text)


def link_secret_of(issuer: Issuer) -> bytes:
    """The HMAC key for local download links: BUILDER_STORAGE_HMAC_KEY, or one made for this
    process (links then stop working when it restarts, and differ between instances)."""
    key = issuer.store.settings.hmac_key
    if key is not None:
        return key.reveal().encode()
    if not issuer.store.presigned_links:
        log.warning("BUILDER_STORAGE_HMAC_KEY is not set: download links are signed with a key made for this "
                    "process and stop working when it restarts")
    return secrets.token_bytes(32)

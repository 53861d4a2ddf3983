"""Revoked enrollment tokens, in storage, shared by every service instance and worker:

    revocations/tokens/<token fingerprint>.json   a token that may no longer be handed out

The token alone names it: revoked for one group, it is refused for every account and group, so
a leaked token cannot be reused by asking for another group's installer.
"""

from __future__ import annotations

import hashlib
import json
import time

from builder.enrollment import Secret
from builder.storage import Store


def token_fingerprint(token: Secret) -> str:
    """The full SHA-256 of the token: the id under which it is revoked and audited."""
    return hashlib.sha256(token.reveal().encode()).hexdigest()


class Revocations:
    def __init__(self, store: Store):
        self.store = store

    @staticmethod
    def key(token_fp: str) -> str:
        return f"revocations/tokens/{token_fp}.json"

    def is_revoked(self, token_fp: str) -> bool:
        return self.store.exists(self.key(token_fp))

    def add(self, caller: str, account_id: str, group_id: str, token_fp: str) -> None:
        doc = json.dumps({"account_id": account_id, "group_id": group_id, "token_fingerprint": token_fp,
                          "revoked_at": int(time.time()), "by": caller}).encode()
        self.store.put_if_absent(self.key(token_fp), doc)  # a second revocation keeps the first

"""Records of issued installers, in storage: `records/<id>.json`, written after the installer
it names, create-if-absent, never changed. The id is the request's (`request_id`): the same
request twice gives the same id, so the record is what says an installer is ready, to any
service instance or worker.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from dataclasses import dataclass

from builder.enrollment import Enrollment
from builder.service.revocations import token_fingerprint
from builder.storage import ObjectNotFoundError, Store

# Finished records kept in memory (least recently used out): the ids the console asks about
# again, a few KiB each; a long-running service must not keep one per installer ever issued.
RECORD_CACHE = 1024


def request_id(release: str, fmt: str, enrollment: Enrollment) -> str:
    material = "\0".join([release, fmt, enrollment.account_id, enrollment.group_id, enrollment.console_url,
                          token_fingerprint(enrollment.token)])
    return hashlib.sha256(b"builder-installer-v1\0" + material.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Record:
    id: str
    release: str
    format: str
    key: str
    sha256: str
    size: int
    account_id: str
    group_id: str
    token_fingerprint: str
    # True: `key` names a stamp document (base object + slot bytes) that the download route
    # streams as base[0:off] + slot + base[off+len:], instead of a stored copy
    # (builder.service.installers).
    streamed: bool = False

    def as_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()


class Records:
    """The records in `store`, those found kept in memory (bounded). Thread-safe."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(installer_id: str) -> str:
        return f"records/{installer_id}.json"

    def get(self, installer_id: str) -> Record | None:
        """The record of a finished installer; a missing one is asked again next time."""
        with self._lock:
            rec = self._cache.get(installer_id)
            if rec is not None:
                self._cache.move_to_end(installer_id)
        if rec is not None:
            return rec
        try:
            rec = Record(**json.loads(self.store.get(self.key(installer_id))))
        except ObjectNotFoundError:
            return None
        with self._lock:
            self._cache[installer_id] = rec
            while len(self._cache) > RECORD_CACHE:
                self._cache.popitem(last=False)
        return rec

    def add(self, rec: Record) -> Record:
        """Write `rec` unless a record of its id is there; the stored one either way."""
        self.store.put_if_absent(self.key(rec.id), rec.as_json())
        return self.get(rec.id) or rec

"""The service's audit log: who was issued what, per service host, in SQLite, append-only.

It never holds a token, only its fingerprint (builder.service.revocations.token_fingerprint).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from builder.errors import UsageError


class Audit:
    """Append-only SQLite table: who was issued which installer, with which token fingerprint."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed row survives a crash of this process; only a power cut
            # can lose the last rows. FULL would fsync on every request.
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Appended to, seldom read: a small page cache (SQLite's default is 2 MB) keeps a
            # long-running service's memory from growing with the log.
            self._db.execute("PRAGMA cache_size=-256")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS audit (ts REAL NOT NULL, caller TEXT NOT NULL, action TEXT NOT NULL,"
                " installer_id TEXT, release TEXT, format TEXT, account_id TEXT, group_id TEXT,"
                " token_fingerprint TEXT, sha256 TEXT, detail TEXT)")
            # Append-only: the database itself refuses changes to what was recorded.
            self._db.execute("CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit"
                             " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")
            self._db.execute("CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit"
                             " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")

    def record(self, caller: str, action: str, *, installer_id=None, release=None, fmt=None, account_id=None,
               group_id=None, token_fp=None, sha256=None, detail=None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (time.time(), caller, action, installer_id, release, fmt, account_id, group_id,
                              token_fp, sha256, detail))

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM audit ORDER BY rowid")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    @staticmethod
    def read(path: Path, account_id: str, group_id: str | None = None) -> list[dict]:
        """An account's (or one group's) rows, oldest first, from a service's log opened read-only
        (`builder issued`: the service may be running and writing it)."""
        if not path.is_file():
            raise UsageError(f"--state {path.parent}: no audit log ({path.name})", "give the folder `builder serve --state` uses")
        query, params = "SELECT * FROM audit WHERE account_id = ?", [account_id]
        if group_id:
            query, params = query + " AND group_id = ?", [*params, group_id]
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cur = db.execute(query + " ORDER BY rowid", params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"--state {path.parent}: {path.name} is unreadable ({exc})",
                             "give the folder `builder serve --state` uses") from None
        finally:
            db.close()

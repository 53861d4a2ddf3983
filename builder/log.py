"""Steps, progress and the final summary, on stderr; every line passes through the redactor.

`redact()` replaces every registered secret value (enrollment tokens, signing passwords) before
text reaches the terminal, a log file or an exception message built from tool output.

The redactor keeps no secret in the clear: a secret is known by a keyed hash of its first
MIN_SECRET_CHARS characters and one of its whole value. `redact()` hashes the window at each
position of the text once, so its cost does not grow with the number of secrets. Values shorter
than MIN_SECRET_CHARS are not registered: a short "secret" such as `installer` would be masked
in every message that uses the word (real enrollment tokens, API keys and generated keys are
longer). Secrets of the process (API keys, signing passwords, storage keys) stay registered;
those of one request (enrollment tokens in `serve` and `worker`) are forgotten SECRET_TTL_S
after their last registration, and never more than MAX_SECRETS are kept.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
import time
from typing import Iterator

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)
logger = logging.getLogger("builder")

MIN_SECRET_CHARS = 16
# A request's token must stay registered while its request, or its queued job, can still print
# something: the service waits 20 s, a baked stamp's job may run for up to 600 s.
SECRET_TTL_S = 900.0
MAX_SECRETS = 10_000
# The step timings `make bench` reads: a long-running service drops the oldest.
MAX_TIMINGS = 1_000

_KEY = os.urandom(16)
_lock = threading.Lock()
# prefix window's hash -> {whole value's digest: length}. Read without the lock (one dict lookup
# is atomic); changed only under it.
_by_prefix: dict[int, dict[bytes, int]] = {}
# digest -> (prefix hash, forget at or None): expiring ones in registration order, oldest first.
_expiring: collections.OrderedDict[bytes, tuple[int, float]] = collections.OrderedDict()
_permanent: dict[bytes, int] = {}
_quiet = False
_timings: collections.deque[tuple[str, float]] = collections.deque(maxlen=MAX_TIMINGS)


def _digest(value: str) -> bytes:
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), key=_KEY, digest_size=16).digest()


def _window(text: str, start: int) -> int:
    # hash() of a str is keyed per process (SipHash); the whole value is checked by _digest.
    return hash(text[start:start + MIN_SECRET_CHARS])


def register_secret(value: str, *, permanent: bool = False) -> None:
    """From now on `value` is replaced by `***` in everything this module prints: for the life of
    the process with `permanent`, else for SECRET_TTL_S after the last registration. Only values
    that passed their own validation belong here; shorter than MIN_SECRET_CHARS is ignored."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        return
    digest, prefix = _digest(value), _window(value, 0)
    now = time.monotonic()
    with _lock:
        _by_prefix.setdefault(prefix, {})[digest] = len(value)
        if permanent:
            _permanent[digest] = prefix
            _expiring.pop(digest, None)
            return
        if digest in _permanent:
            return
        _expiring[digest] = (prefix, now + SECRET_TTL_S)
        _expiring.move_to_end(digest)
        while _expiring:
            oldest, (old_prefix, forget_at) = next(iter(_expiring.items()))
            if forget_at > now and len(_expiring) <= MAX_SECRETS:
                break
            del _expiring[oldest]
            bucket = _by_prefix.get(old_prefix)
            if bucket is not None:
                bucket.pop(oldest, None)
                if not bucket:
                    del _by_prefix[old_prefix]


def registered_secrets() -> int:
    """How many secrets the redactor holds (for tests and the soak run)."""
    with _lock:
        return len(_permanent) + len(_expiring)


def redact(text: str) -> str:
    if not _by_prefix or len(text) < MIN_SECRET_CHARS:
        return text
    out: list[str] = []
    start = i = 0
    end = len(text) - MIN_SECRET_CHARS
    while i <= end:
        bucket = _by_prefix.get(_window(text, i))
        if bucket:
            found = max((length for digest, length in list(bucket.items())
                         if i + length <= len(text) and _digest(text[i:i + length]) == digest), default=0)
            if found:
                out += (text[start:i], "***")
                i = start = i + found
                continue
        i += 1
    if not out:
        return text
    out.append(text[start:])
    return "".join(out)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


def setup(verbose: bool = False, quiet: bool = False) -> None:
    global _quiet
    _quiet = quiet
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("debug: %(message)s"))
    handler.addFilter(_RedactingFilter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False


def settings() -> dict:
    """What `setup` was given: for a helper process to print the same way."""
    return {"verbose": logger.level == logging.DEBUG, "quiet": _quiet}


def info(message: str) -> None:
    if not _quiet:
        console.print(redact(message))


def warning(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {redact(message)}")


def debug(message: str) -> None:
    logger.debug(message)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """One named piece of work: prints a tick and its duration, or a cross if it raised."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        if not _quiet:
            console.print(f"[red]✗[/] {redact(title)} [dim]({time.perf_counter() - start:.2f}s)[/]")
        raise
    seconds = time.perf_counter() - start
    with _lock:
        _timings.append((title, seconds))
    if not _quiet:
        console.print(f"[green]✓[/] {redact(title)} [dim]({seconds:.2f}s)[/]")


def take_timings() -> list[tuple[str, float]]:
    """The (title, seconds) of every step finished since the last call; for `make bench`."""
    with _lock:
        out = list(_timings)
        _timings.clear()
    return out


def summary_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    if _quiet:
        return
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(redact(str(c)) for c in row))
    console.print(table)

"""Steps, progress and the final summary, on stderr; every line passes through the redactor.

`redact()` replaces every registered secret value (enrollment tokens, signing passwords) before
text reaches the terminal, a log file or an exception message built from tool output.

The redactor keeps no secret in the clear: a secret is known by a keyed hash of its last
MIN_SECRET_CHARS characters (its most random part: JWTs share their first characters) and a
keyed 64-bit digest of its whole value. `redact()` hashes the window at each position of the
text once, so its cost does not grow with the number of secrets. Values shorter than
MIN_SECRET_CHARS are not registered: a short "secret" such as `installer` would be masked in
every message that uses the word (real enrollment tokens, API keys and generated keys are
longer). Secrets of the process (API keys, signing passwords, storage keys) stay registered;
those of one request (enrollment tokens in `serve` and `worker`) live in two generations that
turn over every SECRET_TTL_S: each is kept at least SECRET_TTL_S and at most twice that after
its last registration, and never more than MAX_SECRETS at once (about 120 bytes each).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Progress and diagnostics: stderr. soft_wrap: a long line (a path, a link) is never broken in
# two, whatever the width rich guesses for a pipe.
console = Console(stderr=True, highlight=False, soft_wrap=True)
logger = logging.getLogger("builder")

MIN_SECRET_CHARS = 16
# A request's token must stay registered while its request, or its queued job, can still print
# something: the service waits 20 s, a job may run for up to 600 s.
SECRET_TTL_S = 600.0
MAX_SECRETS = 10_000
# The step timings `make bench` reads: a long-running service drops the oldest.
MAX_TIMINGS = 1_000

_KEY = os.urandom(16)
_MASK64 = (1 << 64) - 1
_lock = threading.Lock()
# window hash -> (length << 64 | digest), or a tuple of those when windows collide. Each dict is
# read without the lock (one lookup is atomic) and changed or replaced only under it.
_permanent: dict[int, int | tuple[int, ...]] = {}
_current: dict[int, int | tuple[int, ...]] = {}
_previous: dict[int, int | tuple[int, ...]] = {}
_generation_started = time.monotonic()
_quiet = False
_timings: collections.deque[tuple[str, float]] = collections.deque(maxlen=MAX_TIMINGS)


def _digest(value: str) -> int:
    raw = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), key=_KEY, digest_size=8).digest()
    return int.from_bytes(raw, "big")


def _window(text: str, end: int) -> int:
    # hash() of a str is keyed per process (SipHash); the whole value is checked by _digest.
    return hash(text[end - MIN_SECRET_CHARS:end])


def _add(table: dict, window: int, entry: int) -> None:
    found = table.get(window)
    if found is None:
        table[window] = entry
    elif isinstance(found, int):
        if found != entry:
            table[window] = (found, entry)
    elif entry not in found:
        table[window] = (*found, entry)


def _turn_over(now: float) -> None:
    """Under the lock: start a new generation when the current one is SECRET_TTL_S old or full."""
    global _current, _previous, _generation_started
    age = now - _generation_started
    if age >= 2 * SECRET_TTL_S:
        _previous, _current, _generation_started = {}, {}, now
    elif age >= SECRET_TTL_S or len(_current) >= MAX_SECRETS // 2:
        _previous, _current, _generation_started = _current, {}, now


def register_secret(value: str, *, permanent: bool = False) -> None:
    """From now on `value` is replaced by `***` in everything this module prints: for the life of
    the process with `permanent`, else for SECRET_TTL_S to twice that after the last
    registration. Only values that passed their own validation belong here; values shorter than
    MIN_SECRET_CHARS are ignored."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        return
    window, entry = _window(value, len(value)), len(value) << 64 | _digest(value)
    with _lock:
        if permanent:
            _add(_permanent, window, entry)
            return
        _turn_over(time.monotonic())
        _add(_current, window, entry)


def registered_secrets() -> int:
    """How many secrets the redactor holds (for tests and the soak run)."""
    with _lock:
        tables = (_permanent, _current, _previous)
        return sum(1 if isinstance(v, int) else len(v) for t in tables for v in t.values())


def redact(text: str) -> str:
    if time.monotonic() - _generation_started >= SECRET_TTL_S:  # idle: let the old generation go
        with _lock:
            _turn_over(time.monotonic())
    tables = [t for t in (_permanent, _current, _previous) if t]
    if not tables or len(text) < MIN_SECRET_CHARS:
        return text
    spans: list[tuple[int, int]] = []
    width = MIN_SECRET_CHARS
    for end in range(width, len(text) + 1):
        window = hash(text[end - width:end])  # _window(text, end), inlined: this loop is the cost
        for table in tables:
            found = table.get(window)
            if found is None:
                continue
            for entry in (found,) if isinstance(found, int) else found:
                start = end - (entry >> 64)
                if start >= 0 and _digest(text[start:end]) == entry & _MASK64:
                    spans.append((start, end))
    if not spans:
        return text
    spans.sort()
    out, pos = [], 0
    merged_start, merged_end = spans[0]
    for start, end in spans[1:] + [(len(text) + 1, len(text) + 1)]:
        if start <= merged_end:
            merged_end = max(merged_end, end)
            continue
        out += (text[pos:merged_start], "***")
        pos = merged_end
        merged_start, merged_end = start, end
    out.append(text[pos:])
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
        console.print(escape(redact(message)))


def warning(message: str) -> None:
    if not _quiet:  # -q: errors and the result only
        console.print(f"[bold yellow]warning:[/] {escape(redact(message))}")


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
            console.print(f"[red]✗[/] {escape(redact(title))} [dim]({time.perf_counter() - start:.2f}s)[/]")
        raise
    seconds = time.perf_counter() - start
    with _lock:
        _timings.append((title, seconds))
    if not _quiet:
        console.print(f"[green]✓[/] {escape(redact(title))} [dim]({seconds:.2f}s)[/]")


def take_timings() -> list[tuple[str, float]]:
    """The (title, seconds) of every step finished since the last call; for `make bench`."""
    with _lock:
        out = list(_timings)
        _timings.clear()
    return out


def _results() -> Console:
    """Results: stdout, so that `builder verify x > report.txt` keeps them. Nothing is wrapped
    or cut when stdout is not a terminal: a script or a file gets every character."""
    terminal = sys.stdout.isatty()
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=None if terminal else 1_000_000)


def result(message: str) -> None:
    """One line of a command's result on stdout, printed with -q too (-q: errors and the result)."""
    _results().print(redact(message), markup=False)


def summary_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A command's result as a table on stdout (printed with -q too); never truncated."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=not sys.stdout.isatty())
    for row in rows:
        table.add_row(*(Text(redact(str(c))) for c in row))  # Text: a "[" in a value is not markup
    _results().print(table)

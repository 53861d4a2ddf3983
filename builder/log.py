"""Steps, progress and the final summary, on stderr; every line passes through the redactor.

`redact()` replaces every registered secret value (enrollment tokens, signing passwords) before
text reaches the terminal, a log file or an exception message built from tool output.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False)
logger = logging.getLogger("builder")

# Most recent first out: a long-running service sees a token per request, and the redactor must
# not grow without bound. A secret stays registered for at least its request's lifetime.
MAX_SECRETS = 10_000
_secrets: dict[str, None] = {}
_by_length: list[str] = []
_lock = threading.Lock()
_quiet = False
_timings: list[tuple[str, float]] = []


def register_secret(value: str) -> None:
    """From now on `value` is replaced by `***` in everything this module prints."""
    global _by_length
    if value and len(value) >= 4:
        with _lock:
            if value in _secrets:
                return
            _secrets[value] = None
            while len(_secrets) > MAX_SECRETS:
                _secrets.pop(next(iter(_secrets)))
            _by_length = sorted(_secrets, key=len, reverse=True)


def redact(text: str) -> str:
    values = _by_length  # replaced whole under the lock, never changed in place
    for value in values:
        if value in text:
            text = text.replace(value, "***")
    return text


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

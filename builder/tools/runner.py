"""The one way this project runs an external program.

- finds the executable with `shutil.which` and raises ToolMissingError naming the Debian package;
- logs the shell-quoted command at debug level, with secrets redacted;
- feeds secrets through stdin or files, never argv (callers pass `stdin=`);
- builds every child's environment in `child_env()`: a variable a secret was read from
  (`--token-env NAME`) is withheld from every tool;
- keeps stdout/stderr for the error message (last lines, redacted) and raises ToolFailedError,
  or lets the caller map a failure to a more precise error with `check=False`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.config import SECRET_ENV
from builder.errors import ToolFailedError, ToolMissingError


@dataclass(frozen=True)
class Tool:
    """An external program: the command, the Debian package that installs it, how to ask its version."""

    command: str
    package: str
    version_args: tuple[str, ...] = ("--version",)
    purpose: str = ""

    def path(self) -> str:
        found = shutil.which(self.command)
        if not found:
            raise ToolMissingError(
                f"{self.command} is not installed (needed for {self.purpose or 'this step'})",
                f"install it with: apt-get install {self.package}",
            )
        return found


# Every external program the project runs. `builder doctor` lists them.
TOOLS: dict[str, Tool] = {
    t.command: t
    for t in (
        Tool("wixl", "wixl", ("--version",), "MSI builds"),
        Tool("msibuild", "msitools", (), "MSI post-build edits"),
        Tool("msiinfo", "msitools", (), "MSI inspection"),
        Tool("msidump", "msitools", (), "reading MSI tables into files (keeps the Property table out of logs)"),
        Tool("makensis", "nsis", ("-VERSION",), "EXE builds"),
        Tool("osslsigncode", "osslsigncode", ("--version",), "Authenticode signing"),
        Tool("openssl", "openssl", ("version",), "development keys"),
        Tool("xorriso", "xorriso", ("-version",), "DMG builds"),
        Tool("wine", "wine", ("--version",), "install tests"),
        Tool("7z", "p7zip-full", (), "reading the pins (trust.json) out of an EXE or MSI, and HFS+ volumes"),
    )
}


# Names of environment variables no child may inherit (see withhold_env), SECRET_ENV's included.
_withheld: set[str] = set(SECRET_ENV)


def withhold_env(name: str) -> None:
    """`name` held a secret: take it out of this process's environment (os.environ.pop unsets it,
    so children started any other way, a spawned helper process included, do not inherit it
    either) and keep it out of every environment `child_env` builds."""
    _withheld.add(name)
    os.environ.pop(name, None)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this process's, less withheld variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _withheld}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    def text(self) -> str:
        return log.redact((self.stdout + self.stderr).decode("utf-8", "replace"))


def run(
    tool: str,
    args: list[str | os.PathLike],
    *,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
    log_stdout: bool = True,
) -> Result:
    """Run `tool` (a key of TOOLS) with `args`. Secrets go in `stdin`, never in `args`.
    `log_stdout=False` for output that may hold a secret the redactor does not know (a table
    read from a file someone else built): only stderr then reaches the debug log."""
    exe = TOOLS[tool].path()
    argv = [exe, *map(str, args)]
    log.debug("$ " + shlex.join([tool, *argv[1:]]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            input=stdin if stdin is not None else b"",
            capture_output=True,
            cwd=cwd,
            env=child_env(env),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ToolFailedError(f"{tool} did not finish within {timeout:.0f}s", "see the debug log (-v)") from None
    result = Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)
    output = result.text() if log_stdout else log.redact(proc.stderr.decode("utf-8", "replace"))
    if output.strip():
        log.debug(f"{tool} output:\n{output.rstrip()}")
    if check and proc.returncode != 0:
        raise ToolFailedError(f"{tool} failed (exit {proc.returncode}): {last_line(output)}", "run with -v for the full output")
    return result


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


_VERSION_RE = re.compile(r"\d+(?:\.\d+)+(?:[-~+][0-9A-Za-z.~+-]*)?")


def version(tool: Tool) -> str | None:
    """First line the tool prints about its version, or None when it is not installed."""
    exe = shutil.which(tool.command)
    if not exe:
        return None
    if not tool.version_args:
        return "installed"
    try:
        proc = subprocess.run([exe, *tool.version_args], capture_output=True, timeout=20, env=child_env())
    except (OSError, subprocess.TimeoutExpired):
        return "installed (version unknown)"
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines()
    if not out:
        return "installed"
    # The version itself: "osslsigncode 2.9, using:" -> 2.9, "v3.08-3+deb12u1" -> 3.08-3+deb12u1.
    found = _VERSION_RE.search(out[0])
    return found.group(0) if found else out[0].strip()

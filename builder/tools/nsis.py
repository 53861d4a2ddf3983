"""makensis, the NSIS compiler: one script in, one installer out, a warning is an error."""

from __future__ import annotations

from pathlib import Path

from builder.errors import SigningError, ToolFailedError
from builder.tools import runner


def makensis_args(script: Path) -> list[str]:
    return [
        # A warning (an unknown $variable, a missing version key...) means the script does not
        # say what we meant: fail the build.
        "-WX",
        # Warnings and errors only. -V3 and up echo every script line, and the script holds the
        # enrollment token.
        "-V2",
        # Relative paths (File, OutFile, !uninstfinalize) resolve against the work folder this
        # runs in, not against the script's folder.
        "-NOCD",
        "-INPUTCHARSET", "UTF8",
        script.name,
    ]


def compile_script(script: Path, *, stdin: bytes | None = None) -> float:
    """Compile `script` in its own folder; returns makensis' run time in seconds.

    `stdin` reaches the commands of !finalize / !uninstfinalize (a signing password), which is
    how a secret gets to them without a command line.
    """
    result = runner.run("makensis", makensis_args(script), cwd=script.parent, stdin=stdin, check=False)
    if result.returncode != 0:
        raise _failure(result.text())
    return result.seconds


def _failure(output: str) -> Exception:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    # Our only !uninstfinalize command signs the uninstaller with osslsigncode.
    if any(ln.startswith(("UninstFinalize command returned", "Finalize command returned")) for ln in lines):
        if any("Wrong password" in ln or "mac verify failure" in ln or "bad decrypt" in ln for ln in lines):
            return SigningError("the signing key could not be opened: wrong password or PIN", "check BUILDER_SIGN_PASSWORD")
        cause = next((ln for ln in lines if ln.startswith(("Failed to", "Error", "Unable"))), runner.last_line(output))
        return SigningError(f"signing the uninstaller failed: {cause}", "run with -v for osslsigncode's output")
    # makensis ends with "Error - aborting creation process" or "warning treated as error":
    # the first error or warning line says what went wrong.
    cause = next((ln for ln in lines if ln.lower().startswith(("error", "warning", "!"))), runner.last_line(output))
    return ToolFailedError(f"makensis failed: {cause}", "run with -v for the full output")

"""Thin wrappers over msitools: wixl (build), msibuild (post-build edits), msiinfo/msidump (reading).

Every call goes through `runner.run`. Nothing here prints a table's content: runner logs a
tool's stdout at debug level, and the Property table of a stamped MSI holds the enrollment
token, so tables are read with `msidump` into a private folder, never from stdout.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from builder.errors import FormatError, ToolFailedError
from builder.tools import runner

# wixl exits 0 after dropping an unknown attribute or a misplaced element with only a GLib
# warning on stderr (RESEARCH.md), so any such line is a failed build.
_WIXL_PROBLEM_RE = re.compile(r"WARNING|CRITICAL", re.IGNORECASE)
# The summary-information times are parsed and written by libmsi as local time.
_UTC = {"TZ": "UTC"}


def wixl(wxs: Path, out: Path, *, arch: str = "x64") -> float:
    """Compile `wxs` into `out`; returns wixl's wall time. `File Source=` paths are relative to `wxs`'s folder."""
    out.unlink(missing_ok=True)
    # wixl reads Source= relative to its working directory, and fails on absolute ones.
    result = runner.run("wixl", ["-a", arch, "-o", out.resolve(), wxs.name], cwd=wxs.parent, env=_UTC, check=False)
    problems = [ln.strip() for ln in result.text().splitlines() if _WIXL_PROBLEM_RE.search(ln)]
    if result.returncode != 0 or problems:
        out.unlink(missing_ok=True)
        why = problems[0] if problems else runner.last_line(result.text())
        raise ToolFailedError(f"wixl could not build {out.name} from {wxs.name} (exit {result.returncode}): {why}",
                              "fix the template; run with -v for wixl's full output")
    # A missing output folder gives exit 0 and no file.
    if not out.is_file() or out.stat().st_size == 0:
        raise ToolFailedError(f"wixl reported success but wrote no {out}", "check that the output folder exists and is writable")
    return result.seconds


def query(msi: Path, *statements: str) -> None:
    """Run SQL statements (UPDATE, DELETE, INSERT) on `msi` in place, in order, in one msibuild call.

    The statements land on msibuild's command line: never put a secret in one.
    """
    args: list[str | os.PathLike] = [msi]
    for sql in statements:
        args += ["-q", sql]
    runner.run("msibuild", args)


def tables(msi: Path) -> list[str]:
    """The table names in `msi`; FormatError when it is not a readable Windows Installer database."""
    result = runner.run("msiinfo", ["tables", msi], check=False)
    names = [ln.strip() for ln in result.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
    if result.returncode != 0 or not names:
        raise FormatError(f"{msi}: not a readable Windows Installer database",
                          "the file is truncated, damaged or not an .msi")
    return names


def dump_tables(msi: Path) -> dict[str, list[dict[str, str]]]:
    """Every table of `msi` as rows of {column: value}, read through files in a private folder."""
    with tempfile.TemporaryDirectory(prefix="msidump-") as tmp:  # mode 0700: the Property table may hold a token
        result = runner.run("msidump", ["-t", "-d", tmp, msi], env=_UTC, check=False)
        if result.returncode != 0:
            raise FormatError(f"{msi}: its tables cannot be read",
                              "the file is truncated, damaged or not an .msi")
        out = {}
        for idt in Path(tmp).glob("*.idt"):
            name, rows = parse_idt(idt.read_bytes())
            out[name or idt.stem] = rows
    # msidump lists the tables in a command substitution, whose failure `set -e` does not see.
    if not out:
        raise FormatError(f"{msi}: no tables could be read", "the file is truncated, damaged or not an .msi")
    return out


def export_table(msi: Path, table: str) -> list[dict[str, str]]:
    """One table as rows of {column: value}. Only for tables without secrets (not Property): it passes stdout."""
    result = runner.run("msiinfo", ["export", msi, table], check=False)
    if result.returncode != 0:
        raise FormatError(f"{msi}: table {table} cannot be read",
                          "the file is truncated, damaged or not an .msi")
    return parse_idt(result.stdout)[1]


def summary(msi: Path) -> dict[int, str]:
    """The summary information stream as {property id: text}, e.g. 9 = package code, 12 = created."""
    result = runner.run("msiinfo", ["export", msi, "_SummaryInformation"], env=_UTC, check=False)
    if result.returncode != 0:
        raise FormatError(f"{msi}: no readable summary information",
                          "the file is truncated, damaged or not an .msi")
    return {int(row["PropertyId"]): row["Value"] for row in parse_idt(result.stdout)[1]}


def set_summary(msi: Path, updates: dict[int, str]) -> None:
    """Change summary-information properties in place (9 = package code; 12, 13 = times as
    'YYYY/MM/DD hh:mm:ss' UTC). `msibuild -s` cannot set the times, importing the table can."""
    with tempfile.TemporaryDirectory(prefix="msisum-") as tmp:
        runner.run("msibuild", [msi, "-i", _summary_idt(msi, updates, Path(tmp))], env=_UTC)


def _summary_idt(msi: Path, updates: dict[int, str], folder: Path) -> Path:
    current = summary(msi)
    current.update(updates)
    lines = ["PropertyId\tValue", "i2\tl255", "_SummaryInformation\tPropertyId"]
    lines += [f"{pid}\t{_idt_escape(value)}" for pid, value in sorted(current.items())]
    idt = folder / "_SummaryInformation.idt"
    idt.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return idt


# IDT text files: tab-separated, CRLF lines; a value's own tab, CR and LF are written as
# control characters 0x15, 0x11 and 0x19.
_IDT_UNESCAPE = str.maketrans({"\x15": "\t", "\x11": "\r", "\x19": "\n"})
_IDT_ESCAPE = str.maketrans({"\t": "\x15", "\r": "\x11", "\n": "\x19"})


def _idt_escape(value: str) -> str:
    return value.translate(_IDT_ESCAPE)


def parse_idt(data: bytes) -> tuple[str, list[dict[str, str]]]:
    """(table name, rows) from an exported IDT table: names line, types line, table+keys line, rows."""
    lines = data.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
    if len(lines) < 3:
        return "", []
    columns = lines[0].split("\t")
    table = lines[2].split("\t")[0]
    rows = []
    for line in lines[3:]:
        if not line:
            continue
        cells = [c.translate(_IDT_UNESCAPE) for c in line.split("\t")]
        cells += [""] * (len(columns) - len(cells))
        rows.append(dict(zip(columns, cells)))
    return table, rows


def set_properties(msi: Path, updates: dict[str, str], summary_updates: dict[int, str] | None = None) -> None:
    """Set (insert or update) Property rows, and summary properties, in place, in one msibuild
    call. Values may be secrets: they travel through IDT files in a private folder, never
    through a command line or the log (the table is read with its stdout kept out of the log)."""
    result = runner.run("msiinfo", ["export", msi, "Property"], check=False, log_stdout=False)
    if result.returncode != 0:
        raise FormatError(f"{msi}: its Property table cannot be read", "the file is truncated, damaged or not an .msi")
    lines = result.stdout.decode("utf-8").replace("\r\n", "\n").rstrip("\n").split("\n")
    header, rows = lines[:3], {}
    for line in lines[3:]:
        name, _, value = line.partition("\t")
        rows[name] = value
    for name, value in updates.items():
        rows[name] = _idt_escape(value)
    with tempfile.TemporaryDirectory(prefix="msiprop-") as tmp:  # mode 0700
        idt = Path(tmp) / "Property.idt"
        idt.write_bytes(("\r\n".join(header + [f"{n}\t{v}" for n, v in rows.items()]) + "\r\n").encode("utf-8"))
        imports: list[str | os.PathLike] = ["-i", idt]
        if summary_updates:
            imports += ["-i", _summary_idt(msi, summary_updates, Path(tmp))]
        runner.run("msibuild", [msi, *imports], env=_UTC)

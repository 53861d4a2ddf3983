"""Drive a wine prefix the way a Windows admin drives a machine: msiexec, installers, sc, reg.

A template prefix is booted once per session (5-10 s); each test gets a copy of it, so tests
never see each other's installs. Output is read from files (.reg exports, msiexec logs), not
from wine's console, whose encoding mangles non-ASCII text.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import pytest

WINE_ENV = {"WINEDEBUG": "-all", "WINEDLLOVERRIDES": "mscoree,mshtml=", "WINEARCH": "win64", "DISPLAY": ""}


# Wine runs x86-64 Windows programs only on an x86-64 host (RESEARCH.md): on any other host,
# and nowhere else, the wine tests are skipped, with the reason. One marker for every suite.
needs_x86_64 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"),
    reason=f"wine runs x86-64 Windows programs only on an x86_64 host, this one is {platform.machine()}",
)


@dataclass
class WinePrefix:
    root: Path

    def env(self) -> dict:
        return {**os.environ, **WINE_ENV, "WINEPREFIX": str(self.root)}

    def run(self, *args: str, timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(["wine", *args], env=self.env(), capture_output=True, timeout=timeout)
        self.wait()
        if check and proc.returncode != 0:
            raise AssertionError(f"wine {args[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
        return proc

    def wait(self) -> None:
        subprocess.run(["wineserver", "-w"], env=self.env(), timeout=180)

    def kill(self) -> None:
        subprocess.run(["wineserver", "-k"], env=self.env(), timeout=60, capture_output=True)

    @staticmethod
    def winpath(path: Path) -> str:
        return "Z:" + str(Path(path).resolve()).replace("/", "\\")

    def host_path(self, windows_path: str) -> Path:
        """C:\\Program Files\\X -> <prefix>/drive_c/Program Files/X."""
        p = PureWindowsPath(windows_path)
        assert p.drive.upper() == "C:", windows_path
        return self.root / "drive_c" / Path(*p.parts[1:])

    def msiexec(self, *args: str, log: Path | None = None) -> int:
        extra = ["/l*v", self.winpath(log)] if log else []
        return self.run("msiexec", *args, *extra).returncode

    def reg_values(self, key: str) -> dict[str, str] | None:
        """The REG_SZ values under HKLM\\key (64-bit view), exactly, or None if the key is absent."""
        out = self.root / "reg-export.reg"
        out.unlink(missing_ok=True)
        proc = self.run("reg", "export", f"HKLM\\{key}", self.winpath(out), "/y", "/reg:64")
        if proc.returncode != 0 or not out.exists():
            return None
        return parse_reg_export(out.read_bytes(), key)

    def service_state(self, name: str) -> str | None:
        """RUNNING, STOPPED..., or None if no such service."""
        proc = self.run("sc", "query", name)
        text = proc.stdout.decode("utf-8", "replace")
        for line in text.splitlines():
            if "STATE" in line:
                return line.split()[-1]
        return None

    def uninstall_entries(self) -> dict[str, dict[str, str]]:
        """Add/Remove Programs: subkey -> values (64-bit view)."""
        key = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall"
        out = self.root / "arp-export.reg"
        out.unlink(missing_ok=True)
        self.run("reg", "export", f"HKLM\\{key}", self.winpath(out), "/y", "/reg:64")
        if not out.exists():
            return {}
        return parse_reg_export_all(out.read_bytes(), key)


def _decode_reg(data: bytes) -> str:
    return data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8")


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_reg_export_all(data: bytes, root: str) -> dict[str, dict[str, str]]:
    """Every key in a `reg export` file -> its REG_SZ values (string values only)."""
    keys: dict[str, dict[str, str]] = {}
    current = None
    for line in _decode_reg(data).splitlines():
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            prefix = "HKEY_LOCAL_MACHINE\\" + root
            current = name[len(prefix):].lstrip("\\") if name.lower().startswith(prefix.lower()) else None
            if current is not None:
                keys.setdefault(current, {})
        elif current is not None and line.startswith('"') and '"="' in line and line.endswith('"'):
            name, _, value = line[1:-1].partition('"="')
            keys[current][_unescape(name)] = _unescape(value)
    return keys


def parse_reg_export(data: bytes, key: str) -> dict[str, str]:
    return parse_reg_export_all(data, key).get("", {})


def make_template(root: Path) -> WinePrefix:
    prefix = WinePrefix(root)
    subprocess.run(["wineboot", "-i"], env=prefix.env(), capture_output=True, timeout=300, check=True)
    # An msiexec started while the new prefix still boots fails at StartServices (RESEARCH.md).
    prefix.wait()
    return prefix


def copy_prefix(template: WinePrefix, dest: Path) -> WinePrefix:
    shutil.copytree(template.root, dest, symlinks=True)
    return WinePrefix(dest)

"""The macOS payload folder, checked and staged as the pkg installs it (install-location "/",
owner root:wheel, every mtime SOURCE_DATE_EPOCH):

    /Library/Application Support/<install_folder>/   the macOS payload (agent or Agent.app)
    /Library/LaunchDaemons/<launchd_label>.plist     runs `<agent> run --config <config>`
    /Library/Application Support/<install_folder>/enrollment.json    written by postinstall, 0600
"""

from __future__ import annotations

import os
import plistlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder import render
from builder.binfmt import macho
from builder.binfmt.cpio import TreeEntry, scan_tree
from builder.config import Product
from builder.errors import PayloadError
from builder.formats.base import refuse_symlinks

CONFIG_NAME = "enrollment.json"  # the Windows formats' name for the same file
AGENT_NAME = "agent"  # a plain executable at the payload's top level wins over a .app
ROOT_UID = 0
WHEEL_GID = 0  # cpio's default is 80 (admin); the brief and launchd want root:wheel


def plist_path(product: Product) -> str:
    return f"/Library/LaunchDaemons/{product.launchd_label}.plist"


@dataclass(frozen=True)
class MacPayload:
    """What the macOS payload folder holds, checked."""

    folder: Path
    agent: str  # path of the executable launchd runs, relative to the folder
    code: tuple[str, ...]  # .app bundles and loose Mach-O files to sign, relative, sorted


@dataclass(frozen=True)
class Layout:
    install_dir: str
    config_path: str
    plist_path: str
    agent_path: str

    @classmethod
    def of(cls, product: Product, payload: MacPayload) -> "Layout":
        install_dir = product.mac_install_folder
        return cls(
            install_dir=install_dir,
            config_path=f"{install_dir}/{CONFIG_NAME}",
            plist_path=plist_path(product),
            agent_path=f"{install_dir}/{payload.agent}",
        )


def _visible(name: str) -> bool:
    # The Windows formats' rule: dot-files (build stamps, .DS_Store) are not part of the agent.
    return not name.startswith(".")


def is_macho(path: Path) -> bool:
    with open(path, "rb") as fh:
        return macho.is_macho(fh.read(8))


def bundle_executable(app: Path) -> str:
    """`Contents/MacOS/<CFBundleExecutable>` of a .app, relative to it; PayloadError naming the file."""
    info = app / "Contents" / "Info.plist"
    if not info.is_file():
        raise PayloadError(f"{info}: missing; {app.name} is not a complete .app bundle",
                           "a .app needs Contents/Info.plist naming its executable (CFBundleExecutable)")
    try:
        plist = plistlib.loads(info.read_bytes())
    except (plistlib.InvalidFileException, ValueError, OSError) as exc:
        raise PayloadError(f"{info}: not a readable property list ({type(exc).__name__})", "fix or regenerate it") from None
    name = plist.get("CFBundleExecutable") if isinstance(plist, dict) else None
    if not isinstance(name, str) or not name or "/" in name:
        raise PayloadError(f"{info}: no CFBundleExecutable", "name the bundle's executable in Contents/Info.plist")
    if not isinstance(plist.get("CFBundleIdentifier"), str) or not plist["CFBundleIdentifier"]:
        raise PayloadError(f"{info}: no CFBundleIdentifier", "give the bundle an identifier in Contents/Info.plist")
    exe = app / "Contents" / "MacOS" / name
    if not exe.is_file():
        raise PayloadError(f"{exe}: missing (named by {info.name} CFBundleExecutable)", "put the agent's executable there")
    return f"Contents/MacOS/{name}"


def check_payload(folder: Path) -> MacPayload:
    """The agent and the code to sign in the macOS payload folder, or PayloadError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PayloadError(f"{folder}: no such folder", "put the macOS agent there (make payload-test for the test agent)")
    refuse_symlinks(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        for name in [*dirnames, *filenames]:
            if not name.isprintable():
                raise PayloadError(f"{str(Path(dirpath) / name)!r}: the name has a control character", "rename it")
    top = sorted(p for p in folder.iterdir() if _visible(p.name))
    apps = [p for p in top if p.suffix == ".app" and p.is_dir() and not p.is_symlink()]
    executables = {app.name: bundle_executable(app) for app in apps}
    plain = folder / AGENT_NAME
    if plain.is_file():
        agent = AGENT_NAME
        if not os.access(plain, os.X_OK):
            raise PayloadError(f"{plain}: not executable", f"chmod +x {plain}")
    elif len(apps) == 1:
        agent = f"{apps[0].name}/{executables[apps[0].name]}"
    else:
        found = ", ".join(a.name for a in apps) or "none"
        raise PayloadError(f"{folder}: no agent to run (no `{AGENT_NAME}` executable, and .app bundles: {found})",
                           f"put the agent there as `{AGENT_NAME}` or as exactly one .app bundle")
    code = [app.name for app in apps]
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if _visible(d) and not (rel_dir == Path(".") and d.endswith(".app")))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _visible(name) and not path.is_symlink() and is_macho(path):
                code.append((rel_dir / name).as_posix())
    return MacPayload(folder=folder, agent=agent, code=tuple(sorted(code)))


def stage_root(payload: MacPayload, product: Product, root: Path) -> Layout:
    """The tree the Payload installs under "/": the agent folder and the LaunchDaemon plist."""
    layout = Layout.of(product, payload)
    if root.exists():
        shutil.rmtree(root)
    target = root / layout.install_dir.lstrip("/")
    shutil.copytree(payload.folder, target, symlinks=True,
                    ignore=lambda _d, names: [n for n in names if not _visible(n)])
    plist = root / layout.plist_path.lstrip("/")
    plist.parent.mkdir(parents=True, exist_ok=True)
    plist.write_text(render_launchdaemon(product, layout), encoding="utf-8")
    return layout


def render_launchdaemon(product: Product, layout: Layout) -> str:
    text = render.render("macos/launchdaemon.plist.j2", label=product.launchd_label,
                         agent_path=layout.agent_path, config_path=layout.config_path)
    parsed = plistlib.loads(text.encode())
    assert parsed["ProgramArguments"] == [layout.agent_path, "run", "--config", layout.config_path]
    return text


def payload_entries(root: Path, epoch: int) -> list[TreeEntry]:
    return scan_tree(root, mtime=epoch, uid=ROOT_UID, gid=WHEEL_GID)

"""The pkg's postinstall (templates/macos/postinstall.sh.j2): rendered with the release's pins and,
for a group's pkg, its signed enrollment baked in; read back from a script; and packed as the
component's Scripts member.

The postinstall carries the release's pins (keys and console hosts) and takes the signed
enrollment baked into it at build time, else from a sidecar file beside the package
(`$(dirname "$1")/<sidecar>`, what a release pkg on a group's disk image uses), else keeps an
existing config. It verifies a new enrollment (ES256 with openssl, expiry, console host) before
it writes anything: the sidecar is not covered by any signature.
"""

from __future__ import annotations

import io
import re
import shlex
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from builder import render
from builder.binfmt.cpio import TreeEntry, write_cpio_entries
from builder.binfmt.gzipstream import ParallelGzip
from builder.config import Product
from builder.errors import ConfigError, EnrollmentError
from builder.formats.macos_payload import CONFIG_NAME, ROOT_UID, WHEEL_GID, plist_path
from builder.trust import TRUST_FILE, SignedEnrollment, Trust

if TYPE_CHECKING:
    from builder.formats.pkg_archive import PkgContents

POSTINSTALL = "postinstall"
SIDECAR_SUFFIX = ".enrollment.jws"  # a signed enrollment: base64url and dots, no newline
INSTALL_ROOT_ENV = "BUILDER_INSTALL_ROOT"


def sidecar_name(product: Product) -> str:
    """The enrollment file a release pkg reads from beside itself. A leading dot: Finder hides it
    on the disk image, so the window shows the installer and the README only."""
    return f".{product.bundle_id}{SIDECAR_SUFFIX}"


def sidecar_name_from_pkg(contents: "PkgContents") -> str:
    """The sidecar name a pkg's postinstall reads (from the script itself, so a reader needs no
    product configuration)."""
    name = _baked_word(contents.postinstall or "", "postinstall", "sidecar_name")
    return name or f".unknown{SIDECAR_SUFFIX}"


def render_postinstall(product: Product, trust: Trust, enrollment: SignedEnrollment | None) -> str:
    """The postinstall script, with the release's pins. Holds the token in clear when
    `enrollment` is given (the signed enrollment, baked in)."""
    text = render.render(
        "macos/postinstall.sh.j2",
        install_dir=product.mac_install_folder,
        config_name=CONFIG_NAME,
        trust_name=TRUST_FILE,
        plist_path=plist_path(product),
        label=product.launchd_label,
        sidecar_name=sidecar_name(product),
        trust_json=trust.to_json_bytes().decode(),
        console_hosts=" ".join(trust.console_hosts),
        keys=[{"kid": k.kid, "pem": k.pem()} for k in trust.keys],
        enrollment=enrollment.jws.reveal() if enrollment is not None else None,
    )
    # What verify will read back must be what was meant: quoting round-trips or the build fails.
    if baked_jws(text, "rendered postinstall") != (enrollment.jws.reveal() if enrollment else None) \
            or baked_trust(text, "rendered postinstall") != trust:
        raise AssertionError("the baked enrollment or pins do not read back from the rendered postinstall")
    return text


def _baked_word(script: str, name: str, var: str) -> str | None:
    found = re.findall(rf"^{var}=(.*)$", script, re.MULTILINE)
    if not found:
        return None
    words = None
    try:
        words = shlex.split(found[0], comments=False, posix=True)
    except ValueError:
        pass
    if len(found) != 1 or words is None or len(words) > 1:
        raise EnrollmentError(f"{name}: the baked {var} is not one shell word", "rebuild the installer")
    return words[0] if words else ""


def baked_jws(script: str, name: str) -> str | None:
    """The signed enrollment a postinstall carries; None when it has none (a release's)."""
    return _baked_word(script, name, "baked") or None


def baked_trust(script: str, name: str) -> Trust | None:
    """The pins a postinstall writes to trust.json; None when it has none (an older pkg)."""
    raw = _baked_word(script, name, "trust_json")
    if raw is None:
        return None
    try:
        return Trust.from_json_bytes(raw.encode(), f"{name}: trust_json")
    except ConfigError:
        return None


def scripts_archive(script: str, epoch: int) -> bytes:
    """The Scripts member: a gzip-compressed odc cpio of "." and "./postinstall" (0755, root:wheel).

    The script holds the token when baked: it touches the disk only as a 0600 file in a private
    temporary folder, removed at once."""
    with tempfile.TemporaryDirectory(prefix="builder-scripts-") as tmp:
        path = render.write_private(Path(tmp) / POSTINSTALL, script)
        entries = [
            TreeEntry("", "dir", stat.S_IFDIR | 0o755, ROOT_UID, WHEEL_GID, epoch, 0),
            TreeEntry(POSTINSTALL, "file", stat.S_IFREG | 0o755, ROOT_UID, WHEEL_GID, epoch,
                      path.stat().st_size, source=path),
        ]
        buffer = io.BytesIO()
        with ParallelGzip(buffer, workers=1) as gz:
            write_cpio_entries(entries, gz)
        return buffer.getvalue()

"""xorriso (its mkisofs emulation): a folder -> an ISO 9660 / HFS+ hybrid disk image.

The image starts with a Driver Descriptor Map and an Apple Partition Map whose Apple_HFS entry
is an HFS+ volume sharing the file data with the ISO 9660 tree; `builder.binfmt.udif` wraps it
as a .dmg. HFS+ rather than HFS Standard (genisoimage -hfs): current macOS mounts only HFS+.

Reproducible (checked: different checkout times, inode numbers, permission bits other than x,
locale and wall clock give identical bytes) given the same files and `source_date_epoch`:
- SOURCE_DATE_EPOCH in xorriso's environment fixes the volume dates, the HFS+ dates of nodes
  without a disk file and the volume UUID date;
- --set_all_file_dates fixes every file's mtime/atime/ctime (else the checkout time leaks in);
- -input-charset utf-8: HFS+ and Joliet names are converted from the input charset, which
  otherwise follows the locale (under LC_ALL=C a non-ASCII name came out different);
- -no_rc: no startup file (~/.xorrisorc, .mkisofsrc) can add options;
- -r already sets owners to 0 and modes to a+r (keeping x bits).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from builder.errors import FormatError, PayloadError
from builder.tools import runner

# ISO 9660 keeps 32 bytes of volume id (xorriso fails beyond); HFS+ shows ":" as "/" (xorriso
# stores "a:b" as "a/b"); non-ASCII would depend on the locale's charset; a leading "." hides
# the volume in Finder; quotes and shell/glob characters make a poor mount point.
VOLUME_NAME_MAX = 32
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+\-()&,!#@']*")


def check_volume_name(name: str) -> str:
    """`name` if it survives as both the ISO 9660 volume id and the HFS+ volume name unchanged."""
    if not isinstance(name, str) or not name:
        raise FormatError("DMG volume name is empty", "set the product name used for the disk image")
    if len(name.encode("utf-8")) > VOLUME_NAME_MAX:
        raise FormatError(f"DMG volume name {name!r} is longer than {VOLUME_NAME_MAX} bytes",
                          "shorten it (ISO 9660 volume ids hold 32 bytes)")
    if name != name.strip() or not _VOLUME_NAME.fullmatch(name):
        raise FormatError(
            f"DMG volume name {name!r} has characters xorriso or HFS+ would change",
            "use ASCII letters, digits, spaces and . _ + - ( ) & , ! # @ ', starting with a letter or digit",
        )
    return name


def hfsplus_args(src_dir: Path, out_path: Path, volume_name: str, source_date_epoch: int) -> list[str]:
    """The xorriso command line (after the tool name) that `hfsplus_image` runs."""
    return [
        "-no_rc",  # must come first: ignore startup files
        "-stdio_sync", "off",  # an intermediate file: no fsync every 16 MiB (slow on a busy disk)
        "-as", "mkisofs",
        "-D",  # deep directory trees are fine (no ISO 9660 8-level limit)
        "-l",  # ISO names up to 31 characters
        "-V", volume_name,
        "-r",  # Rock Ridge with owner 0 and readable modes
        "-dir-mode", "0755",
        "-sysid", "APPLE",
        "-input-charset", "utf-8",
        "-apm-block-size", "2048",  # 2048-byte APM blocks, as the ISO's own block size
        "-hfsplus",
        "--set_all_file_dates", f"={source_date_epoch}",
        "-o", str(out_path),
        str(src_dir),
    ]


def hfsplus_image(src_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], volume_name: str,
                  source_date_epoch: int) -> Path:
    """Build the ISO/HFS+ hybrid of everything under `src_dir` at `out_path`; returns the path."""
    src, out = Path(src_dir), Path(out_path)
    check_volume_name(volume_name)
    if isinstance(source_date_epoch, bool) or not isinstance(source_date_epoch, int) or source_date_epoch < 0:
        raise FormatError(f"source_date_epoch must be a non-negative integer, got {source_date_epoch!r}")
    if not src.is_dir():
        raise PayloadError(f"DMG content folder {src} does not exist or is not a folder",
                           "point the build at the folder that goes into the disk image")
    out.unlink(missing_ok=True)  # no stale image from an earlier run survives a failed one
    try:
        runner.run("xorriso", hfsplus_args(src, out, volume_name, source_date_epoch),
                   env={"SOURCE_DATE_EPOCH": str(source_date_epoch)})
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out

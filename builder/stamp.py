"""`builder stamp`: one group's installer from a release, in milliseconds where the format allows.

Every enrollment is signed (builder/trust.py) and checked against the release's pins first.
- exe, msi-tagged: the signed enrollment goes into the release's reserved slot inside the Authenticode
  PKCS#7; no re-signing. The output is base[0:off] + slot + base[off+len:], offered as byte
  ranges (`stamp_ranges`) so storage and the service can stream or server-side-copy it.
- msi (baked, for GPO/Intune, which run an MSI with no arguments and may copy it away from any
  sidecar): Property defaults rewritten in the release MSI, new PackageCode, re-signed once.
- pkg: re-baked (Scripts member only) and re-signed. dmg: the release's signed pkg plus the
  group's enrollment file beside it.
Outputs are deterministic: the same release and enrollment give the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder import build, fileio, formats, log
from builder.binfmt import slot as slotfmt
from builder.binfmt import tag
from builder.trust import SignedEnrollment, verify
from builder.errors import OutputError, SlotError, UsageError
from builder.signing.signers import Signers
from builder.release import Release, ReleaseFile

_FICLONE = 0x40049409  # ioctl: share the base's blocks (btrfs, XFS); ext4 refuses, then we copy


@dataclass(frozen=True)
class Stamped:
    format: str
    path: Path
    size: int
    sha256: str
    signer: str | None
    resigned: bool
    bytes_written: int
    notarization: dict | None = None  # pkg and dmg: builder.signing.notary.NotaryResult.as_dict()

    def as_dict(self) -> dict:
        return {"format": self.format, "path": str(self.path), "size": self.size, "sha256": self.sha256,
                "signer": self.signer, "resigned": self.resigned, "bytes_written": self.bytes_written,
                "notarization": self.notarization}


def stamp_ranges(base: ReleaseFile, enrollment: SignedEnrollment) -> list[tag.Piece]:
    """The stamped file as pieces of the base plus the new slot bytes. No I/O."""
    info = base.slot
    if info is None:
        raise SlotError(f"release file {base.path.name} has no enrollment slot (an unsigned release has none: "
                        "the slot lives in the Authenticode signature)",
                        "build the release signed, or stamp --format msi (baked), pkg or dmg")
    size, extents = info["size"], [tuple(e) for e in info["extents"]]
    new = slotfmt.encode_slot(enrollment.jws.reveal().encode("ascii"), size)
    if info.get("checksum_neutral"):
        new = tag.checksum_neutral(new, slotfmt.empty_slot(size), extents[0][0])
    return tag.stamp_pieces(base.entry["size"], extents, new)


def write_pieces(base: Path, pieces: list[tag.Piece], dst: Path) -> int:
    """Write the file `pieces` describe to `dst` (a new file): the base copied in the kernel
    (or reflinked), then only the literal pieces written. Returns the bytes written by us."""
    written = 0
    with open(base, "rb") as src, os.fdopen(os.open(dst, fileio.NEW_FILE, 0o644), "wb") as out:
        try:
            fcntl.ioctl(out.fileno(), _FICLONE, src.fileno())
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF):
                raise
            _copy_range(src, out, os.fstat(src.fileno()).st_size)
        pos = 0
        for piece in pieces:
            if piece[0] == "bytes":
                os.pwrite(out.fileno(), piece[1], pos)
                written += len(piece[1])
                pos += len(piece[1])
            else:
                pos += piece[2]
    return written


def _copy_range(src, out, size: int) -> None:
    """In-kernel copy; a plain read/write loop where the kernel or filesystem refuses it."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src.fileno(), out.fileno(), size - done, done, done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        src.seek(done)
        out.seek(done)
        shutil.copyfileobj(src, out, 1 << 20)


def check_pinned(release: Release, enrollment: SignedEnrollment) -> None:
    """Refuse (EnrollmentError, exit 3) what the release's agents would refuse: a key it does
    not pin, an expired enrollment, a console host outside its allowlist."""
    verify(enrollment.jws.reveal(), release.trust(), int(time.time()))


def stamp(release: Release, fmt: str, enrollment: SignedEnrollment, signers: Signers, out: Path) -> Stamped:
    """Stamp `enrollment` into the release's `fmt` installer, written to `out` (atomically)."""
    kind = formats.kind(fmt)
    check_pinned(release, enrollment)
    if out.suffix.lower() != kind.suffix:
        raise UsageError(f"--out {out}: the {fmt} installer must end in {kind.suffix}", "rename the output")
    base = release.file(kind.base)
    log.register_secret(enrollment.token.reveal())
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder", "give the installer's file name, for example group.exe")
    # Everything this stamp writes by path (the output, a pkg's unsigned intermediate with the
    # token inside, a tool's temporary files) goes into a new 0700 folder beside `out`: nothing
    # follows a planted link, and nobody else can read the token on the way.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = fileio.new_private_dir(out)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there ({exc.strerror or exc})", "choose a writable folder") from None
    notarization = None
    try:
        partial = work / out.name
        if kind.slotted:
            with log.step(f"{fmt}: stamp the enrollment slot"):
                written = write_pieces(base.path, stamp_ranges(base, enrollment), partial)
            signer, resigned = base.entry.get("signer"), False
        else:
            with log.step(f"{fmt}: bake and sign"):
                built = formats.get(fmt).stamp(release, enrollment, signers.for_product(release.product().name), partial)
            written, signer, resigned = partial.stat().st_size, built.signer, not signers.unsigned
            notarization = (built.details or {}).get("notarization")
        try:
            os.replace(partial, out)
        except OSError as exc:
            raise OutputError(f"--out {out}: cannot write it ({exc.strerror or exc})", "choose a writable file path") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Stamped(fmt, out, out.stat().st_size, build.sha256_file(out), signer, resigned, written, notarization)

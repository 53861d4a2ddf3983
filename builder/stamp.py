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

`stamp --groups FILE` makes many groups' installers from one release: `read_groups` reads and
validates the whole file first, `stamp_groups` writes every installer or none.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from builder import fileio, formats, log
from builder.binfmt import slot as slotfmt
from builder.binfmt import tag
from builder.enrollment import Enrollment, read_token
from builder.trust import SignedEnrollment, verify
from builder.errors import BuilderError, OutputError, SlotError, UsageError
from builder.tools import runner
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


# Hash states of release prefixes (one per release file with a slot), least recently used out.
PREFIX_CACHE = 32
_prefix_hashes: collections.OrderedDict[tuple[str, int], "hashlib._Hash"] = collections.OrderedDict()
_prefix_lock = threading.Lock()


def pieces_sha256(base: Path, pieces) -> str:
    """SHA-256 of the file `pieces` describe, without reading it back. The slot sits near the
    end of the base, so the hash state of the unchanged prefix (base[0:off]) is computed once per
    base and copied: a stamp then hashes only the slot and the few bytes after it."""
    pieces = list(pieces)
    h = None
    if pieces and pieces[0][0] == "base" and pieces[0][1] == 0:
        cache_key = (str(base), pieces[0][2])
        with _prefix_lock:
            cached = _prefix_hashes.get(cache_key)
            if cached is not None:
                _prefix_hashes.move_to_end(cache_key)
        if cached is None:
            cached = hashlib.sha256()
            _hash_range(base, 0, pieces[0][2], cached)
            with _prefix_lock:
                _prefix_hashes[cache_key] = cached
                while len(_prefix_hashes) > PREFIX_CACHE:
                    _prefix_hashes.popitem(last=False)
        h = cached.copy()
        pieces = pieces[1:]
    h = h or hashlib.sha256()
    for piece in pieces:
        if piece[0] == "bytes":
            h.update(piece[1])
        else:
            _hash_range(base, piece[1], piece[2], h)
    return h.hexdigest()


def warm_prefix_hash(base: ReleaseFile) -> None:
    """Hash now the prefix every stamp of the slotted `base` shares (base[0:the slot's first
    extent]), so that its first stamp does not pay for it."""
    pieces_sha256(base.path, [("base", 0, base.slot["extents"][0][0])])


def _hash_range(base: Path, start: int, length: int, h) -> None:
    with open(base, "rb") as fh:
        for chunk in fileio.iter_range(fh, start, length, too_short=f"{base}: shorter than the release says"):
            h.update(chunk)


def check_pinned(release: Release, enrollment: SignedEnrollment) -> None:
    """Refuse (EnrollmentError, exit 3) what the release's agents would refuse: a key it does
    not pin, an expired enrollment, a console host outside its allowlist."""
    verify(enrollment.jws.reveal(), release.trust(), int(time.time()))


def stamp(release: Release, fmt: str, enrollment: SignedEnrollment, signers: Signers, out: Path) -> Stamped:
    """Stamp `enrollment` into the release's `fmt` installer, written to `out` (atomically)."""
    kind = formats.kind(fmt)
    check_pinned(release, enrollment)
    if out.suffix.lower() != kind.suffix:
        raise UsageError(f"{{field}} {out}: the {fmt} installer must end in {kind.suffix}", "rename the output", field="out")
    base = release.file(kind.base)
    if not kind.slotted and not signers.unsigned:
        release.require_trusted_signature(kind.base)  # it signs again: only what a trusted signature vouched for
    log.register_secret(enrollment.token.reveal())
    if out.is_dir():
        raise OutputError(f"{{field}} {out}: is a folder", "give the installer's file name, for example group.exe", field="out")
    # Everything this stamp writes by path (the output, a pkg's unsigned intermediate with the
    # token inside, a tool's temporary files) goes into a new 0700 folder beside `out`: nothing
    # follows a planted link, and nobody else can read the token on the way.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = fileio.new_private_dir(out)
    except OSError as exc:
        raise OutputError(f"{{field}} {out}: cannot write there ({exc.strerror or exc})", "choose a writable folder", field="out") from None
    try:
        partial = work / out.name
        with log.step(f"{fmt}: {'stamp the enrollment slot' if kind.slotted else 'bake and sign'}"):
            made = _make(release, fmt, base, enrollment, signers.for_product(release.product().name), partial)
        try:
            os.replace(partial, out)
        except OSError as exc:
            raise OutputError(f"{{field}} {out}: cannot write it ({exc.strerror or exc})", "choose a writable file path", field="out") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return replace(made, path=out)


def _make(release: Release, fmt: str, base: ReleaseFile, enrollment: SignedEnrollment, signers: Signers,
          partial: Path) -> Stamped:
    """One group's `fmt` installer written to `partial` (a new file), and what it is: a slot
    stamp (hashed from its pieces, not read back) or the format's bake-and-sign."""
    if formats.kind(fmt).slotted:
        pieces = stamp_ranges(base, enrollment)
        written = write_pieces(base.path, pieces, partial)
        return Stamped(fmt, partial, base.entry["size"], pieces_sha256(base.path, pieces), base.entry.get("signer"),
                       False, written)
    built = formats.get(fmt).stamp(release, enrollment, signers, partial)
    size = partial.stat().st_size
    return Stamped(fmt, partial, size, fileio.sha256_file(partial), built.signer, not signers.unsigned, size,
                   (built.details or {}).get("notarization"))


# --- many groups from one release (`stamp --groups FILE`) ----------------------------------------

# One JSON object per line; the token is named by a file or a variable, never written inline.
GROUP_KEYS = ("account", "group", "console_url", "token_file", "token_env")
MAX_GROUPS_FILE_BYTES = 16 << 20
_NAME_MAX = 255  # bytes in one file name (Linux, macOS, NTFS)
# What the enrollment rules call a field (BuilderError.field), and what a groups file calls it;
# then the options the token reader names in its own words.
_KEY_OF_FIELD = {"account_id": '"account"', "group_id": '"group"', "console_url": '"console_url"'}
_KEY_OF_OPTION = {"--account-id": '"account"', "--group-id": '"group"', "--console-url": '"console_url"',
                  "--token-file": '"token_file"', "--token-env": '"token_env"'}


@dataclass(frozen=True)
class GroupLine:
    line: int  # 1-based line of the groups file
    enrollment: Enrollment


def group_file_name(account_id: str, group_id: str, fmt: str) -> str:
    """`<account>+<group><suffix>`. "+" is outside the id alphabet (builder/enrollment.py), so two
    groups never share a name; ids start with a letter or digit, so no name is hidden or a path."""
    return f"{account_id}+{group_id}{formats.kind(fmt).suffix}"


def _at(where: str, exc: BuilderError) -> BuilderError:
    """`exc` (same class, so the same exit code) with the groups file's line in front, and the
    field named as the file names it."""
    placed = exc.placed(where, lambda name: _KEY_OF_FIELD.get(name, name))
    for option, key in _KEY_OF_OPTION.items():
        placed.template = placed.template.replace(option, key)
    placed.args = (placed.message,)
    return placed


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise UsageError(f"{json.dumps(k) if len(k) <= 24 else 'a key'} is given twice", "give each key once")
    return dict(pairs)


def _group_token(doc: dict, folder: Path):
    """The line's token: from "token_file" (a regular file, not a link; a relative path is from
    the groups file's folder) or "token_env", read by the rules of `stamp --token-file/--token-env`."""
    if ("token_file" in doc) == ("token_env" in doc):
        raise UsageError('give one of "token_file" and "token_env"', "the token is never written in the groups file")
    name = "token_file" if "token_file" in doc else "token_env"
    if not isinstance(doc[name], str) or not doc[name]:
        raise UsageError(f'"{name}" must be a non-empty string')
    if name == "token_env":
        return read_token(None, doc[name]), doc[name]
    # A link could make this run read a file its writer cannot (another group's token, a key)
    # into an installer they receive; a FIFO or device would block or never end.
    return read_token(str(folder / doc[name]), None, regular_only=True), None


def read_groups(path: Path, fmt: str, default_console_url: str) -> list[GroupLine]:
    """Every group of the groups file `path`, each validated by the enrollment rules, its token
    read: any error names its line (the error class, hence the exit code, is the one a single
    stamp gives), and nothing is stamped unless the whole file is good. A value is never echoed.
    Two lines for the same account and group (compared as a case-insensitive file system would)
    are refused: they would be written to one file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_GROUPS_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--groups {path}: cannot read it ({exc.strerror or exc.__class__.__name__})", "check the path") from None
    if len(data) > MAX_GROUPS_FILE_BYTES:
        raise UsageError(f"--groups {path}: more than {MAX_GROUPS_FILE_BYTES >> 20} MiB", "split it into several files")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"--groups {path}: not UTF-8 text", "write one JSON object per line") from None
    groups: list[GroupLine] = []
    seen: dict[tuple[str, str], int] = {}
    withheld: list[str] = []
    try:
        # "\n" only: a JSON string may hold U+2028 or a form feed, which splitlines() would split at.
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.rstrip("\r")
            if not line.strip():
                continue
            where = f"--groups {path} line {number}"
            try:
                doc = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except (ValueError, RecursionError) as exc:
                # The message only: the line may hold a token.
                raise UsageError(f"{where}: not a JSON object ({getattr(exc, 'msg', 'invalid JSON')})",
                                 "write one object per line, e.g. " + '{"account": "A", "group": "G", "token_file": "g.token"}') from None
            except UsageError as exc:
                raise _at(where, exc) from None
            if not isinstance(doc, dict):
                raise UsageError(f"{where}: not a JSON object", "write one object per line")
            if "token" in doc:
                raise UsageError(f'{where}: holds the token itself ("token")',
                                 'name a file that holds it ("token_file") or an environment variable ("token_env")')
            unknown = [k for k in doc if k not in GROUP_KEYS]
            if unknown:
                # Named only when short: a long one may be a token pasted in the wrong place.
                named = json.dumps(unknown[0]) if len(unknown[0]) <= 24 else "(a long one, not shown)"
                raise UsageError(f"{where}: unknown key {named}", f"the keys are {', '.join(GROUP_KEYS)}")
            for key in ("account", "group", "console_url"):
                if key in doc and not isinstance(doc[key], str):
                    raise UsageError(f'{where}: "{key}" must be a string')
            for key in ("account", "group"):
                if key not in doc:
                    raise UsageError(f'{where}: "{key}" is missing', "give the console's account and group ids")
            try:
                token, env = _group_token(doc, path.parent)
                if env:
                    withheld.append(env)
                enrollment = Enrollment(account_id=doc["account"], group_id=doc["group"], token=token,
                                        console_url=doc.get("console_url", default_console_url))
            except BuilderError as exc:
                raise _at(where, exc) from None
            # Registered only once valid (a word given as a token must not be masked everywhere).
            log.register_secret(token.reveal(), permanent=True)
            name = group_file_name(enrollment.account_id, enrollment.group_id, fmt)
            if len(name.encode()) > _NAME_MAX:
                raise UsageError(f"{where}: the installer's name {name} would be longer than {_NAME_MAX} bytes",
                                 "stamp this group alone: `builder stamp --account-id ... --out FILE`")
            same = (enrollment.account_id.casefold(), enrollment.group_id.casefold())
            if same in seen:
                raise UsageError(f"{where}: account {enrollment.account_id} group {enrollment.group_id} is on line "
                                 f"{seen[same]} too (both would be written to {name})",
                                 "give each group once (ids that differ only in case count as one)")
            seen[same] = number
            groups.append(GroupLine(number, enrollment))
    finally:
        # As `stamp --token-env`: no tool or child process started later inherits a token.
        for name in withheld:
            runner.withhold_env(name)
    if not groups:
        raise UsageError(f"--groups {path}: holds no groups", "write one JSON object per line")
    return groups


def sign_groups(groups: list[GroupLine], sign, where: str = "--groups") -> list[tuple[int, SignedEnrollment]]:
    """(line, `sign(enrollment)`) of every group; an error (a console host the release does not
    pin) names its line."""
    signed = []
    for g in groups:
        try:
            signed.append((g.line, sign(g.enrollment)))
        except BuilderError as exc:
            raise _at(f"{where} line {g.line}", exc) from None
    return signed


@contextlib.contextmanager
def _writing(out: Path, name: str):
    """An OSError while an installer is made (a full disk) as the one-line OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{{field}} {out}: cannot write {name} ({exc.strerror or exc.__class__.__name__}); nothing was placed",
                          "check free space and permissions, then run again", field="out") from None


def stamp_groups(release: Release, fmt: str, groups: list[tuple[int, SignedEnrollment]], signers: Signers,
                 out: Path, *, where: str = "--groups") -> list[Stamped]:
    """Every group's `fmt` installer in the folder `out`, named by `group_file_name`: all or none.

    Each (line, enrollment) is checked against the release's pins, `out` and every output name
    checked, and the base file checked against the manifest (and its signature), before
    anything is written. The installers are made in a new private folder inside `out` and moved
    into place only once every one is made: a failure before that leaves `out` as it was. An
    existing installer of the same name is replaced (a re-run writes the same names)."""
    kind = formats.kind(fmt)
    for line, enrollment in groups:
        try:
            check_pinned(release, enrollment)
        except BuilderError as exc:
            raise _at(f"{where} line {line}", exc) from None
    names = [group_file_name(e.account_id, e.group_id, fmt) for _, e in groups]
    base = release.file(kind.base)  # checked (sha256, signature) before `out` is touched
    if not kind.slotted and not signers.unsigned:
        release.require_trusted_signature(kind.base)  # before `out` is touched too
    if out.exists() and not out.is_dir():
        raise OutputError(f"{{field}} {out}: is not a folder", "with --groups, --out is the folder the installers go to", field="out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{{field}} {out}: cannot write there ({exc.strerror or exc})", "choose a writable folder", field="out") from None
    for name in names:
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise OutputError(f"{{field}} {out}: {name} is a folder", "move it away: the installer is written there", field="out")
    for _, enrollment in groups:
        log.register_secret(enrollment.token.reveal())
    # Everything is written into a new 0700 folder inside `out` (as a single stamp does beside
    # its output): nothing follows a planted link, nobody else reads a token on the way.
    try:
        work = fileio.new_private_dir(out / "groups")
    except OSError as exc:
        raise OutputError(f"{{field}} {out}: cannot write there ({exc.strerror or exc})", "choose a writable folder", field="out") from None
    made: list[Stamped] = []
    try:
        product_signers = signers.for_product(release.product().name)
        for i, ((line, enrollment), name) in enumerate(zip(groups, names), 1):
            with log.step(f"[{i}/{len(groups)}] {fmt}: {name}"), _writing(out, name):
                one = _make(release, fmt, base, enrollment, product_signers, work / name)
            made.append(replace(one, path=out / name))
        placed = 0
        for name in names:
            try:
                os.replace(work / name, out / name)
            except OSError as exc:
                raise OutputError(f"{{field}} {out}: cannot move {name} into place ({exc.strerror or exc}); "
                                  f"{placed} of {len(names)} installers were placed, complete",
                                  "fix the folder and run again: the same groups get the same names", field="out") from None
            placed += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return made

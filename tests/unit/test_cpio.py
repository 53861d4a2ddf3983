"""cpio odc writer and reader, checked with GNU cpio and bsdtar."""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from builder.binfmt.cpio import (
    TreeEntry,
    payload_stats,
    read_cpio,
    scan_tree,
    write_cpio,
    write_cpio_entries,
)
from builder.errors import FormatError, PayloadError

EPOCH = 1_700_000_000


def make_tree(root: Path) -> Path:
    """A small payload: nested folders, an executable, a text file, an empty file, a symlink,
    an empty folder, names with a space and a non-ASCII letter, and odd source permissions."""
    rng = random.Random(7)
    (root / "Library/Agent/bin").mkdir(parents=True)
    (root / "Library/Agent/empty dir").mkdir()
    (root / "Library/Agent/bin/agent").write_bytes(rng.randbytes(70_000))
    os.chmod(root / "Library/Agent/bin/agent", 0o700)  # any x bit -> 0755
    (root / "Library/Agent/config.json").write_text('{"a": 1}\n')
    os.chmod(root / "Library/Agent/config.json", 0o600)  # no x bit -> 0644
    (root / "Library/Agent/naïve note.txt").write_bytes(b"caf\xc3\xa9\n")
    (root / "Library/Agent/zero").write_bytes(b"")
    os.symlink("bin/agent", root / "Library/Agent/current")
    os.chmod(root / "Library", 0o700)  # folders -> 0755
    return root


def run(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    return subprocess.run(list(args), cwd=cwd, input=stdin, capture_output=True,
                          check=True).stdout.decode()


def build(tree: Path, **kwargs) -> bytes:
    out = io.BytesIO()
    write_cpio(tree, out, mtime=EPOCH, **kwargs)
    return out.getvalue()


EXPECTED_NAMES = [
    ".",
    "./Library",
    "./Library/Agent",
    "./Library/Agent/bin",
    "./Library/Agent/bin/agent",
    "./Library/Agent/config.json",
    "./Library/Agent/current",
    "./Library/Agent/empty dir",
    "./Library/Agent/naïve note.txt",
    "./Library/Agent/zero",
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "root")


def test_cpio_lists_names_modes_and_owners(tree, tmp_path):
    archive = tmp_path / "Payload.cpio"
    archive.write_bytes(build(tree))
    listing = run("cpio", "-itvn", "--quiet", "-F", str(archive))
    rows = {}
    for line in listing.splitlines():
        perms, _nlink, uid, gid, _size, _month, _day, _year, name = line.split(None, 8)
        rows[name.split(" -> ")[0]] = (perms, uid, gid)
    assert list(rows) == EXPECTED_NAMES
    assert {(uid, gid) for _, uid, gid in rows.values()} == {("0", "80")}
    assert rows["./Library"][0] == "drwxr-xr-x"
    assert rows["./Library/Agent/bin/agent"][0] == "-rwxr-xr-x"
    assert rows["./Library/Agent/config.json"][0] == "-rw-r--r--"
    assert rows["./Library/Agent/current"][0] == "lrwxr-xr-x"
    assert "./Library/Agent/current -> bin/agent" in listing


def test_cpio_extracts_byte_identical(tree, tmp_path):
    archive = tmp_path / "Payload.cpio"
    archive.write_bytes(build(tree))
    dest = tmp_path / "out"
    dest.mkdir()
    run("cpio", "-idm", "--quiet", "-F", str(archive), cwd=dest)
    for rel in ("Library/Agent/bin/agent", "Library/Agent/config.json",
                "Library/Agent/naïve note.txt", "Library/Agent/zero"):
        assert (dest / rel).read_bytes() == (tree / rel).read_bytes(), rel
    assert os.readlink(dest / "Library/Agent/current") == "bin/agent"
    assert stat.S_IMODE((dest / "Library/Agent/bin/agent").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "Library/Agent/config.json").stat().st_mode) == 0o644
    assert (dest / "Library/Agent/empty dir").is_dir()
    assert int((dest / "Library/Agent/zero").stat().st_mtime) == EPOCH


def test_bsdtar_reads_it(tree, tmp_path):
    archive = tmp_path / "Payload.cpio"
    archive.write_bytes(build(tree))
    names = [line.split(" -> ")[0] for line in run("bsdtar", "-tf", str(archive)).splitlines()]
    assert names == EXPECTED_NAMES
    verbose = run("bsdtar", "-tvf", str(archive))
    assert "-rwxr-xr-x  1 0      80      70000" in verbose


def test_deterministic_whatever_the_disk_times(tree):
    first = build(tree)
    os.utime(tree / "Library/Agent/config.json", (1, 1))
    os.utime(tree / "Library", (2_000_000_000, 2_000_000_000))
    assert build(tree) == first
    assert build(tree, gid=0) != first


def test_reader_round_trip(tree):
    data = build(tree)
    entries = read_cpio(io.BytesIO(data), with_data=True)
    assert [e.name for e in entries] == EXPECTED_NAMES
    by_name = {e.name: e for e in entries}
    agent = by_name["./Library/Agent/bin/agent"]
    assert agent.data == (tree / "Library/Agent/bin/agent").read_bytes()
    assert (agent.mode, agent.uid, agent.gid, agent.mtime, agent.size) == (
        0o100755, 0, 80, EPOCH, 70_000)
    assert by_name["./Library/Agent/current"].data == b"bin/agent"
    assert by_name["."].mode == 0o40755
    assert len({e.ino for e in entries}) == len(entries)
    # Listing without data reads the same headers.
    assert [(e.name, e.size) for e in read_cpio(io.BytesIO(data))] == [
        (e.name, e.size) for e in entries]


def test_mode_override_and_owner(tree, tmp_path):
    data = build(tree, modes={"./Library/Agent/bin/agent": 0o750, ".": 0o775}, uid=501, gid=20)
    by_name = {e.name: e for e in read_cpio(io.BytesIO(data))}
    assert by_name["./Library/Agent/bin/agent"].mode == 0o100750
    assert by_name["."].mode == 0o40775
    assert {(e.uid, e.gid) for e in by_name.values()} == {(501, 20)}


def test_unknown_override_is_refused(tree):
    with pytest.raises(PayloadError, match="Library/Agent/typo"):
        build(tree, modes={"Library/Agent/typo": 0o755})


def test_stats_for_package_info(tree):
    entries = scan_tree(tree, mtime=EPOCH)
    stats = payload_stats(entries)
    assert stats.number_of_files == len(EXPECTED_NAMES)
    # 70000 + 9 + 6 + 0 file bytes + 9 bytes of symlink target -> 69 KiB rounded up
    assert stats.install_kbytes == (70_000 + 9 + 6 + 9 + 1023) // 1024
    assert write_cpio(tree, io.BytesIO(), mtime=EPOCH) == stats


def test_archive_is_padded_and_ends_with_trailer(tree):
    data = build(tree)
    assert len(data) % 512 == 0
    assert b"TRAILER!!!\0" in data[-600:]


def test_missing_folder_and_special_files(tmp_path):
    with pytest.raises(PayloadError, match="does not exist"):
        scan_tree(tmp_path / "nope", mtime=EPOCH)
    (tmp_path / "root").mkdir()
    os.mkfifo(tmp_path / "root" / "pipe")
    with pytest.raises(PayloadError, match="pipe"):
        scan_tree(tmp_path / "root", mtime=EPOCH)


def test_file_changing_size_is_caught(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f").write_bytes(b"12345")
    entries = scan_tree(tmp_path / "root", mtime=EPOCH)
    (tmp_path / "root" / "f").write_bytes(b"123456")
    with pytest.raises(PayloadError, match="changed size"):
        write_cpio_entries(entries, io.BytesIO())


def test_header_field_overflow_is_refused():
    entry = TreeEntry("big", "symlink", 0o120755, 0, 80, 8 ** 11, 1, link_target=b"x")
    root = TreeEntry("", "dir", 0o40755, 0, 80, 0, 0)
    with pytest.raises(PayloadError, match="mtime"):
        write_cpio_entries([root, entry], io.BytesIO())


def test_truncated_archive(tree):
    data = build(tree)
    with pytest.raises(FormatError, match=r"Payload: .*agent.*truncated"):
        read_cpio(io.BytesIO(data[:1000]), name="Payload")
    with pytest.raises(FormatError, match=r"Payload: truncated cpio header"):
        read_cpio(io.BytesIO(data[:40]), name="Payload")


def test_wrong_magic(tree):
    data = bytearray(build(tree))
    with pytest.raises(FormatError, match=r"Scripts: bad cpio magic '070701'.*newc"):
        read_cpio(io.BytesIO(b"070701" + bytes(data[6:])), name="Scripts")
    data[3] = ord("X")
    with pytest.raises(FormatError, match=r"Scripts: bad cpio magic '070X07'"):
        read_cpio(io.BytesIO(bytes(data)), name="Scripts")


def test_non_octal_field_is_named(tree):
    data = bytearray(build(tree))
    data[6 + 6 + 6 + 2] = ord("9")  # inside the mode field of the first header
    with pytest.raises(FormatError, match="field mode"):
        read_cpio(io.BytesIO(bytes(data)))

"""BOM writer, read back with pyapplebom (the apple-bom crate) and checked against `cksum`."""

from __future__ import annotations

import io
import os
import random
import subprocess
from pathlib import Path

import pyapplebom
import pytest

import builder.binfmt.bom as bom
from builder.binfmt.cpio import read_cpio, write_cpio
from builder.errors import PayloadError

EPOCH = 1_700_000_000


def make_tree(root: Path) -> Path:
    rng = random.Random(11)
    (root / "Library/Agent/bin").mkdir(parents=True)
    (root / "Library/Agent/empty").mkdir()
    (root / "Library/Agent/bin/agent").write_bytes(rng.randbytes(50_000))
    os.chmod(root / "Library/Agent/bin/agent", 0o755)
    (root / "Library/Agent/config.json").write_text('{"a": 1}\n')
    (root / "Library/Agent/zero").write_bytes(b"")
    (root / "Library/Agent/My Tool.app").mkdir()
    (root / "Library/Agent/My Tool.app/Info.plist").write_bytes(b"<plist/>")
    os.symlink("bin/agent", root / "Library/Agent/current")
    return root


def posix_cksum(path: Path) -> int:
    out = subprocess.run(["cksum", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def expected_paths(root: Path) -> dict[str, Path]:
    found = {".": root}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            found["./" + full.relative_to(root).as_posix()] = full
    return found


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "root")


def test_pyapplebom_reads_every_path(tree):
    parsed = pyapplebom.parse_bom(bom.build_bom(tree, mtime=EPOCH))
    assert parsed["header"]["magic"] == "BOMStore"
    assert parsed["parse_errors"] is None
    assert [v["name"] for v in parsed["variables"]] == [
        "BomInfo", "Paths", "HLIndex", "VIndex", "Size64"]
    paths = {p["path"]: p for p in parsed["paths"]}
    on_disk = expected_paths(tree)
    assert set(paths) == set(on_disk)
    assert parsed["paths"][0]["path"] == "."
    for name, full in on_disk.items():
        record = paths[name]
        assert (record["user_id"], record["group_id"], record["mtime"]) == (0, 80, EPOCH), name
        if full.is_symlink():
            assert record["path_type"] == "link"
            assert record["link_name"] == "bin/agent"
            assert record["symbolic_mode"] == "lrwxr-xr-x"
            assert record["size"] == len("bin/agent")
        elif full.is_dir():
            assert record["path_type"] == "directory", name
            assert record["symbolic_mode"] == "drwxr-xr-x", name
        else:
            assert record["path_type"] == "file", name
            assert record["size"] == full.stat().st_size, name
            assert record["crc32"] == posix_cksum(full), name
            want = "-rwxr-xr-x" if name.endswith("/agent") else "-rw-r--r--"
            assert record["symbolic_mode"] == want, name
    assert parsed["bom_info"]["number_of_paths"] == len(on_disk) + 1
    file_bytes = 50_000 + 9 + 8 + len("bin/agent")
    assert parsed["bom_info"]["entries"] == [{"a": 0, "b": 0, "c": file_bytes, "d": 0}]
    assert parsed["hl_index"] == [] and parsed["size64"] == [] and parsed["vindex"] == []


def test_symlink_checksum_is_cksum_of_target(tree, tmp_path):
    target = tmp_path / "target.txt"
    target.write_bytes(b"bin/agent")
    parsed = pyapplebom.parse_bom(bom.build_bom(tree, mtime=EPOCH))
    link = next(p for p in parsed["paths"] if p["path"] == "./Library/Agent/current")
    assert link["crc32"] == posix_cksum(target)


def test_bom_and_payload_describe_the_same_tree(tree):
    out = io.BytesIO()
    write_cpio(tree, out, mtime=EPOCH, modes={"Library/Agent/zero": 0o600})
    payload = {e.name: e for e in read_cpio(io.BytesIO(out.getvalue()))}
    parsed = pyapplebom.parse_bom(bom.build_bom(tree, mtime=EPOCH,
                                                modes={"Library/Agent/zero": 0o600}))
    bom_paths = {p["path"]: p for p in parsed["paths"]}
    assert set(bom_paths) == set(payload)
    for name, entry in payload.items():
        record = bom_paths[name]
        assert record["file_mode"] == entry.mode, name
        assert (record["user_id"], record["group_id"], record["mtime"]) == (
            entry.uid, entry.gid, entry.mtime)
        if record["path_type"] != "directory":
            assert record["size"] == entry.size, name
    assert bom_paths["./Library/Agent/zero"]["symbolic_mode"] == "-rw-------"


def test_parents_come_before_children_in_leaf_order(tree):
    parsed = pyapplebom.parse_bom(bom.build_bom(tree, mtime=EPOCH))
    seen = set()
    for record in parsed["paths"]:
        parent = record["path"].rpartition("/")[0]
        assert record["path"] == "." or parent in seen, record["path"]
        seen.add(record["path"])


def test_leaf_nodes_are_fixed_size_blocks(tree):
    data = bom.build_bom(tree, mtime=EPOCH)
    parsed = pyapplebom.parse_bom(data)
    blocks = {b["index"]: b for b in parsed["blocks"]}
    paths_tree = blocks[2]
    assert (paths_tree["kind"], paths_tree["block_size"]) == ("Tree", 4096)
    root = blocks[paths_tree["block_paths_index"]]
    assert (root["kind"], root["length"], root["is_path_info"]) == ("Paths", 4096, 1)
    assert root["count"] == len(parsed["paths"])


def test_many_paths_span_several_leaves(tmp_path):
    root = tmp_path / "root"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(120):
            (root / f"d{d}" / f"f{i:03d}").write_bytes(b"%d-%d" % (d, i))
    parsed = pyapplebom.parse_bom(bom.build_bom(root, mtime=EPOCH))
    assert len(parsed["paths"]) == 1 + 3 + 360  # more than one 256-path leaf
    assert set(p["path"] for p in parsed["paths"]) == set(expected_paths(root))
    leaves = [b for b in parsed["blocks"] if b["kind"] == "Paths" and b.get("count")]
    assert sorted(b["count"] for b in leaves) == [108, 256]


def test_deep_index_levels(tmp_path, monkeypatch):
    # Shrink the nodes so a small tree needs leaves, index nodes and a root above them.
    monkeypatch.setattr(bom, "LEAF_CAPACITY", 3)
    monkeypatch.setattr(bom, "INDEX_CAPACITY", 2)
    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    for i in range(20):
        (root / "a/b" / f"{i:02d}").write_bytes(bytes([i]) * i)
    parsed = pyapplebom.parse_bom(bom.build_bom(root, mtime=EPOCH))
    assert [p["path"] for p in parsed["paths"]] == [
        ".", "./a", "./a/b"] + [f"./a/b/{i:02d}" for i in range(20)]


def test_deterministic(tree):
    first = bom.build_bom(tree, mtime=EPOCH)
    os.utime(tree / "Library/Agent/config.json", (5, 5))
    assert bom.build_bom(tree, mtime=EPOCH) == first
    assert bom.build_bom(tree, mtime=EPOCH + 1) != first


def test_entries_without_root_are_refused(tree):
    from builder.binfmt.cpio import scan_tree
    entries = scan_tree(tree, mtime=EPOCH)
    with pytest.raises(PayloadError, match="root"):
        bom.build_bom_entries(entries[1:])
    with pytest.raises(PayloadError, match="no parent"):
        bom.build_bom_entries([entries[0], entries[2]])

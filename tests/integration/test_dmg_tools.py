"""The DMG chain with the real tools: xorriso builds the ISO/HFS+ hybrid, builder.binfmt.udif
wraps it, and independent readers (dmg2img, 7-Zip's Dmg and HFS handlers) take it apart."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

from builder.binfmt import udif
from builder.errors import FormatError, PayloadError
from builder.tools import runner, xorriso

EPOCH = 1_700_000_000
VOLUME = "Agent Installer"


def run(*argv: str | os.PathLike, cwd: Path | None = None) -> str:
    """A checking tool outside the builder (tests only); missing tools fail the test."""
    if not shutil.which(str(argv[0])):
        pytest.fail(f"{argv[0]} is not installed (apt-get install dmg2img p7zip-full)")
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def make_folder(root: Path, mtime: int) -> Path:
    rng = random.Random(7)
    (root / "Agent.app" / "Contents" / "MacOS").mkdir(parents=True)
    (root / "Agent.app" / "Contents" / "Info.plist").write_text("<plist><dict/></plist>\n" * 50)
    agent = root / "Agent.app" / "Contents" / "MacOS" / "agent"
    agent.write_bytes(rng.randbytes(300_000))
    agent.chmod(0o755)
    (root / "Install Agent.pkg").write_bytes(rng.randbytes(1_500_000))  # > 1 MiB: several chunks
    (root / "README.txt").write_text("Open Install Agent.pkg to install.\n")
    (root / "empty").write_bytes(b"")
    (root / "R\u00e9sum\u00e9.txt").write_text("non-ASCII name\n")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    """Relative path (NFC) -> content. HFS+ stores names decomposed (NFD); 7-Zip keeps that."""
    return {unicodedata.normalize("NFC", p.relative_to(root).as_posix()): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def build(folder: Path, work: Path, epoch: int = EPOCH) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    iso = xorriso.hfsplus_image(folder, work / "hybrid.img", VOLUME, epoch)
    dmg = work / "Agent.dmg"
    udif.write(iso, dmg)
    return iso, dmg


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("dmg")
    folder = make_folder(base / "content", mtime=1_600_000_000)
    iso, dmg = build(folder, base / "build")
    return folder, iso, dmg


def test_hybrid_has_an_apple_partition_map_with_an_hfsplus_partition(built):
    _, iso, dmg = built
    raw = iso.read_bytes()
    assert raw[:2] == b"ER" and raw[2048:2050] == b"PM"
    assert raw[0x8000 + 40:0x8000 + 72].rstrip(b" ") == VOLUME.encode()  # ISO 9660 volume id
    names = [p.name for p in udif.read(dmg).partitions]
    assert any("(Apple_HFS :" in n for n in names) and names[0] == "Driver Descriptor Map (DDM : 0)"


def test_dmg2img_gives_back_the_raw_image_byte_for_byte(built, tmp_path):
    _, iso, dmg = built
    run("dmg2img", "-s", dmg, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == iso.read_bytes()
    assert udif.unpack(dmg) == iso.read_bytes()  # our own reader agrees


def test_7z_lists_a_dmg_and_finds_no_checksum_error(built):
    _, _, dmg = built
    listing = run("7z", "l", dmg)
    assert "Type = Dmg" in listing
    assert ".hfs" in listing
    tested = run("7z", "t", dmg)
    # 7-Zip checks every table's CRC-32 and warns on a wrong data-fork or master checksum
    assert "Everything is Ok" in tested
    assert "warning" not in tested.lower()


def test_7z_extracts_the_files_byte_for_byte(built, tmp_path):
    """7-Zip opens the HFS+ partition it extracts from the dmg and gives back the folder.

    Two steps: 7-Zip opens a dmg's file system directly only when it holds one partition of an
    unknown type, and the hybrid's ISO 9660 regions ("Gap0 (ISO9660_data : 4)") are a second one.
    """
    folder, _, dmg = built
    run("7z", "x", "-y", f"-o{tmp_path / 'parts'}", dmg)
    [hfs] = list((tmp_path / "parts").glob("*.hfs"))
    listing = run("7z", "l", hfs)
    assert "Type = HFS" in listing
    run("7z", "x", "-y", f"-o{tmp_path / 'files'}", hfs)
    extracted = tmp_path / "files" / VOLUME  # 7-Zip's HFS handler puts the volume name on top
    assert files_of(extracted) == files_of(folder)
    assert os.access(extracted / "Agent.app" / "Contents" / "MacOS" / "agent", os.X_OK)
    assert not os.access(extracted / "README.txt", os.X_OK)
    assert "Re\u0301sume\u0301.txt" in os.listdir(extracted)  # decomposed, as macOS expects on HFS+


def test_whole_chain_is_reproducible(tmp_path, monkeypatch):
    """Same files, other checkout times, folders, permissions, locale and run: the same bytes."""
    first = make_folder(tmp_path / "a" / "content", mtime=1_600_000_000)
    second = make_folder(tmp_path / "b" / "elsewhere", mtime=1_650_000_000)
    (second / "README.txt").chmod(0o600)  # -r normalises permission bits other than x
    monkeypatch.setenv("LC_ALL", "C")  # xorriso converts names from the locale's charset...
    iso1, dmg1 = build(first, tmp_path / "a" / "build")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")  # ...unless told the input charset
    iso2, dmg2 = build(second, tmp_path / "b" / "build")
    assert iso1.read_bytes() == iso2.read_bytes()
    assert dmg1.read_bytes() == dmg2.read_bytes()
    # ...and the epoch does reach the image (so the comparison above can fail):
    _, dmg3 = build(first, tmp_path / "c", epoch=EPOCH + 86400)
    assert dmg3.read_bytes() != dmg1.read_bytes()


def test_xorriso_command_line(monkeypatch, tmp_path):
    seen = {}

    def fake_run(tool, args, **kwargs):
        seen.update(tool=tool, args=[str(a) for a in args], env=kwargs.get("env"))

    monkeypatch.setattr(runner, "run", fake_run)
    xorriso.hfsplus_image(tmp_path, tmp_path / "out.img", "My App", 123)
    assert seen["tool"] == "xorriso"
    assert seen["args"] == [
        "-no_rc", "-stdio_sync", "off", "-as", "mkisofs", "-D", "-l", "-V", "My App", "-r",
        "-dir-mode", "0755", "-sysid", "APPLE", "-input-charset", "utf-8", "-apm-block-size", "2048",
        "-hfsplus", "--set_all_file_dates", "=123", "-o", str(tmp_path / "out.img"), str(tmp_path),
    ]
    assert seen["env"] == {"SOURCE_DATE_EPOCH": "123"}


@pytest.mark.parametrize("name", ["Agent", "My App 1.2", "Acme (Beta)", "a" * 32])
def test_volume_names_that_survive(name):
    assert xorriso.check_volume_name(name) == name


@pytest.mark.parametrize("name", [
    "", " Agent", "Agent ", "a" * 33, "Caf\u00e9", "a:b", "a/b", ".hidden", "tab\there", 'quo"te', "new\nline",
])
def test_volume_names_xorriso_or_hfsplus_would_change(name, tmp_path):
    with pytest.raises(FormatError, match="volume name"):
        xorriso.hfsplus_image(tmp_path, tmp_path / "x.img", name, EPOCH)
    assert not (tmp_path / "x.img").exists()


def test_missing_folder(tmp_path):
    with pytest.raises(PayloadError, match="does not exist"):
        xorriso.hfsplus_image(tmp_path / "nope", tmp_path / "x.img", "Agent", EPOCH)

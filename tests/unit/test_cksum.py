"""The zlib-based POSIX cksum against coreutils' `cksum`."""

from __future__ import annotations

import io
import random
import subprocess

import pytest

from builder.binfmt.cksum import Cksum, cksum, cksum_file, cksum_stream


def posix_cksum(path) -> tuple[int, int]:
    out = subprocess.run(["cksum", str(path)], check=True, capture_output=True, text=True).stdout
    crc, size, _ = out.split(maxsplit=2)
    return int(crc), int(size)


@pytest.mark.parametrize("size", [0, 1, 7, (1 << 20) + 3])
def test_matches_cksum_command(tmp_path, size):
    data = random.Random(size).randbytes(size)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    expected = posix_cksum(path)
    assert (cksum(data), len(data)) == expected
    assert cksum_file(path) == expected
    # Small chunks cross every internal boundary, the length tail included.
    assert cksum_file(path, chunk_size=4093) == expected


def test_known_value():
    # POSIX cksum of "123456789" (no newline), as printed by `printf 123456789 | cksum`.
    assert cksum(b"123456789") == 930766865


def test_incremental_equals_one_shot():
    data = random.Random(1).randbytes(70_001)
    state = Cksum()
    for start in range(0, len(data), 9_999):
        state.update(memoryview(data)[start:start + 9_999])
    assert state.value == cksum(data)
    assert state.length == len(data)
    assert cksum_stream(io.BytesIO(data), chunk_size=3) == (cksum(data), len(data))


def test_length_is_part_of_the_crc():
    # Zero bytes leave a zero register; only the appended length tells these apart. (Beyond 255
    # the real cksum collides too: 1 and 256 zero bytes both print 4215202376.)
    assert len({cksum(b"\0" * n) for n in range(256)}) == 256
    assert cksum(b"\0") == cksum(b"\0" * 256) == 4215202376

"""The parallel gzip writer: the same bytes whatever the thread count, read back by gzip."""

import io
import random
import subprocess

from builder.binfmt import gzipstream


def test_parallel_gzip_reads_back_with_gzip_and_ignores_thread_count(tmp_path):
    rng = random.Random(7)
    # Compressible and incompressible chunks, and a tail that is not a whole chunk.
    data = b"".join([b"agent " * 300_000, rng.randbytes(3 * gzipstream.CHUNK), bytes(gzipstream.CHUNK // 3),
                     b"tail"])
    outputs = []
    for workers in (1, 3):
        buffer = io.BytesIO()
        with gzipstream.ParallelGzip(buffer, workers=workers) as gz:
            for start in range(0, len(data), 77_777):  # writes that straddle chunk boundaries
                gz.write(data[start:start + 77_777])
        outputs.append(buffer.getvalue())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) < len(data) - 1_500_000  # the text part was deflated
    (tmp_path / "x.gz").write_bytes(outputs[0])
    unpacked = subprocess.run(["gzip", "-dc", str(tmp_path / "x.gz")], check=True, capture_output=True).stdout
    assert unpacked == data
    assert subprocess.run(["gzip", "-t", str(tmp_path / "x.gz")]).returncode == 0

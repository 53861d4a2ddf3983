"""Issue 3: the macOS builds (pkg, dmg) of a 30 MB payload, and the BOM's POSIX cksum."""

from __future__ import annotations

import shutil
import subprocess
import time

from builder import build, log
from builder.binfmt import cksum as cksum_mod
from tests.bench.common import VERSION, Bench
from tests.bench.measure import heading, median, table, verdict

RUNS = 3
TARGETS = {"pkg": 1.5, "dmg": 2.0}
PROTOTYPE = {"pkg": 0.9, "dmg": 0.7}
BYTE_LOOP_BYTES = 1 << 20


def _byte_loop_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
        table.append(c & 0xFFFFFFFF)
    return table


_TABLE = _byte_loop_table()


def cksum_byte_loop(data: bytes) -> int:
    """POSIX cksum, one byte at a time, table-driven: the obvious pure-Python way."""
    crc, table = 0, _TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    n = len(data)
    while n:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ (n & 0xFF)]
        n >>= 8
    return ~crc & 0xFFFFFFFF


def _build(bench: Bench, fmt: str, n: int) -> tuple[float, dict]:
    out = bench.work / "mac-out" / f"{fmt}-{n}"
    enrollment = bench.enrollment("bench-macos")
    log.take_timings()
    start = time.perf_counter()
    build.build(format_names=[fmt], product=bench.product, version=VERSION, payload=bench.payload,
                enrollment=enrollment, trust=bench.trust, signers=bench.signers, out=out, source_date_epoch=bench.epoch)
    total = time.perf_counter() - start
    steps: dict[str, float] = {}
    for title, seconds in log.take_timings():
        steps[title] = steps.get(title, 0.0) + seconds
    shutil.rmtree(out)
    return total, steps


def run(bench: Bench, runs: int = RUNS) -> dict:
    data = bench.data_file("macos")
    heading(f"2. macOS build (issue 3): {data.stat().st_size / 2**20:.0f} MB payload, median of {runs} runs")
    result: dict = {"runs": runs}
    samples: dict[str, list[tuple[float, dict]]] = {"pkg": [], "dmg": []}
    for n in range(runs):
        for fmt in samples:
            samples[fmt].append(_build(bench, fmt, n))
    rows = []
    for fmt, got in samples.items():
        total = median([t for t, _ in got])
        step_names = list(dict.fromkeys(k for _, st in got for k in st))
        steps = {k: median([st.get(k, 0.0) for _, st in got]) for k in step_names}
        built = steps.get(f"{fmt}: build and sign", float("nan"))
        result[fmt] = {"total_s": total, "build_and_sign_s": built, "steps_s": steps, "totals_s": [t for t, _ in got],
                       "target_s": TARGETS[fmt], "prototype_s": PROTOTYPE[fmt], "verdict": verdict(total, TARGETS[fmt])}
        rows.append([fmt, built, steps.get(f"{fmt}: verify"), total, TARGETS[fmt], PROTOTYPE[fmt], result[fmt]["verdict"]])
    table(["format", "build+sign s", "verify s", "total s", "target s", "prototype s", "total vs target"], rows)
    for fmt in samples:
        parts = ", ".join(f"{_short(k)} {v:.3f}" for k, v in result[fmt]["steps_s"].items()
                          if k not in (f"{fmt}: build and sign", f"{fmt}: verify"))
        print(f"  {fmt} steps inside build+sign (s): {parts}")
    print("  (total = build.build(): build, sign, verify, sha256 and move into --out; not notarized: no credentials)")

    # -- cksum ---------------------------------------------------------------------------------
    size = data.stat().st_size
    ours_s = median([_time(lambda: cksum_mod.cksum_file(data))[0] for _ in range(3)])
    ours = cksum_mod.cksum_file(data)[0]
    cmd_s, proc = _time(lambda: subprocess.run(["cksum", str(data)], capture_output=True, check=True))
    cmd_s = min(cmd_s, *(_time(lambda: subprocess.run(["cksum", str(data)], capture_output=True, check=True))[0] for _ in range(2)))
    theirs = int(proc.stdout.split()[0])
    head = data.read_bytes()[:BYTE_LOOP_BYTES]
    loop_s, loop_value = _time(lambda: cksum_byte_loop(head))
    if loop_value != cksum_mod.cksum(head):
        raise AssertionError("bench: the byte-loop cksum and builder.binfmt.cksum disagree on 1 MB")
    if ours != theirs:
        raise AssertionError(f"bench: builder.binfmt.cksum gives {ours}, cksum(1) gives {theirs}")
    loop_full = loop_s * size / BYTE_LOOP_BYTES
    result["cksum"] = {"bytes": size, "builder_s": ours_s, "cksum_cmd_s": cmd_s, "byte_loop_1mb_s": loop_s,
                       "byte_loop_extrapolated_s": loop_full, "agree": True}
    print()
    print(f"POSIX cksum of {size / 2**20:.0f} MB (values agree: {ours}):")
    table(["method", "seconds", "MB/s"], [
        ["builder.binfmt.cksum (zlib.crc32 on bit-reversed bytes)", ours_s, f"{size / ours_s / 1e6:.0f}"],
        ["cksum command (coreutils)", cmd_s, f"{size / cmd_s / 1e6:.0f}"],
        [f"pure-Python byte loop ({BYTE_LOOP_BYTES >> 20} MB, x{size / BYTE_LOOP_BYTES:.0f})", loop_full,
         f"{BYTE_LOOP_BYTES / loop_s / 1e6:.1f}"],
    ])
    print(f"  builder is {loop_full / ours_s:.0f}x faster than a byte loop, "
          f"{ours_s / cmd_s:.1f}x the time of the cksum command")
    return result


def _short(title: str) -> str:
    """'pkg: xar' -> 'xar'; 'Signing agent (Developer ID ...)' -> 'sign agent'."""
    if title.startswith("Signing "):
        return "sign " + title[len("Signing "):].split(" (", 1)[0]
    return title.split(": ", 1)[-1]


def _time(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value

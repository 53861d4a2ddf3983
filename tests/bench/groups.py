"""`stamp --groups`: groups per second for exe and msi-tagged from one 30 MB release, side by
side, and what opening the release costs when every format is checked (eager) against only the
one a stamp reads (lazy).

In `make bench` it runs on the stamping section's release. Alone, it builds a 30 MB
release of the four formats first (under a minute):

    .venv/bin/python -m tests.bench.groups [GROUPS]
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from builder import formats, log, release, stamp
from builder.release import Release
from builder.signing.signers import Signers
from tests.bench.common import REPO, VERSION, Bench, make_bench
from tests.bench.measure import heading, median, ms, s, table

GROUPS = 200  # groups per --groups run
OPEN_RUNS = 3
CLI_GROUPS = 50


def _groups_file(bench: Bench, folder: Path, n: int) -> Path:
    """A groups file of `n` groups, each token in a file of its own beside it."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        (folder / f"t{i}").write_text(secrets.token_urlsafe(32))
        lines.append(f'{{"account": "bench-account", "group": "bench-group-{i}", "token_file": "t{i}", '
                     f'"console_url": "{bench.product.console_url}"}}')
    path = folder / "groups.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _open_times(folder: Path, ca: Path) -> dict:
    """Seconds to open the release with every format checked, and lazily with one format's file
    checked (what a stamp of that format pays), each from a cold process-wide signature cache."""
    def timed(fn) -> float:
        runs = []
        for _ in range(OPEN_RUNS):
            release._verified.clear()
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return median(runs)

    out = {"eager_s": timed(lambda: Release.open(folder, ca=ca)),
           "lazy_manifest_only_s": timed(lambda: Release.open(folder, ca=ca, lazy=True))}
    for fmt in formats.SLOTTED:
        base = formats.kind(fmt).base
        out[f"lazy_{fmt}_s"] = timed(lambda: Release.open(folder, ca=ca, lazy=True).file(base))
    return out


def _library(bench: Bench, folder: Path, fmt: str, groups_file: Path, out: Path) -> dict:
    """The library path `stamp --groups` takes, timed: read and validate the file, sign every
    enrollment, stamp them all (the release opened lazily, its base file checked once)."""
    log.take_timings()
    start = time.perf_counter()
    rel = Release.open(folder, ca=bench.keys.ca_cert, lazy=True)
    lines = stamp.read_groups(groups_file, fmt, rel.product().console_url)
    read = time.perf_counter()
    trust = rel.trust()
    signed = stamp.sign_groups(lines, lambda e: bench.enrollment_key.sign(e, trust))
    signed_at = time.perf_counter()
    made = stamp.stamp_groups(rel, fmt, signed, Signers(verify_ca=bench.keys.ca_cert), out)
    end = time.perf_counter()
    # One output read back: it must verify and carry its group.
    report = formats.get(formats.kind(fmt).base).verify(made[-1].path, bench.keys.ca_cert)
    if not report.get("ok") or (report.get("enrollment") or {}).get("group_id") != signed[-1][1].group_id:
        raise AssertionError(f"bench: a --groups {fmt} output does not verify or lost its enrollment: {report.get('detail')}")
    stamp_s = end - signed_at
    return {"groups": len(made), "total_s": end - start, "read_s": read - start, "sign_s": signed_at - read,
            "stamp_s": stamp_s, "groups_per_s": len(made) / (end - start),
            "stamp_only_groups_per_s": len(made) / stamp_s, "per_group_ms": 1000 * stamp_s / len(made)}


def _cli(bench: Bench, folder: Path, fmt: str, groups_file: Path, out: Path) -> dict:
    """`builder stamp --groups` as a process: start-up, lazy open and checks included."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "builder", "-q", "stamp", "--release", str(folder), "--format", fmt,
                           "--groups", str(groups_file), "--out", str(out), "--ca", str(bench.keys.ca_cert),
                           "--enrollment-key", str(bench.enrollment_key_file), "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"bench: builder stamp --groups {fmt} exited {proc.returncode}: {proc.stderr[-500:]}")
    return {"groups": CLI_GROUPS, "total_s": seconds, "groups_per_s": CLI_GROUPS / seconds}


def run(bench: Bench, folder: Path) -> dict:
    heading(f"4. stamp --groups: many groups from one 30 MB release ({GROUPS} groups per run)")
    opened = _open_times(folder, bench.keys.ca_cert)
    print(f"Release.open, median of {OPEN_RUNS}, cold signature cache: every format checked (before) "
          f"{s(opened['eager_s'])}; lazy, manifest only {ms(opened['lazy_manifest_only_s'])}; lazy + the exe checked "
          f"{s(opened['lazy_exe_s'])}; lazy + the msi checked {s(opened['lazy_msi-tagged_s'])}")
    work = Path(tempfile.mkdtemp(prefix="groups-", dir=bench.work))
    result: dict = {"open": opened}
    try:
        groups_file = _groups_file(bench, work / "in", GROUPS)
        cli_file = _groups_file(bench, work / "in-cli", CLI_GROUPS)
        for fmt in formats.SLOTTED:
            out = work / f"out-{fmt}"
            result[fmt] = _library(bench, folder, fmt, groups_file, out)
            shutil.rmtree(out)
            result[fmt]["cli"] = _cli(bench, folder, fmt, cli_file, out)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    table(["format", "groups", "read+validate", "sign", "stamp all", "per group", "groups/s (library)",
           f"groups/s (CLI, {CLI_GROUPS} groups)"],
          [[fmt, r["groups"], s(r["read_s"]), s(r["sign_s"]), s(r["stamp_s"]), ms(r["per_group_ms"] / 1000),
            f"{r['groups_per_s']:.0f}", f"{r['cli']['groups_per_s']:.1f}"] for fmt, r in
           ((f, result[f]) for f in formats.SLOTTED)])
    print("  groups/s (library): read, validate, sign and stamp every group, written and hashed, one process;"
          " CLI: the command, Python start-up and the lazy release open included")
    return result


def main() -> int:
    log.setup(quiet=True)
    global GROUPS
    if len(sys.argv) > 1:
        GROUPS = int(sys.argv[1])
    out = REPO / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="groups-work-", dir=out) as tmp:
        bench = make_bench(Path(tmp))
        folder = bench.work / "release" / VERSION
        start = time.perf_counter()
        release.release(format_names=["exe", "msi", "pkg", "dmg"], product=bench.product, version=VERSION, payload=bench.payload,
                        signers=bench.signers, trust=bench.trust, out=folder, source_date_epoch=bench.epoch)
        print(f"30 MB release of exe, msi, pkg and dmg built in {s(time.perf_counter() - start)}")
        run(bench, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

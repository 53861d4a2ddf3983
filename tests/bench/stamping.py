"""Issue 4: stamping one group's installer from a 30 MB release, against building it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from builder import formats, log, release, stamp
from builder.release import Release
from tests.bench.common import VERSION, Bench
from tests.bench.measure import ToolClock, heading, median, ms, s, table, verdict

RANGE_RUNS = 200
COPY_RUNS = 20
STAMP_RUNS = 3
TAG_RUNS = 5
TARGETS = {"ranges_s": 0.005, "moved_pct": 1.0, "baked_msi_s": 0.4}
CERTIFICATE_TAG_ENV = "BENCH_CERTIFICATE_TAG"


def make_release(bench: Bench) -> tuple[Release, dict]:
    folder = bench.work / "release" / VERSION
    log.take_timings()
    start = time.perf_counter()
    release.release(format_names=["exe", "msi", "pkg", "dmg"], product=bench.product, version=VERSION,
                    payload=bench.payload, signers=bench.signers, trust=bench.trust, out=folder,
                    source_date_epoch=bench.epoch)
    built = time.perf_counter() - start
    start = time.perf_counter()
    rel = Release.open(folder, ca=bench.keys.ca_cert)
    opened = time.perf_counter() - start
    return rel, {"release_s": built, "open_verify_s": opened,
                 "sizes": {f: e["size"] for f, e in rel.manifest["files"].items()}}


def _each(n: int, fn) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def _slotted(bench: Bench, rel: Release, fmt: str, scratch: Path) -> dict:
    """Ranges, a full written copy, and a copy by other means, for the exe or msi-tagged."""
    base = rel.file(formats.kind(fmt).base)
    # Timed with the ES256 signature of each group's enrollment: what a stamp costs in all.
    enrollments = [bench.plain(f"bench-ranges-{i}") for i in range(RANGE_RUNS)]
    sign = bench.enrollment_key.sign
    ranges = _each(RANGE_RUNS, lambda i: stamp.stamp_ranges(base, sign(enrollments[i], bench.trust)))
    pieces = stamp.stamp_ranges(base, sign(enrollments[0], bench.trust))
    moved = sum(len(p[1]) for p in pieces if p[0] == "bytes")
    size = base.entry["size"]

    def fresh(i: int, tag: str) -> Path:
        path = scratch / f"{fmt}-{tag}-{i}{formats.kind(fmt).suffix}"
        path.unlink(missing_ok=True)
        return path

    def timed_copies(copy) -> list[float]:
        times = []
        for i in range(COPY_RUNS):
            dst = fresh(i, "copy")
            start = time.perf_counter()
            copy(dst)
            times.append(time.perf_counter() - start)
            dst.unlink()
        return times

    write = timed_copies(lambda dst: stamp.write_pieces(base.path, pieces, dst))
    cp = timed_copies(lambda dst: subprocess.run(["cp", str(base.path), str(dst)], check=True))
    copyfile = timed_copies(lambda dst: shutil.copyfile(base.path, dst))

    # The whole `builder stamp` path (write, sha256 of the output, rename), and one check that
    # the stamped file still verifies and carries the enrollment.
    whole = []
    for i in range(STAMP_RUNS):
        out = fresh(i, "stamp")
        enrollment = bench.enrollment(f"bench-stamp-{fmt}-{i}")
        start = time.perf_counter()
        stamp.stamp(rel, fmt, enrollment, bench.signers, out)
        whole.append(time.perf_counter() - start)
        if i == 0:
            report = formats.get(formats.kind(fmt).base).verify(out, bench.keys.ca_cert)
            got = (report.get("enrollment") or {}).get("group_id")
            if not report.get("ok") or got != enrollment.group_id:
                raise AssertionError(f"bench: a stamped {fmt} does not verify or lost its enrollment: {report.get('detail')}")
        out.unlink()
    return {
        "file_bytes": size,
        "ranges_median_s": median(ranges), "ranges_max_s": max(ranges), "ranges_runs": RANGE_RUNS,
        "pieces": len(pieces), "bytes_moved": moved, "moved_pct": 100 * moved / size,
        "write_pieces_median_s": median(write), "cp_median_s": median(cp), "copyfile_median_s": median(copyfile),
        "copy_runs": COPY_RUNS, "stamp_median_s": median(whole), "stamp_runs": STAMP_RUNS,
    }


def _resigned(bench: Bench, rel: Release, fmt: str, scratch: Path, clock: ToolClock) -> dict:
    times, tools = [], []
    for i in range(STAMP_RUNS):
        out = scratch / f"{fmt}-{i}{formats.kind(fmt).suffix}"
        clock.take()
        start = time.perf_counter()
        stamp.stamp(rel, fmt, bench.enrollment(f"bench-stamp-{fmt}-{i}"), bench.signers, out)
        times.append(time.perf_counter() - start)
        tools.append(clock.take())
        if i == 0:
            report = formats.get(formats.kind(fmt).suffix[1:]).verify(out, bench.keys.ca_cert)
            if not report.get("ok"):
                raise AssertionError(f"bench: a stamped {fmt} does not verify: {report.get('detail')}")
        out.unlink()
    names = list(dict.fromkeys(k for run in tools for k in run))
    return {"stamp_median_s": median(times), "stamp_runs": STAMP_RUNS, "stamps_s": times,
            "tools_s": {k: median([run.get(k, 0.0) for run in tools]) for k in names}}


def _certificate_tag(bench: Bench, rel: Release, scratch: Path, ours: dict) -> dict:
    tool = os.environ.get(CERTIFICATE_TAG_ENV)
    if not tool:
        print(f"Omaha certificate_tag: not given (set {CERTIFICATE_TAG_ENV}=/path/to/certificate_tag to compare)")
        return {"given": False}
    help_text = subprocess.run([tool, "--help"], capture_output=True, text=True)
    if "set-superfluous-cert-tag" not in help_text.stdout + help_text.stderr:
        print(f"Omaha certificate_tag: {tool} has no -set-superfluous-cert-tag option (see its --help); not compared")
        return {"given": True, "supported": False}
    base = rel.file("exe")
    tag = "0x" + bench.enrollment("bench-omaha").jws.reveal().encode().hex()
    padded = rel.product().slot_size
    times = []
    for i in range(TAG_RUNS):
        out = scratch / f"omaha-{i}.exe"
        start = time.perf_counter()
        proc = subprocess.run([tool, f"-set-superfluous-cert-tag={tag}", f"-padded-length={padded}",
                               f"-out={out}", str(base.path)], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0 or not out.is_file():
            raise AssertionError(f"bench: certificate_tag failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
        out.unlink()
    theirs = median(times)
    print(f"Omaha certificate_tag ({tool}), same release EXE, median of {TAG_RUNS}: {ms(theirs)}")
    for label, key in (("our write_pieces (file written)", "write_pieces_median_s"), ("our builder stamp (incl. sha256)", "stamp_median_s")):
        mine = ours[key]
        how = f"{theirs / mine:.1f}x faster" if mine < theirs else f"{mine / theirs:.1f}x slower"
        print(f"  {label}: {ms(mine)}, {how} than certificate_tag")
    return {"given": True, "supported": True, "median_s": theirs, "runs": TAG_RUNS}


def run(bench: Bench, build_s: dict[str, float]) -> dict:
    heading("3. Stamping (issue 4): one group's installer from a 30 MB release")
    rel, made = make_release(bench)
    print(f"release of exe, msi, pkg, dmg: {s(made['release_s'])}; Release.open with verification: {s(made['open_verify_s'])}")
    scratch = bench.work / "stamps"
    scratch.mkdir()
    result: dict = {"release": made}
    for fmt in formats.SLOTTED:
        result[fmt] = _slotted(bench, rel, fmt, scratch)
    with ToolClock().installed() as clock:
        for fmt in ("msi", "pkg", "dmg"):
            result[fmt] = _resigned(bench, rel, fmt, scratch, clock)

    print()
    print(f"Slot stamps (exe, msi-tagged): ranges median of {RANGE_RUNS}; copies median of {COPY_RUNS}")
    rows = []
    for fmt in formats.SLOTTED:
        r = result[fmt]
        r["ranges_verdict"] = verdict(r["ranges_median_s"], TARGETS["ranges_s"])
        r["moved_verdict"] = verdict(r["moved_pct"], TARGETS["moved_pct"])
        rows.append([fmt, f"{r['file_bytes']:,}", ms(r["ranges_median_s"]), r["ranges_verdict"],
                     f"{r['bytes_moved']:,} B = {r['moved_pct']:.4f} %", r["moved_verdict"],
                     ms(r["write_pieces_median_s"]), ms(r["cp_median_s"]), ms(r["copyfile_median_s"])])
    table(["format", "file bytes", "stamp_ranges", "< 5 ms", "bytes through builder", "< 1 %",
           "write_pieces", "cp (process)", "shutil.copyfile"], rows)
    for fmt in formats.SLOTTED:
        r = result[fmt]
        print(f"  {fmt}: write_pieces / cp = {r['write_pieces_median_s'] / r['cp_median_s']:.2f},"
              f" / shutil.copyfile = {r['write_pieces_median_s'] / r['copyfile_median_s']:.2f};"
              f" {r['pieces']} pieces")

    print()
    print(f"Whole stamps (stamp.stamp: output written, sha256, renamed), median of {STAMP_RUNS}, against a build"
          " of the same format with an enrollment (sections 1 and 2)")
    rows = []
    build_of = {"exe": "exe", "msi-tagged": "msi", "msi": "msi", "pkg": "pkg", "dmg": "dmg"}
    for fmt in ("exe", "msi-tagged", "msi", "pkg", "dmg"):
        r = result[fmt]
        built = build_s[build_of[fmt]]
        r["build_s"] = built
        r["stamp_over_build"] = r["stamp_median_s"] / built
        target = verdict(r["stamp_median_s"], TARGETS["baked_msi_s"]) + " (< 0.4 s)" if fmt == "msi" else ""
        if fmt == "msi":
            r["verdict"] = verdict(r["stamp_median_s"], TARGETS["baked_msi_s"])
        how = {"exe": "slot, no re-sign", "msi-tagged": "slot, no re-sign", "msi": "baked + re-sign",
               "pkg": "rebake + sign", "dmg": "release pkg + sidecar, sign"}[fmt]
        rows.append([fmt, how, s(r["stamp_median_s"]), s(built), f"{r['stamp_over_build']:.3f}", target])
    table(["format", "stamp", "stamp", "build", "stamp/build", "target"], rows)
    for fmt in ("msi", "pkg", "dmg"):
        tools = result[fmt]["tools_s"]
        if tools:
            inside = sum(tools.values())
            print(f"  {fmt} stamp, external tools: " + ", ".join(f"{k} {v:.3f}" for k, v in tools.items())
                  + f"; in-process {result[fmt]['stamp_median_s'] - inside:.3f} s")
    print()
    result["certificate_tag"] = _certificate_tag(bench, rel, scratch, result["exe"])
    result["release_folder"] = str(rel.folder)
    return result

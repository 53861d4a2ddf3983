"""Issue 2: the Windows builds (MSI, EXE, both in parallel) of a 30 MB payload, per tool."""

from __future__ import annotations

import os
import resource
import shutil
import time

from builder import build, log
from tests.bench.common import VERSION, Bench
from tests.bench.measure import ToolClock, heading, median, s, table, verdict

RUNS = 3
PARALLEL_TARGET = 1.3  # both formats together / the slower one alone
# Table columns: what the brief names, then the msitools post-build edits the MSI also runs.
COLUMNS = {
    "render": ("render",),
    "wixl": ("wixl",),
    "makensis": ("makensis",),
    "msitools": ("msibuild", "msiinfo", "msidump"),
    "sign": ("osslsigncode sign",),
    "verify": ("osslsigncode verify",),
}


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the tools), user + system."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _one(bench: Bench, clock: ToolClock, formats: list[str], n: int) -> dict:
    out = bench.work / "win-out" / f"{'-'.join(formats)}-{n}"
    enrollment = bench.enrollment("bench-windows")
    clock.take()
    log.take_timings()
    cpu = _cpu()
    start = time.perf_counter()
    outputs = build.build(format_names=formats, product=bench.product, version=VERSION, payload=bench.payload,
                          enrollment=enrollment, trust=bench.trust, signers=bench.signers, out=out, source_date_epoch=bench.epoch)
    total = time.perf_counter() - start
    cpu = _cpu() - cpu
    tools = clock.take()
    steps = dict(log.take_timings())
    shutil.rmtree(out)
    return {"total": total, "cpu": cpu, "tools": tools, "steps": steps, "size": {o.format: o.size for o in outputs},
            "details": {o.format: o.details for o in outputs}}


def run(bench: Bench, runs: int = RUNS) -> dict:
    heading(f"1. Windows build (issue 2): {bench.data_file('windows').stat().st_size / 2**20:.0f} MB payload, "
            f"median of {runs} runs, seconds")
    samples: dict[str, list[dict]] = {"msi": [], "exe": [], "both": []}
    with ToolClock().installed() as clock:
        for n in range(runs):  # interleaved, so drift on the machine hits all three alike
            samples["msi"].append(_one(bench, clock, ["msi"], n))
            samples["exe"].append(_one(bench, clock, ["exe"], n))
            samples["both"].append(_one(bench, clock, ["msi", "exe"], n))

    def col(kind: str, name: str) -> float:
        return median([sum(r["tools"].get(t, 0.0) for t in COLUMNS[name]) for r in samples[kind]])

    result: dict = {"runs": runs, "payload_bytes": bench.data_file("windows").stat().st_size}
    rows = []
    for kind in ("msi", "exe", "both"):
        cols = {name: col(kind, name) for name in COLUMNS}
        total = median([r["total"] for r in samples[kind]])
        cpu = median([r["cpu"] for r in samples[kind]])
        other = median([r["total"] - sum(sum(r["tools"].get(t, 0.0) for t in ts) for ts in COLUMNS.values())
                        for r in samples[kind]])
        label = {"msi": "msi alone", "exe": "exe alone", "both": "msi + exe (parallel)"}[kind]
        # In the parallel run the tool columns add up both formats' time, side by side.
        rows.append([label, *(cols[c] if cols[c] else None for c in COLUMNS), other if kind != "both" else None, total, cpu])
        result[kind] = {"total_s": total, "cpu_s": cpu, "tools_s": cols, "other_s": other,
                        "totals_s": [r["total"] for r in samples[kind]],
                        "size": samples[kind][0]["size"]}
    table(["", *COLUMNS, "other", "total", "CPU s"], rows)
    print("  msitools: msibuild/msiinfo edits after wixl, and msiinfo/msidump reads of the MSI's verify;"
          " makensis includes signing the uninstaller (!uninstfinalize);")
    print("  other: staging the payload, verify's in-process structure checks, sha256 and the copy into --out;"
          " in the parallel row the tool columns add up both formats")

    slower = max(result["msi"]["total_s"], result["exe"]["total_s"])
    ratio = result["both"]["total_s"] / slower
    result["parallel_ratio"] = ratio
    result["parallel_target"] = PARALLEL_TARGET
    result["parallel_verdict"] = verdict(ratio, PARALLEL_TARGET)
    print(f"both / slower single = {s(result['both']['total_s'])} / {s(slower)} = {ratio:.3f}"
          f"  (target <= {PARALLEL_TARGET}): {result['parallel_verdict']}")
    both = result["both"]
    print(f"  the parallel run kept {both['cpu_s'] / both['total_s']:.2f} of {os.cpu_count()} CPUs busy"
          f" ({both['cpu_s']:.2f} CPU-s; msi alone {result['msi']['cpu_s']:.2f}, exe alone {result['exe']['cpu_s']:.2f});"
          " below the CPU count means it waited for CPUs taken by other work, or for the disk")
    return result

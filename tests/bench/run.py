"""`make bench`: every speed target of issues 2-5, `stamp --groups` throughput (groups per second,
exe and msi-tagged), and issue 10's soak run (RSS of the service and a worker under a stream of
requests), measured side by side in one run.

    .venv/bin/python -m tests.bench.run        (after `make payload-test`)

Prints plain tables with MET / NOT MET beside each target and writes the numbers to
out/bench/results.json. A missed target is reported, never fatal: the exit status is non-zero
only when a section broke (an exception, a failed request). Work files live in a temporary
folder under out/bench/ and are removed at the end; the service section talks to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from builder import __version__, log
from tests.bench import groups, macos, service, soak, stamping, windows
from tests.bench.common import REPO, make_bench
from tests.bench.measure import heading, table

OUT = REPO / "out" / "bench"
RESULTS = OUT / "results.json"


def _machine() -> dict:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "builder": __version__,
        "commit": head.stdout.strip() or None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }


def _targets(results: dict) -> list[list[object]]:
    """One row per target: what, measured, target, verdict."""
    rows = []
    win = results.get("windows")
    if win:
        rows.append(["issue 2: msi+exe parallel / slower single", f"{win['parallel_ratio']:.3f}", "<= 1.3", win["parallel_verdict"]])
    mac = results.get("macos")
    if mac:
        for fmt in ("pkg", "dmg"):
            rows.append([f"issue 3: {fmt} build (30 MB)", f"{mac[fmt]['total_s']:.3f} s", f"<= {mac[fmt]['target_s']} s", mac[fmt]["verdict"]])
    st = results.get("stamping")
    if st:
        for fmt in ("exe", "msi-tagged"):
            r = st[fmt]
            rows.append([f"issue 4: {fmt} stamp_ranges", f"{r['ranges_median_s'] * 1000:.3f} ms", "< 5 ms", r["ranges_verdict"]])
            rows.append([f"issue 4: {fmt} bytes through builder", f"{r['moved_pct']:.4f} %", "< 1 %", r["moved_verdict"]])
        rows.append(["issue 4: baked msi stamp incl. re-sign", f"{st['msi']['stamp_median_s']:.3f} s", "< 0.4 s", st["msi"]["verdict"]])
    svc = results.get("service")
    if svc:
        c = svc["cached"]
        rows.append(["issue 5: cached download-URL requests (httpx client)", f"{c['rps']:.0f} req/s", ">= 500 req/s", c["verdict"]])
        w = svc.get("cached_wrk")
        if w:
            rows.append(["issue 5: cached download-URL requests (wrk client)", f"{w['rps']:.0f} req/s", ">= 500 req/s", w["verdict"]])
        for phase, label in (("first_inprocess", "in-process"), ("first_rq", "RQ workers")):
            r = svc.get(phase, {})
            if "verdict" in r:
                rows.append([f"issue 5: first-time exe p50 ({label})", f"{r['p50_s'] * 1000:.1f} ms", "< 50 ms", r["verdict"]])
            elif "skipped" in r:
                rows.append([f"issue 5: first-time exe p50 ({label})", "-", "< 50 ms", f"NOT MEASURED ({r['skipped']})"])
    sk = results.get("soak")
    if sk:
        for phase, label in (("inprocess", "serve"), ("rq", "serve+worker")):
            r = sk.get(phase) or {}
            if "skipped" in r:
                rows.append([f"issue 10: soak RSS ({label})", "-", f"<= {soak.FLAT_MB} MB growth", f"NOT MEASURED ({r['skipped']})"])
            for proc, p in r.get("processes", {}).items():
                rows.append([f"issue 10: {proc} RSS after warm-up ({label}, {r['soak_requests']} requests)",
                             f"{p['rss_after_warmup_mb']:.1f} -> {p['rss_end_mb']:.1f} MB ({p['growth_mb']:+.2f})",
                             f"<= {soak.FLAT_MB} MB growth", p["verdict"]])
    return rows


def _problems(results: dict) -> list[str]:
    """Failures inside a section that finished: requests that did not succeed."""
    out = []
    svc = results.get("service") or {}
    for phase in ("cached", "cached_wrk", "first_inprocess", "first_rq"):
        r = svc.get(phase) or {}
        if r.get("failures"):
            out.append(f"service {phase}: {r['failures']} failed requests, e.g. {r.get('failure_sample', [])[:1]}")
    for phase, r in (results.get("soak") or {}).items():
        if isinstance(r, dict) and r.get("failures"):
            out.append(f"soak {phase}: {r['failures']} failed requests, e.g. {r.get('failure_sample', [])[:1]}")
    return out


def main() -> int:
    log.setup(quiet=True)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"machine": _machine()}
    errors: list[str] = []
    m = results["machine"]
    print(f"builder {m['builder']} ({m['commit']}), Python {m['python']}, {m['cpus']} CPUs,"
          f" load average {m['loadavg_start'][0]:.2f} at start (other work on this machine skews every number)")

    def section(name: str, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception as exc:  # a broken section is reported and the others still run
            errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
            print(f"\n{name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        bench = make_bench(Path(tmp))
        section("windows", windows.run, bench)
        section("macos", macos.run, bench)
        builds = {}
        if "windows" in results:
            builds.update(msi=results["windows"]["msi"]["total_s"], exe=results["windows"]["exe"]["total_s"])
        if "macos" in results:
            builds.update(pkg=results["macos"]["pkg"]["total_s"], dmg=results["macos"]["dmg"]["total_s"])
        if len(builds) == 4:
            section("stamping", stamping.run, bench, builds)
        else:
            errors.append("stamping: skipped, a build section failed")
        if "stamping" in results:
            section("groups", groups.run, bench, Path(results["stamping"]["release_folder"]))
        else:
            errors.append("groups: skipped, it needs the release the stamping section makes")
        if "stamping" in results:
            section("service", service.run, bench, Path(results["stamping"]["release_folder"]))
        else:
            errors.append("service: skipped, it needs the release the stamping section makes")
        if "stamping" in results:
            section("soak", soak.run, bench.work, Path(results["stamping"]["release_folder"]), bench.keys.ca_cert,
                    bench.enrollment_key_file)
        else:
            errors.append("soak: skipped, it needs the release the stamping section makes")
        results.get("stamping", {}).pop("release_folder", None)

    errors += _problems(results)
    heading("Targets")
    table(["target", "measured", "wanted", "verdict"], _targets(results))
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    results["errors"] = errors
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nbench took {results['seconds']:.0f} s, load average {results['machine']['loadavg_end'][0]:.2f} at the end;"
          f" numbers in {RESULTS.relative_to(REPO)}")
    if errors:
        print("ERRORS:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

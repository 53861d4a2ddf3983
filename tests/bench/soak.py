"""Issue 10: a soak run. `builder serve` (in-process stamping) and then `builder serve` with one
`builder worker` over Redis answer a stream of first-time EXE requests, each for a new group
with a new token; the resident memory (VmRSS) of each server process is sampled as the requests
complete. After a warm-up that fills the bounded caches (records, redactor up to its time
limit, step timings), RSS must stay flat.

Bounded: at most SOAK_REQUESTS requests and SOAK_MAX_SECONDS per phase; 127.0.0.1 only; every
process started here is stopped here, by its own handle.

    .venv/bin/python -m tests.bench.soak        (standalone: makes a small signed EXE release first)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from builder.service.setup import RELEASES_PREFIX
from builder.storage import StorageSettings, open_store, publish_release
from tests.bench.common import REPO, VERSION
from tests.bench.measure import heading, table
from tests.bench.service import Procs, Service, _fernet_key, _start_redis, wait_until

WARM_REQUESTS = 1500
SOAK_REQUESTS = 4000
SOAK_MAX_SECONDS = 60.0
CLIENTS = 4
SAMPLE_EVERY = 250
# What "flat" allows between the end of the warm-up and the end of the soak: allocator noise and
# the redactor's time-bounded share (a request's token is kept up to 15 minutes, ~0.25 KiB each).
FLAT_MB = 4.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _stream(base: str, headers: dict, label: str, count: int, deadline: float, pids: dict[str, int],
                  samples: list[dict], failures: list[str]) -> int:
    """`count` first-time requests by CLIENTS concurrent clients; RSS sampled every SAMPLE_EVERY."""
    done = issued = 0
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            nonlocal done, issued
            while issued < count and time.monotonic() < deadline:
                issued += 1
                body = {"account_id": "soak-account", "group_id": f"{label}-{issued}",
                        "token": secrets.token_urlsafe(32), "format": "exe"}
                r = await client.post("/v1/installers", json=body)
                while r.status_code == 202 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                    r = await client.get(f"/v1/installers/{r.json()['id']}")
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                done += 1
                if done % SAMPLE_EVERY == 0:
                    samples.append({"requests": done, **{name: rss_kb(pid) for name, pid in pids.items()}})

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    return done


def _phase(name: str, svc: Service, headers: dict, pids: dict[str, int]) -> dict:
    failures: list[str] = []
    warm_samples: list[dict] = []
    start = time.monotonic()
    warm = asyncio.run(_stream(svc.base, headers, f"{name}-warm", WARM_REQUESTS, start + SOAK_MAX_SECONDS, pids,
                               warm_samples, failures))
    after_warm = {p: rss_kb(pid) for p, pid in pids.items()}
    samples = [{"requests": 0, **after_warm}]
    soak_start = time.monotonic()
    done = asyncio.run(_stream(svc.base, headers, f"{name}-soak", SOAK_REQUESTS, soak_start + SOAK_MAX_SECONDS, pids,
                               samples, failures))
    seconds = time.monotonic() - soak_start
    end = {p: rss_kb(pid) for p, pid in pids.items()}
    samples.append({"requests": done, **end})
    out = {"warm_requests": warm, "soak_requests": done, "soak_seconds": seconds, "failures": len(failures),
           "failure_sample": failures[:3], "samples": samples, "processes": {}}
    for proc in pids:
        values = [s[proc] for s in samples]
        growth_mb = (end[proc] - after_warm[proc]) / 1024
        out["processes"][proc] = {
            "rss_after_warmup_mb": after_warm[proc] / 1024, "rss_end_mb": end[proc] / 1024,
            "rss_max_mb": max(values) / 1024, "growth_mb": growth_mb,
            "growth_kb_per_1000": (end[proc] - after_warm[proc]) / max(done, 1) * 1000,
            "verdict": "FLAT" if growth_mb <= FLAT_MB and not failures else "NOT FLAT",
        }
    return out


def run(work: Path, release_folder: Path, ca_cert: Path, enrollment_key_file: Path) -> dict:
    heading("5. Soak (issue 10): RSS of `builder serve` and `builder worker` under first-time requests")
    bench = SimpleNamespace(work=work / "soak", keys=SimpleNamespace(ca_cert=ca_cert),
                            enrollment_key_file=enrollment_key_file)
    storage_url = (bench.work / "store").as_uri()
    publish_release(release_folder, open_store(storage_url, StorageSettings()), RELEASES_PREFIX, version=VERSION)
    api_key = secrets.token_urlsafe(24)
    headers = {"Authorization": f"Bearer {api_key}"}
    env = {**os.environ, "BUILDER_API_KEYS": f"soak:{api_key}", "BUILDER_STORAGE_HMAC_KEY": secrets.token_urlsafe(32),
           "BUILDER_QUEUE_KEY": _fernet_key(), "PYTHONUNBUFFERED": "1"}
    result: dict = {"limits": {"warm_requests": WARM_REQUESTS, "soak_requests": SOAK_REQUESTS,
                               "max_seconds_per_phase": SOAK_MAX_SECONDS, "clients": CLIENTS, "flat_mb": FLAT_MB}}
    procs = Procs()
    try:
        svc = Service(procs, bench, name="soak-serve", storage_url=storage_url, env=env)
        result["inprocess"] = _phase("inproc", svc, headers, {"serve": svc.proc.popen.pid})
        svc.proc.stop()
        redis_url, why = _start_redis(procs, bench)
        if redis_url is None:
            result["rq"] = {"skipped": why}
        else:
            worker = procs.start("soak-worker", [sys.executable, "-m", "builder", "-q", "worker", "--redis", redis_url,
                                                 "--storage", storage_url, "--state", str(bench.work / "worker"),
                                                 "--ca", str(ca_cert)], env=env, logs=bench.work / "logs")
            svc = Service(procs, bench, name="soak-serve-rq", storage_url=storage_url, env=env, redis_url=redis_url)
            wait_until(lambda: worker.popen.poll() is None, worker, "the worker started")
            result["rq"] = _phase("rq", svc, headers, {"serve": svc.proc.popen.pid, "worker": worker.popen.pid})
    finally:
        procs.stop_all()
    report(result)
    return result


def rows(result: dict) -> list[list[object]]:
    out = []
    for phase, label in (("inprocess", "serve (in-process stamping)"), ("rq", "serve + RQ worker")):
        r = result.get(phase) or {}
        if "skipped" in r:
            out.append([label, "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"])
            continue
        for proc, p in r.get("processes", {}).items():
            out.append([f"{label}: {proc}", f"{r['warm_requests']}+{r['soak_requests']}", f"{r['soak_seconds']:.0f}",
                        f"{p['rss_after_warmup_mb']:.1f}", f"{p['rss_end_mb']:.1f}", f"{p['growth_mb']:+.2f}",
                        f"{p['growth_kb_per_1000']:+.0f}", p["verdict"]])
    return out


def report(result: dict) -> None:
    lim = result["limits"]
    print(f"{lim['clients']} clients, each request a new group and token; {lim['warm_requests']} warm-up requests, then at most"
          f" {lim['soak_requests']} requests or {lim['max_seconds_per_phase']:.0f} s; flat = at most {lim['flat_mb']} MB growth")
    table(["process", "requests (warm+soak)", "soak s", "RSS after warm-up MB", "RSS end MB", "growth MB",
           "KB per 1000 req", "verdict"], rows(result))
    for phase in ("inprocess", "rq"):
        r = result.get(phase) or {}
        if r.get("samples"):
            names = [k for k in r["samples"][0] if k != "requests"]
            trail = ", ".join(f"{s['requests']}: " + "/".join(f"{s[n] / 1024:.1f}" for n in names) for s in r["samples"])
            print(f"  {phase} RSS MB ({'/'.join(names)}) by requests after warm-up: {trail}")
        if r.get("failures"):
            print(f"  {phase}: {r['failures']} failed requests, e.g. {r['failure_sample'][:1]}")


def main() -> int:
    from builder import log, release
    from builder.signing import devca
    from builder.signing.enrollment_key import FileEnrollmentKey, create_dev_key
    from builder.trust import Trust
    from tests.support.service import signers_for

    log.setup(quiet=True)
    out = REPO / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-", dir=out) as tmp:
        work = Path(tmp)
        keys = devca.create(work / "keys")
        key_file = create_dev_key(keys.folder)
        from builder.config import load_product

        product = load_product()
        trust = Trust((FileEnrollmentKey(key_file).pin,), product.console_hosts)
        release.release(format_names=["exe"], product=product, version=VERSION, payload=REPO / "payload" / "build",
                        signers=signers_for(keys), trust=trust, out=work / "release", source_date_epoch=1767225600)
        result = run(work, work / "release", keys.ca_cert, key_file)
    bad = [r for phase in ("inprocess", "rq") for r in [result.get(phase) or {}] if r.get("failures")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 5: the installer service over loopback, bounded in requests and time.

`builder serve` (uvicorn + create_app) runs in a subprocess on a free 127.0.0.1 port, so the
client below and the server each have a core of their own; with Redis, two `builder worker`
processes stamp over RQ. Every process started here is stopped here, by its own handle.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.servers import free_ports
from builder import stamp
from builder.release import Release
from builder.service.setup import RELEASES_PREFIX
from builder.storage import StorageSettings, index_key, open_store, publish_release
from tests.bench.common import REPO, VERSION, Bench
from tests.bench.measure import heading, median, ms, percentile, table, verdict

CACHED_MAX_REQUESTS = 3000
CACHED_MAX_SECONDS = 15.0
CACHED_CONCURRENCY = 16
FIRST_TIME_GROUPS = 100
FIRST_TIME_CLIENTS = 2  # as many as the service's stamp threads and the RQ workers
FIRST_TIME_MAX_SECONDS = 60.0  # per phase; what is not ready by then counts as not done
RQ_WORKERS = 2
TARGETS = {"cached_rps": 500.0, "first_p50_s": 0.050}
REDIS_SERVER = "/usr/bin/redis-server"


@dataclass
class Proc:
    """A process this bench started, its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@dataclass
class Procs:
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, env: dict, logs: Path) -> Proc:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=REPO)
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(check, proc: Proc, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"bench: {proc.name} exited ({proc.popen.returncode}) before {what}:\n{proc.tail()}")
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"bench: {what} did not happen within {timeout:.0f} s:\n{proc.tail()}")


class Service:
    def __init__(self, procs: Procs, bench: Bench, *, name: str, storage_url: str, env: dict, redis_url: str | None = None):
        self.port = free_ports(1)[0]
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "builder", "-q", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--storage", storage_url, "--state", str(bench.work / "service" / name), "--ca", str(bench.keys.ca_cert),
                "--enrollment-key", str(bench.enrollment_key_file)]
        if redis_url:
            argv += ["--redis", redis_url]
        self.proc = procs.start(name, argv, env=env, logs=bench.work / "service" / "logs")
        wait_until(lambda: httpx.get(self.base + "/healthz", timeout=2).status_code == 200, self.proc, f"{name} answered /healthz")


def _body(group: str, token: str) -> dict:
    return {"account_id": "bench-account", "group_id": group, "token": token, "format": "exe"}


# -- (a) cached download-URL requests --------------------------------------------------------

async def _cached(base: str, headers: dict, body: dict) -> dict:
    limits = httpx.Limits(max_connections=CACHED_CONCURRENCY, max_keepalive_connections=CACHED_CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        first = await client.post("/v1/installers", json=body)
        if first.status_code != 200 or first.json().get("status") != "ready":
            raise RuntimeError(f"bench: the first cached-phase request gave {first.status_code}: {first.text[:300]}")
        latencies: list[float] = []
        failures: list[str] = []
        issued = 0
        deadline = time.perf_counter() + CACHED_MAX_SECONDS

        async def one_client() -> None:
            nonlocal issued
            while issued < CACHED_MAX_REQUESTS and time.perf_counter() < deadline:
                issued += 1
                start = time.perf_counter()
                r = await client.post("/v1/installers", json=body)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200 or r.json().get("status") != "ready":
                    failures.append(f"{r.status_code} {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(CACHED_CONCURRENCY)))
        elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "failures": len(failures),
            "failure_sample": failures[:3], "concurrency": CACHED_CONCURRENCY}


def _cached_wrk(base: str, headers: dict, body: dict, work: Path) -> dict | None:
    """The same cached request from wrk (a C load generator, Debian's `wrk`), so the client does
    not take the server's CPU the way a Python client does. None when wrk is not installed."""
    import json
    import re
    import shutil
    import subprocess

    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    script = work / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([wrk, "-t2", f"-c{CACHED_CONCURRENCY}", "-d10s", "--timeout", "10s", "--latency", "-s", str(script),
                           base + "/v1/installers"], capture_output=True, text=True, timeout=60)
    script.unlink()
    out = proc.stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)s", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if proc.returncode != 0 or not rps or not total:
        raise RuntimeError(f"bench: wrk failed: {proc.stderr[-500:]}{out[-500:]}")
    return {"requests": int(total.group(1)), "seconds": float(total.group(2)), "rps": float(rps.group(1)),
            "p50_s": latency("50"), "p99_s": latency("99"), "failures": int(bad.group(1)) if bad else 0,
            "concurrency": CACHED_CONCURRENCY, "client": "wrk"}


# -- (b) first-time EXE stamps -----------------------------------------------------------------

def _first_time(base: str, headers: dict, groups: list[str], *, deadline_s: float) -> dict:
    """Each group requested once: latency from the POST until its installer is ready (the
    POST itself when the service answers "ready", else polling GET /v1/installers/{id})."""
    todo = list(groups)
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    answers: list[dict] = []
    deadline = time.perf_counter() + deadline_s

    def client_loop() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            while time.perf_counter() < deadline:
                with lock:
                    if not todo:
                        return
                    group = todo.pop(0)
                start = time.perf_counter()
                r = client.post("/v1/installers", json=_body(group, secrets.token_urlsafe(32)))
                while r.status_code == 202 and time.perf_counter() < deadline:
                    time.sleep(0.005)
                    r = client.get(f"/v1/installers/{r.json()['id']}")
                elapsed = time.perf_counter() - start
                with lock:
                    if r.status_code == 200 and r.json().get("status") == "ready":
                        latencies.append(elapsed)
                        answers.append(r.json())
                    elif r.status_code != 202:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(FIRST_TIME_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"requested": len(groups), "ready": len(latencies), "seconds": elapsed, "clients": FIRST_TIME_CLIENTS,
            "per_second": len(latencies) / elapsed, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "max_s": max(latencies) if latencies else float("nan"), "failures": len(failures),
            "failure_sample": failures[:3], "not_done": len(groups) - len(latencies) - len(failures),
            "_answers": answers}


def _check_download(base: str, headers: dict, answer: dict, expect_size: int) -> None:
    """One installer fetched through its link: the bytes the service said it stored."""
    h = hashlib.sha256()
    size = 0
    with httpx.stream("GET", answer["url"], timeout=60) as r:
        if r.status_code != 200:
            raise RuntimeError(f"bench: download gave {r.status_code}")
        for chunk in r.iter_bytes(1 << 20):
            h.update(chunk)
            size += len(chunk)
    if h.hexdigest() != answer["sha256"] or size != expect_size:
        raise RuntimeError(f"bench: downloaded installer differs from its record ({size} bytes)")


def _start_redis(procs: Procs, bench: Bench) -> tuple[str | None, str]:
    if not os.path.exists(REDIS_SERVER):
        return None, f"{REDIS_SERVER} is not installed"
    port = free_ports(1)[0]
    folder = bench.work / "redis"
    folder.mkdir()
    proc = procs.start("redis", [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder), "--protected-mode", "yes"],
                       env=dict(os.environ), logs=bench.work / "service" / "logs")
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        wait_until(lambda: client.ping(), proc, "redis answered PING", timeout=15)
    except RuntimeError as exc:
        return None, f"redis did not start: {exc}"
    return f"redis://127.0.0.1:{port}/0", ""


def _storage_write(bench: Bench, store, release_folder: Path, runs: int = 5) -> dict:
    """What one first-time EXE stamp costs in the file:// store alone, without HTTP or queue:
    put_pieces_if_absent of a new 30 MB object (read, sha256, write, fsync, link)."""
    rel = Release.open(release_folder, verify=False)
    base = rel.file("exe")
    index = json.loads(store.get(index_key(RELEASES_PREFIX, VERSION)))
    base_key = index["files"][base.path.name]["key"]
    times = []
    for i in range(runs):
        pieces = stamp.stamp_ranges(base, bench.enrollment(f"bench-storage-{i}"))
        start = time.perf_counter()
        store.put_pieces_if_absent(f"bench/storage-{i}.exe", base_key, pieces)
        times.append(time.perf_counter() - start)
    return {"put_pieces_median_s": median(times), "runs": runs, "bytes": base.entry["size"]}


def run(bench: Bench, release_folder: Path) -> dict:
    heading("4. Service (issue 5): loopback, `builder serve` in a subprocess, EXE installers")
    store_root = bench.work / "store"
    storage_url = store_root.as_uri()
    store = open_store(storage_url, StorageSettings())
    start = time.perf_counter()
    publish_release(release_folder, store, RELEASES_PREFIX, version=VERSION)
    print(f"release {VERSION} published to a file:// store in {time.perf_counter() - start:.3f} s")
    exe_size = (release_folder / next(p.name for p in release_folder.glob("*.exe"))).stat().st_size
    floor = _storage_write(bench, store, release_folder)

    api_key = secrets.token_urlsafe(24)
    headers = {"Authorization": f"Bearer {api_key}"}
    env = {**os.environ, "BUILDER_API_KEYS": f"bench:{api_key}", "BUILDER_STORAGE_HMAC_KEY": secrets.token_urlsafe(32),
           "BUILDER_QUEUE_KEY": _fernet_key(), "PYTHONUNBUFFERED": "1"}
    result: dict = {"storage_write": floor}
    procs = Procs()
    try:
        svc = Service(procs, bench, name="service-inprocess", storage_url=storage_url, env=env)
        server_cpu, client_cpu = cpu_seconds(svc.proc.popen.pid), time.process_time()
        cached_token = secrets.token_urlsafe(32)
        cached = asyncio.run(_cached(svc.base, headers, _body("bench-cached", cached_token)))
        cached["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(svc.proc.popen.pid) - server_cpu) / (cached["requests"] + 1)
        cached["client_cpu_ms_per_request"] = 1000 * (time.process_time() - client_cpu) / (cached["requests"] + 1)
        result["cached"] = cached
        wrk_result = _cached_wrk(svc.base, headers, _body("bench-cached", cached_token), bench.work)
        if wrk_result is not None:
            result["cached_wrk"] = wrk_result
        # Warm: the service has the release open after the cached phase; one more stamp not counted.
        _first_time(svc.base, headers, ["bench-warm-inprocess"], deadline_s=60)
        inproc = _first_time(svc.base, headers, [f"bench-inproc-{i}" for i in range(FIRST_TIME_GROUPS)],
                             deadline_s=FIRST_TIME_MAX_SECONDS)
        if inproc["_answers"]:
            _check_download(svc.base, headers, inproc["_answers"][0], exe_size)
        result["first_inprocess"] = inproc
        svc.proc.stop()

        redis_url, why = _start_redis(procs, bench)
        if redis_url is None:
            result["first_rq"] = {"skipped": why}
        else:
            for n in range(1, RQ_WORKERS + 1):
                procs.start(f"worker-{n}", [sys.executable, "-m", "builder", "-q", "worker", "--redis", redis_url,
                                            "--storage", storage_url, "--state", str(bench.work / "service" / f"worker-{n}"),
                                            "--ca", str(bench.keys.ca_cert)],
                            env=env, logs=bench.work / "service" / "logs")
            svc = Service(procs, bench, name="service-rq", storage_url=storage_url, env=env, redis_url=redis_url)
            warm = _first_time(svc.base, headers, ["bench-warm-rq-1", "bench-warm-rq-2"], deadline_s=60)
            if warm["ready"] != 2:
                raise RuntimeError("bench: the RQ workers did not stamp the warm-up installers:\n"
                                   + "\n".join(p.tail() for p in procs.started if p.name.startswith("worker")))
            rq = _first_time(svc.base, headers, [f"bench-rq-{i}" for i in range(FIRST_TIME_GROUPS)],
                             deadline_s=FIRST_TIME_MAX_SECONDS)
            if rq["_answers"]:
                _check_download(svc.base, headers, rq["_answers"][0], exe_size)
            result["first_rq"] = rq
            result["first_rq"]["jobs"] = _rq_job_times(redis_url, [a["id"] for a in rq["_answers"]])
    finally:
        procs.stop_all()
    for phase in ("first_inprocess", "first_rq"):
        result.get(phase, {}).pop("_answers", None)

    c = result["cached"]
    c["verdict"] = verdict(c["rps"], TARGETS["cached_rps"], at_least=True)
    print(f"(a) cached download-URL requests: the same POST /v1/installers, {c['concurrency']} concurrent (asyncio httpx),"
          f" at most {CACHED_MAX_REQUESTS} requests or {CACHED_MAX_SECONDS:.0f} s")
    rows = [["cached (httpx)", c["requests"], c["seconds"], f"{c['rps']:.0f}", f"{c['p50_s'] * 1000:.1f}", f"{c['p99_s'] * 1000:.1f}",
             c["failures"], ">= 500 req/s", c["verdict"]]]
    w = result.get("cached_wrk")
    if w:
        w["verdict"] = verdict(w["rps"], TARGETS["cached_rps"], at_least=True) if not w["failures"] else "FAILED REQUESTS"
        rows.append(["cached (wrk)", w["requests"], w["seconds"], f"{w['rps']:.0f}", f"{w['p50_s'] * 1000:.1f}",
                     f"{w['p99_s'] * 1000:.1f}", w["failures"], ">= 500 req/s", w["verdict"]])
    table(["", "requests", "seconds", "req/s", "p50 ms", "p99 ms", "failed", "target", "verdict"], rows)
    print(f"  CPU per request: server {c['server_cpu_ms_per_request']:.2f} ms (one process: at most"
          f" ~{1000 / c['server_cpu_ms_per_request']:.0f} req/s per core), this client {c['client_cpu_ms_per_request']:.2f} ms;"
          f" {os.cpu_count()} cores shared by both and by other work on the machine")
    print()
    print(f"(b) first-time EXE stamps: {FIRST_TIME_GROUPS} distinct groups, {FIRST_TIME_CLIENTS} clients, latency from"
          f" POST until ready (storage write included), at most {FIRST_TIME_MAX_SECONDS:.0f} s per phase")
    rows = []
    for phase, label in (("first_inprocess", "in-process issuer (2 stamp threads)"), ("first_rq", f"RQ, {RQ_WORKERS} `builder worker`s")):
        r = result.get(phase, {})
        if "skipped" in r:
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"])
            continue
        r["verdict"] = verdict(r["p50_s"], TARGETS["first_p50_s"])
        rows.append([label, f"{r['ready']}/{r['requested']}", r["seconds"], f"{r['per_second']:.1f}",
                     f"{r['p50_s'] * 1000:.1f}", f"{r['p99_s'] * 1000:.1f}", r["failures"], "p50 < 50 ms", r["verdict"]])
    table(["", "ready", "seconds", "per s", "p50 ms", "p99 ms", "failed", "target", "verdict"], rows)
    print(f"  (percentiles of the installers ready within the time cap; the storage write alone,"
          f" put_pieces_if_absent of one {floor['bytes'] / 2**20:.0f} MB stamp to file:// incl. fsync, in-process:"
          f" median {ms(floor['put_pieces_median_s'])} of {floor['runs']})")
    jobs = result.get("first_rq", {}).get("jobs")
    if jobs and jobs["jobs"]:
        print(f"  (RQ's own timestamps on {jobs['jobs']} jobs: enqueued to started p50 {ms(jobs['queue_wait_p50_s'])},"
              f" started to ended p50 {ms(jobs['run_p50_s'])})")
    return result


def _rq_job_times(redis_url: str, ids: list[str]) -> dict:
    """Where an RQ job's time goes, from the timestamps RQ keeps on each job: waiting in the
    queue (enqueued until a worker started it) and running (the worker's whole job, of which
    the installer is ready some way before the end)."""
    import redis
    from rq.job import Job
    from rq.exceptions import NoSuchJobError

    waits, runs = [], []
    with redis.Redis.from_url(redis_url) as connection:
        for job_id in ids:
            try:
                job = Job.fetch(job_id, connection=connection)
            except NoSuchJobError:
                continue
            if job.enqueued_at and job.started_at and job.ended_at:
                waits.append((job.started_at - job.enqueued_at).total_seconds())
                runs.append((job.ended_at - job.started_at).total_seconds())
    return {"jobs": len(runs), "queue_wait_p50_s": percentile(waits, 50), "run_p50_s": percentile(runs, 50)}


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()

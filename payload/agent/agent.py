"""The reference agent: what a real product ships, frozen per platform by PyInstaller (agent.spec).

Standard library only. The installer contract it implements is in payload/README.md:

    agent write-config          --registry-key KEY --config PATH     (Windows)
    agent enroll-from-installer --installer PATH [--registry-key KEY] --config PATH
    agent enroll-from-file      --file PATH [--registry-key KEY] --config PATH
    agent service               [--registry-key KEY] --config PATH [--ca-bundle PEM]
    agent run                   --config PATH [--ca-bundle PEM]
    agent --version

`--registry-key` is required on Windows and refused elsewhere (there is no registry there).
No secret is ever taken from the command line or printed: the enrollment token goes from the
registry, the installer's signature slot or a sidecar file to the config file, and from there
into one `Authorization: Bearer` header over verified TLS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import signal
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:  # written by agent.spec when AGENT_VERSION is set at build time
    from _agent_version import VERSION  # type: ignore[import-not-found]
except ImportError:
    VERSION = "1.0.0"

IS_WINDOWS = sys.platform == "win32"

# (JSON key, registry value name), in the order the config file lists them.
FIELDS = (
    ("account_id", "AccountId"),
    ("group_id", "GroupId"),
    ("console_url", "ConsoleUrl"),
    ("enrollment_token", "EnrollmentToken"),
)

# Assembled at run time: CPython folds `b"ENRS" + b"LOT1"` into one constant, and the frozen
# agent is embedded in the installers, where a literal copy could be mistaken for the slot.
SLOT_MAGIC = b"".join((b"ENRS", b"LOT1"))
SLOT_HEADER = len(SLOT_MAGIC) + 4  # magic + uint32 little-endian payload length
MAX_SLOT_PAYLOAD = 64 * 1024
MAX_CONFIG_BYTES = 256 * 1024

ENROLL_PATH = "/api/v1/enroll"
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


# ------------------------------------------------------------------------------------- errors


class AgentError(Exception):
    """Base class; `exit_code` is the process exit code. Messages never contain the token."""

    exit_code = 1


class UsageError(AgentError):
    exit_code = 2


class RegistryValueMissing(AgentError):
    exit_code = 3


class WriteFailed(AgentError):
    exit_code = 4


class NoEnrollment(AgentError):
    exit_code = 5


class MalformedEnrollment(AgentError):
    exit_code = 6


class InstallerUnreadable(AgentError):
    exit_code = 7


class EnrollmentRefused(AgentError):
    """The console answered with a final refusal (401, 403, 404, a redirect...)."""

    exit_code = 8


class ConsoleUnreachable(AgentError):
    """No usable answer after every attempt, or the console's certificate is not trusted."""

    exit_code = 9


# ------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Enrollment:
    account_id: str
    group_id: str
    console_url: str
    enrollment_token: str = field(repr=False)

    @classmethod
    def from_mapping(cls, obj: object, source: str) -> Enrollment:
        """Validates a decoded JSON object; `source` names it in errors (never a value)."""
        if not isinstance(obj, dict):
            raise MalformedEnrollment(f"enrollment in {source} is not a JSON object")
        values = {}
        for key, _ in FIELDS:
            value = obj.get(key)
            if not isinstance(value, str) or not value:
                raise MalformedEnrollment(f"enrollment in {source} lacks a non-empty string {key}")
            if "\0" in value or not _utf8_encodable(value):
                raise MalformedEnrollment(f"enrollment in {source} has an invalid {key}")
            values[key] = value
        return cls(**values)

    def public(self) -> dict[str, str]:
        """What may be shown or logged: everything but the token, plus its SHA-256."""
        return {
            "account_id": self.account_id,
            "group_id": self.group_id,
            "console_url": self.console_url,
            "token_sha256": hashlib.sha256(self.enrollment_token.encode()).hexdigest(),
        }


def _utf8_encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from "\ud800" in JSON
        return False
    return True


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key}")
        obj[key] = value
    return obj


def parse_enrollment(data: bytes, source: str) -> Enrollment:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as err:
        # ValueError covers JSONDecodeError and duplicates; its text quotes no input.
        raise MalformedEnrollment(f"enrollment in {source} is malformed JSON ({type(err).__name__})") from None
    return Enrollment.from_mapping(obj, source)


def render_config(e: Enrollment) -> bytes:
    """The config file's exact bytes; the C test agent writes the same for the same values."""
    obj = {key: getattr(e, key) for key, _ in FIELDS}
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------------------------- slot


def read_slot(installer: Path) -> Enrollment:
    """The enrollment stamped in the installer's signature: the last slot in the file."""
    try:
        with open(installer, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < SLOT_HEADER:
                raise NoEnrollment(f"no enrollment slot in {installer}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                at = mm.rfind(SLOT_MAGIC)
                if at < 0 or at + SLOT_HEADER > size:
                    raise NoEnrollment(f"no enrollment slot in {installer}")
                (length,) = struct.unpack_from("<I", mm, at + len(SLOT_MAGIC))
                if length == 0:
                    raise NoEnrollment(f"installer {installer} carries no enrollment (empty slot)")
                if length > MAX_SLOT_PAYLOAD or at + SLOT_HEADER + length > size:
                    raise MalformedEnrollment(f"enrollment slot in {installer} has an impossible length")
                payload = mm[at + SLOT_HEADER : at + SLOT_HEADER + length]
    except OSError as err:
        raise InstallerUnreadable(f"cannot read installer {installer}: {err.strerror}") from None
    return parse_enrollment(payload, str(installer))


# ------------------------------------------------------------------------------------- files


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replaces `path` with `data`; mode 0600 on POSIX whatever the umask.

    On Windows the file inherits the ACL of its folder (ProgramData\\Vendor, which the installer
    creates for SYSTEM and Administrators); the C test agent shows how to set one explicitly.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            if not IS_WINDOWS:
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteFailed(f"cannot write {path}: {err.strerror}") from None


def write_config(path: Path, e: Enrollment) -> None:
    write_private_file(path, render_config(e))


def load_config(path: Path) -> Enrollment:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise MalformedEnrollment(f"cannot read config {path}: {err.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise MalformedEnrollment(f"config {path} is too large")
    return parse_enrollment(data, str(path))


def write_status(config: Path, state: str, e: Enrollment | None, **extra: object) -> None:
    """status.json beside the config: what the agent is doing, never the token."""
    obj: dict[str, object] = {"state": state}
    if e is not None:
        obj.update(e.public())
    obj.update(extra)
    write_private_file(config.parent / "status.json", json.dumps(obj, ensure_ascii=False).encode())


# ------------------------------------------------------------------------------------- registry


def registry_read(key: str) -> Enrollment:
    import winreg

    try:
        handle = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key, 0, winreg.KEY_READ | winreg.KEY_WOW64_64KEY)
    except OSError:
        raise RegistryValueMissing(f"registry key HKLM\\{key} not found") from None
    values = {}
    with handle:
        for json_key, reg_name in FIELDS:
            try:
                value, kind = winreg.QueryValueEx(handle, reg_name)
            except OSError:
                value, kind = None, None
            if kind != winreg.REG_SZ or not value or not _utf8_encodable(value):
                raise RegistryValueMissing(f"registry value {reg_name} is missing or not a REG_SZ under HKLM\\{key}")
            values[json_key] = value
    return Enrollment(**values)


def registry_write(key: str, e: Enrollment) -> None:
    import winreg

    try:
        with winreg.CreateKeyEx(winreg.HKEY_LOCAL_MACHINE, key, 0, winreg.KEY_SET_VALUE | winreg.KEY_WOW64_64KEY) as h:
            for json_key, reg_name in FIELDS:
                winreg.SetValueEx(h, reg_name, 0, winreg.REG_SZ, getattr(e, json_key))
    except OSError as err:
        raise WriteFailed(f"cannot write registry key HKLM\\{key}: {err.strerror}") from None


def materialise(e: Enrollment, registry_key: str | None, config: Path) -> None:
    """Stores an enrollment: on Windows in the registry, then the config read back from it."""
    if registry_key is None:
        write_config(config, e)
        return
    registry_write(registry_key, e)
    write_config(config, registry_read(registry_key))


# ------------------------------------------------------------------------------------- console


@dataclass(frozen=True)
class ConsoleOptions:
    ca_bundle: str | None = None  # None: the system's trust store
    attempts: int = 6
    backoff: float = 2.0  # seconds before the 2nd attempt, doubled each time, jittered
    max_backoff: float = 60.0
    timeout: float = 30.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


def enroll_url(console_url: str) -> str:
    parts = urllib.parse.urlsplit(console_url)
    if parts.scheme != "https" or not parts.hostname:
        raise MalformedEnrollment("console_url must be an https:// URL with a host")
    return urllib.parse.urlunsplit(
        ("https", parts.netloc, parts.path.rstrip("/") + ENROLL_PATH, parts.query, "")
    )


def enroll(
    e: Enrollment,
    opts: ConsoleOptions,
    *,
    sleep: Callable[[float], object] = time.sleep,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, object]:
    """POSTs the account and group with the token as a bearer; returns the console's JSON answer.

    Retries connection failures, timeouts and 408/425/429/5xx with jittered exponential backoff;
    any other HTTP status is final. Redirects are not followed (the bearer would go along).
    """
    url = enroll_url(e.console_url)
    context = ssl.create_default_context(cafile=opts.ca_bundle)  # verifies chain and host name
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())
    body = json.dumps({"account_id": e.account_id, "group_id": e.group_id}).encode()
    headers = {
        "Authorization": f"Bearer {e.enrollment_token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"example-agent/{VERSION}",
    }
    last = "no attempt made"
    for attempt in range(1, opts.attempts + 1):
        if stopping():
            raise ConsoleUnreachable("stopped before enrollment completed")
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=opts.timeout) as response:
                raw = response.read(MAX_CONFIG_BYTES)
            try:
                answer = json.loads(raw) if raw.strip() else {}
            except ValueError:
                answer = {}
            return answer if isinstance(answer, dict) else {}
        except urllib.error.HTTPError as err:
            err.close()
            if err.code not in RETRYABLE_HTTP:
                raise EnrollmentRefused(f"console refused enrollment: HTTP {err.code}") from None
            last = f"HTTP {err.code}"
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise ConsoleUnreachable(
                    f"console certificate not trusted ({err.reason.verify_message}); "
                    "pass --ca-bundle if it uses a private CA"
                ) from None
            last = f"{type(err.reason).__name__}: {err.reason}"
        except (OSError, TimeoutError) as err:  # reset, timeout, TLS alert mid-stream
            last = f"{type(err).__name__}: {err}"
        if attempt < opts.attempts:
            delay = min(opts.max_backoff, opts.backoff * 2 ** (attempt - 1))
            sleep(delay * random.uniform(0.5, 1.0))
    raise ConsoleUnreachable(f"console unreachable after {opts.attempts} attempts; last error: {last}")


def serve(
    config: Path,
    registry_key: str | None,
    opts: ConsoleOptions,
    stop: threading.Event,
    on_running: Callable[[], None] = lambda: None,
    retry_every: float = 300.0,
) -> int:
    """The long-running agent: load the enrollment, report running, enroll until done, idle.

    Shared by the Windows service and the POSIX foreground service (systemd, launchd).
    """
    if registry_key is not None and not config.exists():
        write_config(config, registry_read(registry_key))  # the installer never materialised it
    e = load_config(config)
    write_status(config, "running", e)
    on_running()
    while not stop.is_set():
        try:
            enroll(e, opts, sleep=stop.wait, stopping=stop.is_set)
        except EnrollmentRefused as err:
            write_status(config, "refused", e, error=str(err))
            break
        except ConsoleUnreachable as err:
            write_status(config, "retrying", e, error=str(err))
            stop.wait(retry_every)
            continue
        write_status(config, "enrolled", e)
        break
    stop.wait()
    write_status(config, "stopped", e)
    return 0


def run_windows_service(body: Callable[[threading.Event, Callable[[], None]], int]) -> int:
    """Hands the process to the service control manager (SERVICE_WIN32_OWN_PROCESS)."""
    import ctypes
    from ctypes import wintypes

    SERVICE_WIN32_OWN_PROCESS = 0x10
    STOPPED, START_PENDING, STOP_PENDING, RUNNING = 1, 2, 3, 4
    CONTROL_STOP, CONTROL_INTERROGATE, CONTROL_SHUTDOWN = 1, 4, 5
    ACCEPT_STOP, ACCEPT_SHUTDOWN = 1, 4
    ERROR_SERVICE_SPECIFIC_ERROR, ERROR_CALL_NOT_IMPLEMENTED = 1066, 120
    ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063

    class SERVICE_STATUS(ctypes.Structure):
        _fields_ = [(name, wintypes.DWORD) for name in (
            "dwServiceType", "dwCurrentState", "dwControlsAccepted", "dwWin32ExitCode",
            "dwServiceSpecificExitCode", "dwCheckPoint", "dwWaitHint")]

    HANDLER_EX = ctypes.WINFUNCTYPE(wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.LPVOID, wintypes.LPVOID)
    SERVICE_MAIN = ctypes.WINFUNCTYPE(None, wintypes.DWORD, ctypes.POINTER(wintypes.LPWSTR))

    class SERVICE_TABLE_ENTRYW(ctypes.Structure):
        _fields_ = [("lpServiceName", wintypes.LPWSTR), ("lpServiceProc", SERVICE_MAIN)]

    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    advapi32.RegisterServiceCtrlHandlerExW.argtypes = [wintypes.LPCWSTR, HANDLER_EX, wintypes.LPVOID]
    advapi32.RegisterServiceCtrlHandlerExW.restype = wintypes.HANDLE
    advapi32.SetServiceStatus.argtypes = [wintypes.HANDLE, ctypes.POINTER(SERVICE_STATUS)]
    advapi32.SetServiceStatus.restype = wintypes.BOOL
    advapi32.StartServiceCtrlDispatcherW.argtypes = [ctypes.POINTER(SERVICE_TABLE_ENTRYW)]
    advapi32.StartServiceCtrlDispatcherW.restype = wintypes.BOOL

    stop = threading.Event()
    status = SERVICE_STATUS(dwServiceType=SERVICE_WIN32_OWN_PROCESS)
    handle = wintypes.HANDLE()
    result = {"code": 0}

    def report(state: int, specific: int = 0, wait_hint: int = 0) -> None:
        status.dwCurrentState = state
        status.dwControlsAccepted = ACCEPT_STOP | ACCEPT_SHUTDOWN if state == RUNNING else 0
        status.dwWin32ExitCode = ERROR_SERVICE_SPECIFIC_ERROR if specific else 0
        status.dwServiceSpecificExitCode = specific
        status.dwWaitHint = wait_hint
        status.dwCheckPoint = 0 if state in (RUNNING, STOPPED) else status.dwCheckPoint + 1
        advapi32.SetServiceStatus(handle, ctypes.byref(status))

    @HANDLER_EX
    def handler(control, event_type, event_data, context):  # noqa: ANN001
        if control in (CONTROL_STOP, CONTROL_SHUTDOWN):
            report(STOP_PENDING, wait_hint=10_000)
            stop.set()
            return 0
        return 0 if control == CONTROL_INTERROGATE else ERROR_CALL_NOT_IMPLEMENTED

    @SERVICE_MAIN
    def service_main(argc, argv):  # noqa: ANN001
        handle.value = advapi32.RegisterServiceCtrlHandlerExW("", handler, None)  # name ignored: own process
        if not handle.value:
            return
        report(START_PENDING, wait_hint=10_000)
        code = 1  # a bug: ctypes prints the traceback, and the SCM must still hear STOPPED
        try:
            code = body(stop, lambda: report(RUNNING))
        except AgentError as err:
            code = err.exit_code
        finally:
            result["code"] = code
            report(STOPPED, specific=code)

    table = (SERVICE_TABLE_ENTRYW * 2)(SERVICE_TABLE_ENTRYW("", service_main), SERVICE_TABLE_ENTRYW(None, SERVICE_MAIN()))
    if not advapi32.StartServiceCtrlDispatcherW(table):
        if ctypes.get_last_error() == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
            raise UsageError("the service command is run by the service control manager, not by hand")
        raise AgentError(f"service dispatcher failed (error {ctypes.get_last_error()})")
    return result["code"]


def run_posix_service(body: Callable[[threading.Event, Callable[[], None]], int]) -> int:
    """Foreground service for systemd and launchd: SIGTERM or SIGINT stops it cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return body(stop, lambda: None)


def forget(config: Path) -> None:
    """Uninstall: the config holds the token, so it goes with the agent; status.json too, and
    their folder when it is left empty. Registry values belong to the installer."""
    for path in (config, config.parent / "status.json"):
        path.unlink(missing_ok=True)
    try:
        config.parent.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, our exit code
        raise UsageError(f"{message} (see agent --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agent", description="Example Agent (reference implementation).")
    parser.add_argument("--version", action="version", version=VERSION)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str, *, registry: bool, config: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text)
        if registry:
            p.add_argument("--registry-key", help="HKLM key in the 64-bit view (Windows only)")
        if config:
            p.add_argument("--config", required=True, type=Path, help="full path of the config file")
        return p

    command("write-config", "materialise the config file from the registry (Windows)", registry=True)
    p = command("enroll-from-installer", "read the enrollment stamped in a signed installer", registry=True)
    p.add_argument("--installer", required=True, type=Path)
    p = command("enroll-from-file", "read the enrollment from a sidecar JSON file", registry=True)
    p.add_argument("--file", required=True, type=Path)
    command("forget", "delete the config and status files (uninstall)", registry=True)
    for name, help_text in (("run", "enroll with the console once"), ("service", "run as the agent service")):
        p = command(name, help_text, registry=name == "service")
        p.add_argument("--ca-bundle", help="PEM file of CAs to trust instead of the system store "
                                           "(default: $AGENT_CA_BUNDLE)")
        p.add_argument("--attempts", type=int, default=ConsoleOptions.attempts)
        p.add_argument("--backoff", type=float, default=ConsoleOptions.backoff)
    return parser


def _check_registry_key(args: argparse.Namespace) -> str | None:
    key = getattr(args, "registry_key", None)
    if IS_WINDOWS and key is None and args.command != "run":
        raise UsageError(f"{args.command} needs --registry-key on Windows")
    if not IS_WINDOWS and key is not None:
        raise UsageError("--registry-key exists only on Windows")
    return key


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    try:
        args = build_parser().parse_args(argv)
        key = _check_registry_key(args)
        config: Path = args.config
        if not config.is_absolute():
            raise UsageError("--config must be a full path")
        if args.command == "write-config":
            if not IS_WINDOWS:
                raise UsageError("write-config reads the Windows registry; use enroll-from-file here")
            write_config(config, registry_read(key))
        elif args.command == "enroll-from-installer":
            materialise(read_slot(args.installer), key, config)
        elif args.command == "enroll-from-file":
            try:
                data = args.file.read_bytes()
            except OSError as err:
                raise NoEnrollment(f"cannot read enrollment file {args.file}: {err.strerror}") from None
            materialise(parse_enrollment(data, str(args.file)), key, config)
        elif args.command == "forget":
            forget(config)
        else:
            if args.attempts < 1 or args.backoff < 0:
                raise UsageError("--attempts must be >= 1 and --backoff >= 0")
            opts = ConsoleOptions(
                ca_bundle=args.ca_bundle or environ.get("AGENT_CA_BUNDLE") or None,
                attempts=args.attempts,
                backoff=args.backoff,
            )
            if args.command == "run":
                e = load_config(config)
                enroll(e, opts)
                write_status(config, "enrolled", e)
                print("enrolled")
            else:
                body = lambda stop, on_running: serve(config, key, opts, stop, on_running)  # noqa: E731
                return (run_windows_service if IS_WINDOWS else run_posix_service)(body)
    except AgentError as err:
        print(f"agent: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

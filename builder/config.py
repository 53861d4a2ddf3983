"""Product identity, build options and the process's environment, resolved once into frozen
dataclasses.

Product precedence, lowest first: `builder/resources/defaults.toml`, a `--config FILE`, `--set
key=value`. The environment (passwords, SOURCE_DATE_EPOCH, storage and notary credentials, the
service's keys) is read by `Environment.read()` only, once per process. No other module reads
configuration files or `os.environ` (two exceptions: the tool runner builds a child's environment,
and `--token-env NAME` names a variable to read); they receive these objects.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import tomllib
import uuid
from types import MappingProxyType
from typing import Mapping
from urllib.parse import urlsplit
from dataclasses import dataclass, field, fields
from pathlib import Path

from builder.enrollment import Secret
from builder.errors import ConfigError, UsageError
from builder.trust import normalise_host_pattern

DEFAULTS_FILE = Path(__file__).parent / "resources" / "defaults.toml"
# Installed (a wheel): inside the package; in the checkout: templates/ at its top.
_INSTALLED_TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATES_DIR = (_INSTALLED_TEMPLATES if _INSTALLED_TEMPLATES.is_dir()
                 else Path(__file__).resolve().parent.parent / "templates")

_GUID_RE = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
# Names that end up in XML, NSIS strings, registry paths, file paths and plists. Kept to a set
# that needs no escaping anywhere, so that a product rename cannot break a template.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .,\-()]*$")
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .\-()]*$")
_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_REVERSE_DNS_RE = re.compile(r"^[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)+$")
_EXE_RE = re.compile(r"^[A-Za-z0-9_\-]+\.exe$")
_VERSION_RE = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,5}$")


@dataclass(frozen=True, kw_only=True)
class Product:
    vendor: str
    name: str
    upgrade_code: str
    service_name: str
    service_display_name: str
    install_folder: str
    registry_key: str
    agent_exe: str
    console_url: str
    bundle_id: str
    pkg_identifier: str
    launchd_label: str
    slot_size: int
    # Console hosts a release's agents may talk to (pinned in trust.json): `host`, `*.domain`,
    # either with `:port`. Empty in a file means: the host of console_url.
    console_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = {
            "vendor": _NAME_RE,
            "name": _NAME_RE,
            "service_display_name": _NAME_RE,
            "service_name": _IDENT_RE,
            "agent_exe": _EXE_RE,
            "bundle_id": _REVERSE_DNS_RE,
            "pkg_identifier": _REVERSE_DNS_RE,
            "launchd_label": _REVERSE_DNS_RE,
        }
        for key, rule in checks.items():
            if not rule.fullmatch(getattr(self, key)):
                raise ConfigError(f"product.{key} = {getattr(self, key)!r} has a character outside {rule.pattern}", "change it in your --config file")
        if not _GUID_RE.fullmatch(self.upgrade_code):
            raise ConfigError(f"product.upgrade_code = {self.upgrade_code!r} is not an upper-case GUID", "use the form 5B0C7E3A-2B4F-4C7A-9E0D-6C1A8F3B2D41")
        for key, sep in (("install_folder", "/"), ("registry_key", "\\")):
            parts = getattr(self, key).split(sep)
            if not all(_PATH_PART_RE.fullmatch(p) for p in parts):
                raise ConfigError(f"product.{key} = {getattr(self, key)!r}: each part separated by {sep!r} must match {_PATH_PART_RE.pattern}", "change it in your --config file")
        if not 1024 <= self.slot_size <= 65536 or self.slot_size % 8:
            raise ConfigError(f"product.slot_size = {self.slot_size} must be a multiple of 8 between 1024 and 65536", "12288 fits a signed enrollment with a 4 KiB token")
        hosts = self.console_hosts or (urlsplit(self.console_url).hostname or "",)
        object.__setattr__(self, "console_hosts", tuple(normalise_host_pattern(h) for h in hosts))

    @property
    def install_parts(self) -> list[str]:
        return self.install_folder.split("/")

    @property
    def windows_install_folder(self) -> str:
        return "\\".join(self.install_parts)

    @property
    def mac_install_folder(self) -> str:
        return "/Library/Application Support/" + self.install_folder

    def component_guid(self, name: str) -> str:
        """A stable GUID per installed item, so upgrades keep component identity (MSI rules)."""
        return str(uuid.uuid5(uuid.UUID(self.upgrade_code), name)).upper()


def _coerce(field: dataclasses.Field, raw, source: str):
    if field.name == "console_hosts":
        # A list in TOML; comma-separated with --set.
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{source}: product.console_hosts must be a list of host patterns")
        return tuple(i.strip() for i in items if i.strip())
    want = field.type if isinstance(field.type, type) else {"int": int, "str": str}[field.type]
    if want is int and isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{source}: product.{field.name} must be a whole number, got {raw!r}") from None
    if not isinstance(raw, want):
        raise ConfigError(f"{source}: product.{field.name} must be {want.__name__}, got {type(raw).__name__}")
    return raw


def load_product(config_file: Path | None = None, overrides: dict[str, str] | None = None) -> Product:
    """Resolve the product identity from the defaults, an optional file and `--set` overrides."""
    known = {f.name: f for f in fields(Product)}
    values: dict = {}
    layers: list[tuple[str, dict]] = [(str(DEFAULTS_FILE), _read_toml(DEFAULTS_FILE))]
    if config_file is not None:
        layers.append((str(config_file), _read_toml(config_file)))
    layers.append(("--set", {"product": dict(overrides or {})}))
    for source, doc in layers:
        section = doc.get("product", {})
        unknown = set(doc) - {"product"} | set(section) - set(known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}", f"known keys: product.{{{', '.join(known)}}}")
        for key, raw in section.items():
            values[key] = _coerce(known[key], raw, source)
    return Product(**values)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror})", "check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})", "fix the file") from None


def parse_set_options(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not key=value", "for example --set vendor='Acme Inc'")
        out[key.strip().removeprefix("product.")] = value
    return out


def is_version(text: object) -> bool:
    """MAJOR.MINOR.BUILD digits, nothing else (not even a trailing newline): the one test of a
    version string, for --version and for release names the service is asked for."""
    return isinstance(text, str) and _VERSION_RE.fullmatch(text) is not None


def version_key(version: str) -> tuple[int, ...]:
    """The order of release versions (MAJOR.MINOR.BUILD, is_version): newest last when sorted."""
    return tuple(int(p) for p in version.split("."))


def validate_version(version: str) -> str:
    """MSI ProductVersion rules: major.minor.build, major and minor < 256, build < 65536."""
    if not is_version(version):
        raise ConfigError(f"--version {version!r} is not MAJOR.MINOR.BUILD", "for example 1.2.3")
    major, minor, build = (int(p) for p in version.split("."))
    if major > 255 or minor > 255 or build > 65535:
        raise ConfigError(f"--version {version}: MSI limits are 255.255.65535", "use smaller numbers")
    return version


# The identity fields a vendor must make its own before shipping; the hosts RFC 2606 reserves.
IDENTITY_FIELDS = ("vendor", "name", "upgrade_code", "bundle_id", "pkg_identifier")
_EXAMPLE_HOST = re.compile(r"(?:[^.]+\.)*example(?:\.(?:com|net|org))?")


def is_example_host(host: str) -> bool:
    """A host (or a host pattern, `*.` and `:port` allowed) under example.com/.net/.org or .example."""
    name = host.lower().removeprefix("*.").partition(":")[0]
    return _EXAMPLE_HOST.fullmatch(name) is not None


def example_fields(product: Product) -> list[str]:
    """The product identity fields still at the embedded example values: what a release signed
    with real keys must not ship (its console hosts are checked where they are pinned)."""
    defaults = load_product()
    return [f for f in IDENTITY_FIELDS if getattr(product, f) == getattr(defaults, f)]


# -- the environment ------------------------------------------------------------------------

SIGN_PASSWORD_ENV = "BUILDER_SIGN_PASSWORD"  # an Authenticode key's password or PKCS#11 PIN
MAC_SIGN_PASSWORD_ENV = "BUILDER_MAC_SIGN_PASSWORD"
ENROLLMENT_KEY_PASSWORD_ENV = "BUILDER_ENROLLMENT_KEY_PASSWORD"
QUEUE_KEY_ENV = "BUILDER_QUEUE_KEY"
API_KEYS_ENV, API_KEYS_FILE_ENV = "BUILDER_API_KEYS", "BUILDER_API_KEYS_FILE"
NOTARY_ENV_PREFIX = "BUILDER_NOTARY_"
STORAGE_ENV_PREFIXES = ("AWS_", "AZURE_STORAGE_", "BUILDER_STORAGE_")
# The variables above that hold a secret: no tool or child process inherits them
# (builder.tools.runner.child_env). No external tool needs one: passwords reach osslsigncode on stdin.
SECRET_ENV = frozenset({
    SIGN_PASSWORD_ENV, MAC_SIGN_PASSWORD_ENV, ENROLLMENT_KEY_PASSWORD_ENV, QUEUE_KEY_ENV, API_KEYS_ENV,
    NOTARY_ENV_PREFIX + "KEY", "BUILDER_STORAGE_HMAC_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING",
})
# Times every format can carry: DOS and MSI dates start in 1980; 2099 keeps a margin below the
# ends of the formats' counters.
EPOCH_RANGE = (315532800, 4102444799)  # 1980-01-01 .. 2099-12-31 UTC


@dataclass(frozen=True, kw_only=True)
class Environment:
    """What the environment configures, read once (`read`). Secrets stay `Secret`s; the storage
    and notary variables are handed whole to the code that knows them
    (`StorageSettings.from_env`, `notary.credentials_from_env`)."""

    source_date_epoch: int | None = None
    sign_password: Secret | None = None  # set, even empty: a password is given
    mac_sign_password: Secret | None = None
    enrollment_key_password: Secret | None = None  # empty counts as unset
    queue_key: Secret | None = None
    api_keys: Secret | None = None  # BUILDER_API_KEYS
    api_keys_file: Path | None = None  # BUILDER_API_KEYS_FILE (read by the service that needs it)
    notary: Mapping[str, str] = field(default_factory=dict)
    storage: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> "Environment":
        env = os.environ if environ is None else environ

        def secret(name: str, *, empty_is_unset: bool = True) -> Secret | None:
            value = env.get(name)
            if value is None or (empty_is_unset and not value):
                return None
            return Secret(value)

        return cls(
            source_date_epoch=_epoch(env.get("SOURCE_DATE_EPOCH")),
            sign_password=secret(SIGN_PASSWORD_ENV, empty_is_unset=False),
            mac_sign_password=secret(MAC_SIGN_PASSWORD_ENV, empty_is_unset=False),
            enrollment_key_password=secret(ENROLLMENT_KEY_PASSWORD_ENV),
            queue_key=secret(QUEUE_KEY_ENV),
            api_keys=secret(API_KEYS_ENV),
            api_keys_file=Path(env[API_KEYS_FILE_ENV]) if env.get(API_KEYS_FILE_ENV) else None,
            notary=MappingProxyType({k: v for k, v in env.items() if k.startswith(NOTARY_ENV_PREFIX)}),
            storage=MappingProxyType({k: v for k, v in env.items() if k.startswith(STORAGE_ENV_PREFIXES)}),
        )

    def epoch(self) -> int:
        """SOURCE_DATE_EPOCH (reproducible output), else now."""
        return self.source_date_epoch if self.source_date_epoch is not None else int(time.time())


def _epoch(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds", "unset it or give seconds since 1970")
    value = int(raw)
    if not EPOCH_RANGE[0] <= value <= EPOCH_RANGE[1]:
        raise UsageError(f"SOURCE_DATE_EPOCH={raw} is outside 1980-01-01 .. 2099-12-31",
                         "give a time the installer formats can carry (seconds since 1970)")
    return value

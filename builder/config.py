"""Product identity and build options, resolved once into frozen dataclasses.

Precedence, lowest first: `builder/resources/defaults.toml`, a `--config FILE`, `--set key=value`.
No other module reads configuration files or the environment; they receive these objects.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import uuid
from urllib.parse import urlsplit
from dataclasses import dataclass, fields
from pathlib import Path

from builder.errors import ConfigError
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

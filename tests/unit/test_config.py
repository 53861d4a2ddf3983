import pytest

from builder.config import load_product, parse_set_options, validate_version
from builder.errors import ConfigError


def test_defaults_load_and_are_valid():
    p = load_product()
    assert p.windows_install_folder == "Example Remote Support\\Agent"
    assert p.mac_install_folder == "/Library/Application Support/Example Remote Support/Agent"
    assert p.component_guid("agent.exe") == p.component_guid("agent.exe") != p.component_guid("other")


def test_precedence_file_then_set(tmp_path):
    cfg = tmp_path / "product.toml"
    cfg.write_text('[product]\nvendor = "Acme Inc"\nname = "Acme Agent"\n')
    p = load_product(cfg, parse_set_options(("name=Acme Remote", "slot_size=16384")))
    assert (p.vendor, p.name, p.slot_size) == ("Acme Inc", "Acme Remote", 16384)


@pytest.mark.parametrize(
    "items, field",
    [
        (("vendor=Acme<script>",), "vendor"),
        (("upgrade_code=not-a-guid",), "upgrade_code"),
        (("agent_exe=agent",), "agent_exe"),
        (("install_folder=../etc",), "install_folder"),
        (("slot_size=100",), "slot_size"),
        (("nosuchkey=1",), "nosuchkey"),
    ],
)
def test_bad_values_name_the_key(items, field):
    with pytest.raises(ConfigError, match=field):
        load_product(None, parse_set_options(items))


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[product\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_product(bad)
    with pytest.raises(ConfigError, match="missing.toml"):
        load_product(tmp_path / "missing.toml")


@pytest.mark.parametrize("v", ["1.0", "1.0.0.0", "256.0.0", "1.0.65536", "a.b.c"])
def test_versions(v):
    with pytest.raises(ConfigError):
        validate_version(v)
    assert validate_version("255.255.65535")

"""What a red-team pass found (issue 10), each as the failure it showed, in pure code.

Every rule is checked whole (re.fullmatch): Python's `$` also matches before a final newline,
so `^...$` with `.match` let `acct\\n` through.
"""

from __future__ import annotations

import dataclasses

import pytest

from builder.config import load_product, validate_version
from builder.enrollment import Enrollment, Secret, validate_console_url, validate_id, validate_token
from builder.errors import ConfigError, EnrollmentError

GOOD = {"account_id": "acct-1", "group_id": "grp-1", "console_url": "https://c.example.com",
        "enrollment_token": "tok-en_0123456789abcdef"}


# -- 1. a trailing newline passes no rule ----------------------------------------------------------

@pytest.mark.parametrize("check", [
    lambda: validate_id("account-id", "acct\n"),
    lambda: validate_id("group-id", "grp\n"),
    lambda: validate_token(Secret("tok-en_0123456789abcdef\n")),
    lambda: validate_console_url("https://c.example.com\n"),
], ids=["account", "group", "token", "console-url"])
def test_enrollment_rules_refuse_a_trailing_newline(check):
    with pytest.raises(EnrollmentError):
        check()


@pytest.mark.parametrize("field", ["account_id", "group_id", "console_url", "enrollment_token"])
def test_a_stamp_document_with_a_trailing_newline_is_refused(field):
    import json

    doc = {**GOOD, field: GOOD[field] + "\n"}
    with pytest.raises(EnrollmentError):
        Enrollment.from_json_bytes(json.dumps(doc).encode(), "test slot")


@pytest.mark.parametrize("key", ["vendor", "name", "service_name", "agent_exe", "bundle_id", "upgrade_code",
                                 "install_folder", "registry_key"])
def test_product_identity_refuses_a_trailing_newline(key):
    product = load_product()
    with pytest.raises(ConfigError):
        dataclasses.replace(product, **{key: getattr(product, key) + "\n"})


def test_versions_refuse_a_trailing_newline():
    from builder.config import is_version

    assert is_version("1.0.0") and not is_version("1.0.0\n") and not is_version(None)
    with pytest.raises(ConfigError):
        validate_version("1.0.0\n")


def test_service_release_names_refuse_a_trailing_newline_without_naming_a_storage_key():
    from builder.service.issuer import Issuer, UnknownRelease

    issuer = Issuer.__new__(Issuer)  # resolve() needs no storage for a named release
    with pytest.raises(UnknownRelease) as info:
        issuer.resolve("1.0.0\n")
    assert "releases/" not in str(info.value) and "manifest" not in str(info.value)


def test_payload_names_and_dmg_colours_refuse_a_trailing_newline(tmp_path):
    from builder.errors import PayloadError
    from builder.formats import dmg
    from builder.formats.windows_payload import payload_files

    product = load_product()
    (tmp_path / product.agent_exe).write_bytes(b"MZ")
    (tmp_path / "readme.txt\n").write_text("x")
    with pytest.raises(PayloadError):
        payload_files(tmp_path, product)
    settings = {**dmg._DEFAULTS, "format": "UDZO", "filesystem": "HFS+", "default_view": "icon-view"}
    dmg._check_linux_settings({**settings, "background": "#ffffff"}, dmg.SETTINGS_FILE)
    with pytest.raises(ConfigError, match="background"):
        dmg._check_linux_settings({**settings, "background": "#ffffff\n"}, dmg.SETTINGS_FILE)

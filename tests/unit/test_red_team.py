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
    from builder.service.problems import UnknownRelease
    from builder.service.releases import ReleaseCache

    releases = ReleaseCache.__new__(ReleaseCache)  # resolve() needs no storage for a named release
    with pytest.raises(UnknownRelease) as info:
        releases.resolve("1.0.0\n")
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


# -- 6. the redactor -------------------------------------------------------------------------------

def test_words_shorter_than_a_token_are_never_registered():
    from builder import log

    log.register_secret("installer")
    assert log.redact("no such installer id") == "no such installer id"
    assert log.MIN_SECRET_CHARS == 16


def test_the_longest_secret_wins_and_overlaps_are_masked():
    from builder import log

    short, long = "overlap-secret-0123", "overlap-secret-0123-and-more"
    log.register_secret(short)
    log.register_secret(long)
    assert log.redact(f"a {long} b {short} c") == "a *** b *** c"
    assert log.redact("overlap-secret-012") == "overlap-secret-012"  # a prefix alone is not the secret


def test_the_redactor_keeps_no_secret_in_the_clear():
    from builder import log

    value = "clear-text-check-0123456789abcdef"
    log.register_secret(value)
    held = repr((log._permanent, log._current, log._previous))
    assert value[:8] not in held and log.redact(value) == "***"


def test_request_secrets_are_forgotten_after_their_time(monkeypatch):
    import time

    from builder import log

    ttl = log.SECRET_TTL_S
    clock = [time.monotonic() + 10 * ttl]
    monkeypatch.setattr(log.time, "monotonic", lambda: clock[0])
    log.register_secret("process-secret-0123456789", permanent=True)
    log.register_secret("request-token-first-abcdefgh")  # the clock jumped: older generations are gone
    kept = log.registered_secrets()
    for i in range(200):
        log.register_secret(f"request-token-{i:04d}-abcdefgh")
    assert log.registered_secrets() == kept + 200
    clock[0] += ttl - 1
    assert log.redact("request-token-0007-abcdefgh") == "***"
    log.register_secret("request-token-0007-abcdefgh")  # seen again
    clock[0] += ttl - 2  # less than SECRET_TTL_S after it was seen again
    log.register_secret("request-token-late-abcdefgh")
    assert log.redact("request-token-0007-abcdefgh") == "***"
    clock[0] += 2 * ttl
    assert log.redact("request-token-0008-abcdefgh") == "request-token-0008-abcdefgh"
    assert log.redact("request-token-late-abcdefgh") == "request-token-late-abcdefgh"
    assert log.redact("process-secret-0123456789") == "***"
    assert log.registered_secrets() == kept - 1  # the process's secrets only


def test_redaction_cost_does_not_grow_with_the_number_of_secrets(monkeypatch):
    import statistics
    import time as _time

    from builder import log

    text = ("tool output line with nothing secret in it, 0123456789 " * 200)[:10_000]

    def cost() -> float:
        runs = []
        for _ in range(5):
            start = _time.perf_counter()
            log.redact(text)
            runs.append(_time.perf_counter() - start)
        return statistics.median(runs)

    for i in range(10):
        log.register_secret(f"few-{i:05d}-0123456789abcdef")
    few = cost()
    for i in range(log.MAX_SECRETS):
        log.register_secret(f"many-{i:05d}-0123456789abcdef")
    many = cost()
    assert many < 3 * few + 0.002, (few, many)


# -- 9. long-running state -------------------------------------------------------------------------

def test_step_timings_are_bounded(monkeypatch):
    from builder import log

    monkeypatch.setattr(log, "_quiet", True)
    log.take_timings()
    for i in range(3000):
        with log.step(f"step {i}"):
            pass
    kept = log.take_timings()
    assert 0 < len(kept) <= 1000 and kept[-1][0] == "step 2999"


def test_the_prefix_hash_cache_is_bounded(tmp_path):
    import hashlib

    from builder import stamp

    base = tmp_path / "base.bin"
    base.write_bytes(bytes(range(256)))
    stamp._prefix_hashes.clear()
    for n in range(1, 201):
        pieces = [("base", 0, n), ("bytes", b"slot")]
        assert stamp.pieces_sha256(base, pieces) == hashlib.sha256(bytes(range(n)) + b"slot").hexdigest()
    assert len(stamp._prefix_hashes) <= stamp.PREFIX_CACHE


def test_waiting_for_a_queued_job_backs_off(tmp_path):
    from builder.service.audit import Audit
    from builder.service.issuer import Issuer
    from builder.storage import ObjectNotFoundError
    from builder.signing.signers import Signers

    class Store:
        presigned_links = False
        gets = 0

        def get(self, key):
            Store.gets += 1
            raise ObjectNotFoundError(f"no {key}", key=key)

    class Queue:
        failures = 0

        def submit(self, *args):
            pass

        def failure(self, installer_id):
            Queue.failures += 1
            return None

    issuer = Issuer(Store(), signers=Signers(unsigned=True), cache_dir=tmp_path, audit=Audit(tmp_path / "a.sqlite"))
    issuer.queue = Queue()
    try:
        assert issuer._run("0" * 32, "1.0.0", "exe", None, wait_s=1.0) is None
    finally:
        issuer.close()
    assert Store.gets <= 15, Store.gets
    assert 1 <= Queue.failures <= 4

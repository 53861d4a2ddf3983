"""The command line as a release engineer and the console's web service use it: exit codes,
one-line errors, nothing left behind, and a token that never shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import errors

REPO = Path(__file__).resolve().parents[2]
TOKEN = "cli-test-token-Zq9.v8_-secret"


def run_cli(*args, env=None, stdin=None, timeout=None):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=full_env, input=stdin, cwd=REPO, timeout=timeout)


def assert_no_token(proc):
    leaked = TOKEN in proc.stdout or TOKEN in proc.stderr  # a bool, so a failure cannot print the token
    assert not leaked, "the token leaked into the output"


@pytest.fixture(scope="session")
def enrollment_key_file(dev_keys) -> Path:
    return dev_keys.folder / "enrollment.key"


def base_args(out, payload, key: Path | None = None):
    """`builder build` for one group; without `key`, a new DEVELOPMENT enrollment key is made
    beside `out` (a one-shot build pins the key it signs with)."""
    if key is None:
        from builder.signing.enrollment_key import create_dev_key

        folder = Path(out).parent / "enrollment-key"
        folder.mkdir(parents=True, exist_ok=True)
        key = folder / "enrollment.key"
        if not key.exists():
            create_dev_key(folder)
    return ["build", "--version", "1.0.0", "--account-id", "acct-1", "--group-id", "grp-1",
            "--console-url", "https://console.example.com", "--payload", payload, "--out", out,
            "--enrollment-key", key]


def test_exit_codes_are_distinct():
    codes = [cls.exit_code for cls in errors.ALL_ERRORS]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(
    "extra, code, words",
    [
        (["--format", "msi", "--token-env", "TOK", "--no-sign", "--group-id", "bad group"], errors.EnrollmentError.exit_code, "--group-id"),
        (["--format", "msi", "--token-env", "MISSING_VAR", "--no-sign"], errors.UsageError.exit_code, "MISSING_VAR"),
        (["--format", "msi", "--token-env", "TOK", "--no-sign", "--set", "vendor=<x>"], errors.ConfigError.exit_code, "vendor"),
        (["--format", "msi", "--token-env", "TOK", "--no-sign", "--version", "1.0"], errors.ConfigError.exit_code, "--version"),
        (["--format", "msi", "--token-env", "TOK"], errors.UsageError.exit_code, "signing key"),
        (["--format", "msi", "--token-env", "TOK", "--sign-pkcs12", "x.p12"], errors.UsageError.exit_code, "BUILDER_SIGN_PASSWORD"),
    ],
)
def test_bad_input_gives_one_line_and_its_exit_code(tmp_path, test_payload, enrollment_key_file, extra, code, words):
    out = tmp_path / "out"
    proc = run_cli(*base_args(out, test_payload, enrollment_key_file), *extra, env={"TOK": TOKEN})
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in proc.stderr
    assert_no_token(proc)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_format_is_refused(tmp_path, test_payload, enrollment_key_file):
    proc = run_cli(*base_args(tmp_path / "o", test_payload, enrollment_key_file), "--format", "rpm", "--token-env", "TOK", "--no-sign", env={"TOK": TOKEN})
    assert proc.returncode == 2 and "rpm" in proc.stderr


def test_missing_or_empty_payload(tmp_path, enrollment_key_file):
    empty = tmp_path / "payload"
    (empty / "windows").mkdir(parents=True)
    for payload in (tmp_path / "nope", empty):
        out = tmp_path / "out"
        proc = run_cli(*base_args(out, payload, enrollment_key_file), "--format", "msi", "--token-env", "TOK", "--no-sign", env={"TOK": TOKEN})
        assert proc.returncode == errors.PayloadError.exit_code, proc.stderr
        assert "--payload" in proc.stderr
        assert not out.exists() or not any(out.iterdir())


def test_token_file_and_stdin_are_accepted(tmp_path, test_payload, dev_keys, enrollment_key_file):
    out = tmp_path / "out"
    proc = run_cli(*base_args(out, test_payload, enrollment_key_file), "--format", "msi", "--token-file", "-", "--json",
                   "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert, stdin=TOKEN + "\n")
    assert proc.returncode == 0, proc.stderr
    assert_no_token(proc)
    doc = json.loads(proc.stdout)
    (inst,) = doc["installers"]
    assert inst["format"] == "msi" and Path(inst["path"]).is_file() and len(inst["sha256"]) == 64
    leaked = TOKEN in json.dumps(doc)
    assert doc["enrollment"]["group_id"] == "grp-1" and not leaked
    # verify and inspect read the enrollment back, masked.
    proc = run_cli("verify", "--ca", dev_keys.ca_cert, "--json", inst["path"])
    assert proc.returncode == 0, proc.stderr
    assert_no_token(proc)
    report = json.loads(proc.stdout)
    assert report["enrollment"]["account_id"] == "acct-1" and report["enrollment"]["state"] == "valid"
    assert report["enrollment"]["token_fingerprint"] == doc["enrollment"]["token_fingerprint"]
    # without the development CA the signature does not chain to a trusted root
    proc = run_cli("verify", inst["path"])
    assert proc.returncode == errors.VerificationError.exit_code


def test_verify_refuses_unknown_and_truncated_files(tmp_path):
    odd = tmp_path / "x.zip"
    odd.write_bytes(b"PK")
    proc = run_cli("verify", odd)
    assert proc.returncode == errors.UsageError.exit_code and "x.zip" in proc.stderr
    trunc = tmp_path / "t.msi"
    trunc.write_bytes(b"\xd0\xcf\x11\xe0")
    proc = run_cli("inspect", trunc)
    assert proc.returncode == errors.FormatError.exit_code and "t.msi" in proc.stderr, proc.stderr


def test_doctor_lists_tools():
    proc = run_cli("doctor", "--json")
    rows = json.loads(proc.stdout)
    assert {r["tool"] for r in rows} >= {"wixl", "makensis", "osslsigncode"}
    assert proc.returncode == (0 if all(r["version"] for r in rows) else 6)


def test_build_without_an_enrollment_key_is_refused_before_anything_is_built(tmp_path, test_payload):
    out = tmp_path / "out"
    args = [a for a in base_args(out, test_payload, Path("x")) if a not in ("--enrollment-key", Path("x"))]
    proc = run_cli(*args, "--format", "msi", "--token-env", "TOK", "--no-sign", env={"TOK": TOKEN})
    assert proc.returncode == errors.UsageError.exit_code and "--enrollment-key" in proc.stderr, proc.stderr
    assert not out.exists()


def test_enrollment_command_prints_a_signed_enrollment(tmp_path, dev_keys, enrollment_key_file):
    from builder.signing.enrollment_key import load_public_key
    from builder.trust import Trust, verify

    proc = run_cli("enrollment", "--account-id", "acct-1", "--group-id", "grp-1", "--token-env", "TOK",
                   "--enrollment-key", enrollment_key_file, "--expires-in", "3600", env={"TOK": TOKEN})
    assert proc.returncode == 0, proc.stderr
    jws = proc.stdout.strip()
    assert proc.stdout == jws + "\n" and TOKEN not in proc.stdout and TOKEN not in proc.stderr
    pin = load_public_key(dev_keys.folder / "enrollment.pub.pem")
    import time as _time

    signed = verify(jws, Trust((pin,), ("console.example.com",)), int(_time.time()))
    assert signed.token.reveal() == TOKEN and signed.expires_at is not None
    refused = run_cli("enrollment", "--account-id", "acct-1", "--group-id", "grp-1", "--token-env", "TOK",
                      "--console-url", "https://attacker.example", "--enrollment-key", enrollment_key_file, env={"TOK": TOKEN})
    assert refused.returncode == errors.EnrollmentError.exit_code and "console-url" in refused.stderr
    assert refused.stdout == ""

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
    [report] = json.loads(proc.stdout)  # always an array, one report per file
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
    rows = json.loads(proc.stdout)["tools"]
    assert {r["tool"] for r in rows} >= {"wixl", "makensis", "osslsigncode"}
    assert proc.returncode == (0 if all(r["version"] for r in rows) else 6)
    versions = {r["tool"]: r["version"] for r in rows}
    # The version itself, not the tool's first line ("osslsigncode 2.9, using:").
    ossl = subprocess.run(["osslsigncode", "--version"], capture_output=True, text=True)
    assert versions["osslsigncode"] in (ossl.stdout + ossl.stderr).splitlines()[0]
    assert versions["osslsigncode"][0].isdigit() and "," not in versions["osslsigncode"]


def test_doctor_opens_the_keys_and_the_store_as_a_run_would(tmp_path, dev_keys, enrollment_key_file, vendor_keys):
    store = tmp_path / "store"
    store.mkdir()
    good = run_cli("doctor", "--json", "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key,
                   "--enrollment-key", enrollment_key_file, "--storage", store.as_uri())
    checks = {c["check"]: c for c in json.loads(good.stdout)["checks"]}
    assert [checks[k]["status"] for k in ("signing keys", "enrollment key", "storage")] == ["ok"] * 3, good.stdout
    assert "Builder Development Code Signing" in checks["signing keys"]["detail"]
    assert checks["storage"]["detail"].endswith("0 release(s) published")
    bad = run_cli("doctor", "--json", "--sign-cert", dev_keys.sign_cert, "--sign-key", vendor_keys.key,
                  "--redis", "redis://127.0.0.1:9/0")
    assert bad.returncode == errors.SigningError.exit_code, bad.stdout
    checks = {c["check"]: c for c in json.loads(bad.stdout)["checks"]}
    assert checks["signing keys"]["status"] == "FAILED" and "is not the key of the certificate" in checks["signing keys"]["detail"]
    assert checks["redis"]["status"] == "FAILED" and "does not answer" in checks["redis"]["detail"]
    assert checks["redis"]["exit_code"] == errors.QueueError.exit_code


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


# --- output for people and scripts (stdout and stderr are pipes here, as in a script) --------


@pytest.fixture(scope="module")
def long_named_msi(tmp_path_factory, test_payload, dev_keys, enrollment_key_file) -> Path:
    """A signed MSI in a folder whose path is far longer than 80 columns."""
    out = tmp_path_factory.mktemp("out") / ("a-long-folder-name-" * 6) / "installers"
    proc = run_cli(*base_args(out, test_payload, enrollment_key_file), "--format", "msi", "--token-env", "TOK",
                   "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert,
                   env={"TOK": TOKEN})
    assert proc.returncode == 0, proc.stderr
    # The build's summary table is its result: on stdout, the file's whole path on one line.
    msi = next(out.glob("*.msi"))
    assert any(str(msi) in line for line in proc.stdout.splitlines()), proc.stdout
    return msi


def test_verify_prints_its_report_on_stdout_unwrapped(long_named_msi, dev_keys, tmp_path):
    proc = run_cli("verify", "--ca", dev_keys.ca_cert, long_named_msi)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(long_named_msi) and len(lines[0]) > 120  # one line, not cut at 80 columns
    assert "  signature: ok; signer: " in proc.stdout and "  enrollment: valid (signed by pinned key " in proc.stdout
    assert "  kind: msi (the enrollment is the ENROLLMENT property's default" in proc.stdout  # baked, not tagged
    assert proc.stderr == ""  # nothing else to say
    assert_no_token(proc)
    # `verify x > report.txt`: the report is in the file.
    report = tmp_path / "report.txt"
    with open(report, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "builder", "verify", "--ca", str(dev_keys.ca_cert), str(long_named_msi)],
                              stdout=fh, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and report.read_text() == proc.stdout


def test_quiet_keeps_the_result_and_drops_the_progress(long_named_msi, dev_keys, tmp_path, test_payload,
                                                      enrollment_key_file):
    out = tmp_path / "q"
    proc = run_cli("-q", *base_args(out, test_payload, enrollment_key_file), "--format", "msi", "--token-env", "TOK",
                   "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert,
                   env={"TOK": TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no ✓ steps
    assert str(next(out.glob("*.msi"))) in proc.stdout
    # The summary says which group, account and console the installers enroll with.
    assert "Installers for group grp-1 of account acct-1, console https://console.example.com" in proc.stdout
    proc = run_cli("-q", "verify", "--ca", dev_keys.ca_cert, long_named_msi)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == str(long_named_msi)


def test_verify_and_inspect_json_is_always_an_array(long_named_msi, dev_keys):
    for args in (("verify", "--ca", dev_keys.ca_cert), ("inspect",)):
        one = run_cli(*args, "--json", long_named_msi)
        two = run_cli(*args, "--json", long_named_msi, long_named_msi)
        assert one.returncode == two.returncode == 0, one.stderr + two.stderr
        assert [d["file"] for d in json.loads(one.stdout)] == [str(long_named_msi)]
        assert [d["file"] for d in json.loads(two.stdout)] == [str(long_named_msi)] * 2


# --- defaults that must not ship, and checks before any tool runs -----------------------------


@pytest.fixture(scope="module")
def vendor_keys(tmp_path_factory):
    """A code-signing certificate as a vendor's CA issues it (not a DEVELOPMENT one)."""
    from tests.support import vendorpki

    return vendorpki.make(tmp_path_factory.mktemp("vendor-pki"), "Acme Issuing CA", "Acme Remote Support, Inc.")


def release_args(out, payload, key, *extra):
    return ["release", "--version", "1.0.0", "--payload", payload, "--out", out, "--enrollment-key", key, *extra]


def test_real_keys_refuse_the_example_identity(tmp_path, test_payload, vendor_keys, dev_keys, enrollment_key_file):
    sign = ["--format", "exe", "--sign-cert", vendor_keys.cert, "--sign-key", vendor_keys.key, "--ca", vendor_keys.ca]
    out = tmp_path / "rel"
    proc = run_cli(*release_args(out, test_payload, enrollment_key_file, *sign))
    assert proc.returncode == errors.ConfigError.exit_code, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "example product identity (vendor, name, upgrade_code, bundle_id, pkg_identifier; console hosts " \
           "console.example.com)" in line and "--allow-example-identity" in line
    assert not out.exists()  # refused before anything was built
    # A vendor's own identity and console: built.
    identity = tmp_path / "product.toml"
    identity.write_text('[product]\nvendor = "Acme Remote Support"\nname = "Acme Agent"\n'
                        'upgrade_code = "0F3A1C52-7D8B-4E6F-9A21-3B4C5D6E7F80"\nbundle_id = "com.acme.agent"\n'
                        'pkg_identifier = "com.acme.agent.pkg"\nconsole_url = "https://console.acme.test"\n'
                        'console_hosts = ["console.acme.test"]\n')
    proc = run_cli(*release_args(out, test_payload, enrollment_key_file, *sign, "--config", identity))
    assert proc.returncode == 0, proc.stderr
    # The DEVELOPMENT keys of `builder dev-keys` (Mac identities included) may sign the example
    # identity: that is what `make demo` does.
    mac = ["--mac-sign-pkcs12", dev_keys.folder / "mac-developer-id-application.p12",
           "--mac-sign-pkcs12", dev_keys.folder / "mac-developer-id-installer.p12"]
    proc = run_cli(*release_args(tmp_path / "dev", test_payload, enrollment_key_file, "--format", "exe", "--format", "pkg",
                                 "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert,
                                 *mac), env={"BUILDER_MAC_SIGN_PASSWORD": "development"})
    assert proc.returncode == 0, proc.stderr
    # Or, knowingly, the example one.
    proc = run_cli(*release_args(tmp_path / "rel2", test_payload, enrollment_key_file, *sign, "--allow-example-identity"))
    assert proc.returncode == 0, proc.stderr


def test_release_no_sign_works_and_a_folder_holds_one_version(tmp_path, test_payload, enrollment_key_file):
    out = tmp_path / "releases" / "1.0.0"
    proc = run_cli(*release_args(out, test_payload, enrollment_key_file, "--no-sign"))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["signed"] is False and set(manifest["files"]) == {"exe", "msi", "pkg", "dmg"}
    assert not list(out.glob("*.summary.json"))
    before = sorted(p.name for p in out.iterdir())
    # The slot lives in the signature: an unsigned release has none to stamp.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    stamp = ["stamp", "--release", out, "--account-id", "a", "--group-id", "g", "--token-file", token_file,
             "--enrollment-key", enrollment_key_file, "--no-sign", "--console-url", "https://console.example.com"]
    proc = run_cli(*stamp, "--format", "exe", "--out", tmp_path / "g.exe")
    assert proc.returncode == errors.SlotError.exit_code and "unsigned release has none" in proc.stderr
    assert not (tmp_path / "g.exe").exists()
    proc = run_cli(*stamp, "--format", "msi", "--out", tmp_path / "g.msi")
    assert proc.returncode == 0, proc.stderr
    assert_no_token(proc)
    # The stamp's line says what the installer enrolls with, the console included.
    assert proc.stdout.startswith(f"{tmp_path / 'g.msi'}: group g of account a, console https://console.example.com, key ")
    assert "unsigned" in proc.stdout
    # 1.0.1 into 1.0.0's folder: refused before anything is built, the folder as it was.
    proc = run_cli("release", "--version", "1.0.1", "--payload", test_payload, "--out", out,
                   "--enrollment-key", enrollment_key_file, "--no-sign")
    assert proc.returncode == errors.OutputError.exit_code and "holds release 1.0.0" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_failing_release_leaves_its_folder_as_it_found_it(tmp_path, test_payload, dev_keys, enrollment_key_file):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # No Mac identity: named before the Windows installers are built.
    proc = run_cli(*release_args(out, test_payload, enrollment_key_file, "--sign-cert", dev_keys.sign_cert,
                                 "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert))
    assert proc.returncode == errors.UsageError.exit_code
    assert "the pkg needs a Developer ID Installer identity" in proc.stderr
    assert "build and sign" not in proc.stderr  # nothing was built first
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_keys_and_the_timestamp_server_are_checked_before_any_tool_runs(tmp_path, test_payload, dev_keys,
                                                                        vendor_keys, enrollment_key_file):
    out = tmp_path / "rel"
    cases = [
        # a key that is not the certificate's (osslsigncode would say "Failed to checking the consistency")
        (["--sign-cert", dev_keys.sign_cert, "--sign-key", vendor_keys.key], errors.SigningError,
         f"--sign-key {vendor_keys.key} is not the key of the certificate"),
        # a wrong PKCS#12 password
        (["--sign-pkcs12", dev_keys.sign_pkcs12], errors.SigningError, "wrong password"),
        # a timestamp server nobody answers on (osslsigncode: "Unable to set unauthenticated attributes")
        (["--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--timestamp-url", "http://127.0.0.1:9/"],
         errors.SigningError, "--timestamp-url http://127.0.0.1:9/: the timestamp server does not answer"),
    ]
    for extra, error, words in cases:
        proc = run_cli(*release_args(out, test_payload, enrollment_key_file, "--format", "exe", *extra),
                       env={"BUILDER_SIGN_PASSWORD": "not-the-password"})
        assert proc.returncode == error.exit_code, proc.stderr
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert words in line, line
        assert "build and sign" not in proc.stderr and not out.exists()
    # Signing without a timestamp: said, once.
    proc = run_cli(*release_args(out, test_payload, enrollment_key_file, "--format", "exe", "--sign-cert",
                                 dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: no --timestamp-url") == 1


def test_releases_and_issued_answer_the_operators_questions(tmp_path, test_payload, enrollment_key_file):
    store = (tmp_path / "store").as_uri()
    for version, fmts in (("1.0.0", ["msi", "pkg"]), ("1.0.1", ["msi"])):
        folder = tmp_path / "releases" / version
        proc = run_cli("release", "--version", version, "--payload", test_payload, "--out", folder, "--no-sign",
                       "--enrollment-key", enrollment_key_file, *[a for f in fmts for a in ("--format", f)])
        assert proc.returncode == 0, proc.stderr
        assert run_cli("publish", folder, "--to", store).returncode == 0
    proc = run_cli("releases", "--storage", store, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"version": "1.0.0", "formats": ["msi", "pkg"], "signed": False, "builder": json.loads(proc.stdout)[0]["builder"],
         "latest_for": ["pkg"]},
        {"version": "1.0.1", "formats": ["msi"], "signed": False, "builder": json.loads(proc.stdout)[1]["builder"],
         "latest_for": ["msi"]},
    ]
    text = run_cli("releases", "--storage", store)
    assert "1.0.1" in text.stdout and "latest for" in text.stdout

    state = tmp_path / "state"
    env = {"T": TOKEN, "BUILDER_STORAGE_HMAC_KEY": "k" * 64}
    for group in ("g1", "g2"):
        # `latest`: the newest release holding a pkg (1.0.0), not the newest release (1.0.1, msi only).
        proc = run_cli("issue", "--format", "pkg", "--account-id", "acct", "--group-id", group,
                       "--token-env", "T",
                       "--storage", store, "--state", state, "--enrollment-key", enrollment_key_file, "--no-sign",
                       "--console-url", "https://console.example.com", env=env)
        assert proc.returncode == 0, proc.stderr
        assert_no_token(proc)
    proc = run_cli("issued", "--state", state, "--account-id", "acct", "--group-id", "g1", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows and {r["group_id"] for r in rows} == {"g1"} and {r["release"] for r in rows} == {"1.0.0"}
    assert all(r["format"] == "pkg" and len(r["token_fingerprint"] or "") > 8 for r in rows)
    assert_no_token(proc)
    everyone = json.loads(run_cli("issued", "--state", state, "--account-id", "acct", "--json").stdout)
    assert {r["group_id"] for r in everyone} == {"g1", "g2"}
    missing = run_cli("issued", "--state", tmp_path / "nowhere", "--account-id", "acct")
    assert missing.returncode == errors.UsageError.exit_code and "no audit log" in missing.stderr


def test_prune_keeps_the_newest_and_the_latest_of_each_format(tmp_path, test_payload, enrollment_key_file):
    root = tmp_path / "store"
    store = root.as_uri()
    for version, fmts in (("1.0.0", ["msi", "pkg"]), ("1.0.1", ["msi"]), ("1.0.2", ["msi"])):
        folder = tmp_path / "releases" / version
        proc = run_cli("release", "--version", version, "--payload", test_payload, "--out", folder, "--no-sign",
                       "--enrollment-key", enrollment_key_file, *[a for f in fmts for a in ("--format", f)])
        assert proc.returncode == 0, proc.stderr
        assert run_cli("publish", folder, "--to", store).returncode == 0
    env = {"T": TOKEN, "BUILDER_STORAGE_HMAC_KEY": "k" * 64}
    issued = {}
    for version, fmt in (("1.0.0", "pkg"), ("1.0.1", "msi")):
        proc = run_cli("issue", "--format", fmt, "--release", version, "--account-id", "acct", "--group-id", "g",
                       "--token-env", "T", "--storage", store, "--state", tmp_path / "state", "--no-sign",
                       "--enrollment-key", enrollment_key_file, "--console-url", "https://console.example.com",
                       "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        issued[version] = json.loads(proc.stdout)
    files = lambda: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())  # noqa: E731
    before = files()

    dry = run_cli("prune", "--storage", store, "--keep", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert (plan["keep"], plan["remove"]) == (["1.0.0", "1.0.2"], ["1.0.1"])  # 1.0.0: the latest pkg
    assert files() == before  # a dry run removes nothing

    proc = run_cli("prune", "--storage", store, "--keep", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kept 1.0.0, 1.0.2; removed 1.0.1 ({len(plan['keys'])} objects)"
    after = files()
    assert sorted(set(before) - set(after)) == sorted(plan["keys"])
    assert not any("releases/1.0.1/" in k for k in after)
    assert f"records/{issued['1.0.1']['id']}.json" not in after and f"records/{issued['1.0.0']['id']}.json" in after
    assert [r["version"] for r in json.loads(run_cli("releases", "--storage", store, "--json").stdout)] == ["1.0.0", "1.0.2"]
    # What stays is whole: every object a kept index names is there.
    for version in ("1.0.0", "1.0.2"):
        index = json.loads((root / "dist" / "releases" / version / "index.json").read_text())
        assert all((root / e["key"]).is_file() for e in index["files"].values()), version


def test_progress_says_which_step_failed_and_one_signer_reads_the_same(tmp_path, test_payload, dev_keys,
                                                                      enrollment_key_file, vendor_keys):
    args = base_args(tmp_path / "out", test_payload, enrollment_key_file)
    sign = ["--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key]
    # Verified under a root that did not sign it: the verify step is a ✗, never a ✓ before the error.
    proc = run_cli(*args, "--format", "msi", "--token-env", "TOK", *sign, "--ca", vendor_keys.ca, env={"TOK": TOKEN})
    assert proc.returncode == errors.VerificationError.exit_code, proc.stderr
    assert "✗ msi: verify" in proc.stderr and "✓ msi: verify" not in proc.stderr
    # The signer as build --json and verify --json give it: one form (RFC 4514).
    out = tmp_path / "ok"
    built = run_cli(*base_args(out, test_payload, enrollment_key_file), "--format", "exe", "--token-env", "TOK", *sign,
                    "--ca", dev_keys.ca_cert, "--json", env={"TOK": TOKEN})
    assert built.returncode == 0, built.stderr
    [installer] = json.loads(built.stdout)["installers"]
    [report] = json.loads(run_cli("verify", "--ca", dev_keys.ca_cert, "--json", installer["path"]).stdout)
    assert report["signature"]["signer"] == installer["signer"] and installer["signer"].startswith("O=")
    # The DMG's own pkg is labelled as the DMG's in the progress lines.
    macs = run_cli(*base_args(tmp_path / "mac", test_payload, enrollment_key_file), "--format", "pkg", "--format", "dmg",
                   "--token-env", "TOK", "--no-sign", env={"TOK": TOKEN})
    assert macs.returncode == 0, macs.stderr
    assert macs.stderr.count("pkg: stage the payload") == 2 and "dmg: its pkg: stage the payload" in macs.stderr

"""What a red-team pass found (issue 10), each as the failure it showed: through the command line,
the service (on a signed test release) and the local store.

No token is printed: leaks are checked as booleans.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from builder import errors
from builder.enrollment import Secret
from builder.service.revocations import token_fingerprint
from tests.integration.test_cli import TOKEN, assert_no_token, base_args, run_cli
from tests.integration.test_service import ACCOUNT, auth, new_token, start_service
from tests.support.service import build_release, signers_for, trust_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def release_dir(dev_keys, test_payload, tmp_path_factory) -> Path:
    # exe and msi: a revoked token must be refused for every format the release has.
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("red-team-release") / "release",
                         formats=("exe", "msi"))


@pytest.fixture(scope="module")
def service(release_dir, dev_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("red-team-service")
    svc = start_service(root, (root / "store").as_uri(), {"BUILDER_STORAGE_HMAC_KEY": secrets.token_hex(32)},
                        signers=signers_for(dev_keys), ca=dev_keys.ca_cert, publish=release_dir, served=False)
    yield svc
    svc.close()


def one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# -- 1. a trailing newline ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt, signed", [("exe", False), ("msi", True)])
def test_build_refuses_an_account_id_with_a_trailing_newline(tmp_path, test_payload, dev_keys, fmt, signed):
    """The report: a signed msi build ended in "check the signing certificate chain"."""
    out = tmp_path / "out"
    args = base_args(out, test_payload)
    args[args.index("acct-1")] = "acct-1\n"
    signing = (["--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert] if signed
               else ["--no-sign"])
    proc = run_cli(*args, "--format", fmt, "--token-env", "TOK", *signing, env={"TOK": TOKEN})
    assert proc.returncode == errors.EnrollmentError.exit_code, proc.stderr[-2000:]
    assert "--account-id" in one_error_line(proc)
    assert_no_token(proc)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("field", ["account_id", "group_id", "token", "console_url"])
def test_service_refuses_a_trailing_newline_in_every_field(service, field):
    body = {"account_id": ACCOUNT, "group_id": "grp-nl", "token": new_token("nl"), "format": "exe",
            "console_url": "https://console.example.com"}
    body[field] += "\n"
    before = service.keys()
    answer = service.post(body)
    assert answer.status_code == 422, answer.text[:300]
    assert field in answer.json()["error"]
    assert service.keys() == before


def test_a_release_named_with_a_trailing_newline_is_a_clear_404(service):
    answer = service.post({"account_id": ACCOUNT, "group_id": "grp-nl", "token": new_token("nl"), "format": "exe",
                           "release": "1.0.0\n"})
    assert answer.status_code == 404, answer.text[:300]
    error = answer.json()["error"]
    assert "release" in error and "releases/" not in error and "manifest" not in error


def test_an_installer_id_with_a_trailing_newline_is_404(service):
    answer = service.client.get("/v1/installers/" + "0" * 32 + "%0A", headers=auth())
    assert answer.status_code == 404 and "records/" not in answer.text


# -- 2. symbolic links in --payload ---------------------------------------------------------------

def payload_copy(test_payload: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "payload"
    shutil.copytree(test_payload, copy, symlinks=True)
    return copy


@pytest.mark.parametrize("platform, fmt, kind", [("windows", "exe", "file"), ("windows", "msi", "folder"),
                                                 ("macos", "pkg", "file"), ("macos", "dmg", "folder")])
def test_build_refuses_a_symlink_in_the_payload_naming_it(tmp_path, test_payload, platform, fmt, kind):
    payload = payload_copy(test_payload, tmp_path)
    private = tmp_path / "outside"
    private.mkdir()
    (private / "codesign.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    link = payload / platform / ("readme.txt" if kind == "file" else "extras")
    link.symlink_to(private / "codesign.key" if kind == "file" else private)
    out = tmp_path / "out"
    proc = run_cli(*base_args(out, payload), "--format", fmt, "--token-env", "TOK", "--no-sign", env={"TOK": TOKEN})
    assert proc.returncode == errors.PayloadError.exit_code, proc.stderr[-2000:]
    line = one_error_line(proc)
    assert link.name in line and "symbolic link" in line
    assert not out.exists() or not any(out.iterdir())


def test_every_payload_walker_refuses_symlinks(tmp_path, test_payload):
    """The format modules refuse them too when called without `builder build` (a release)."""
    from builder.config import load_product
    from builder.errors import PayloadError
    from builder.formats import macos_payload
    from builder.formats.windows_payload import payload_files

    payload = payload_copy(test_payload, tmp_path)
    (payload / "windows" / "sub").mkdir()
    (payload / "windows" / "sub" / "agent-copy.exe").symlink_to(payload / "windows" / "agent.exe")
    with pytest.raises(PayloadError, match="agent-copy.exe"):
        payload_files(payload / "windows", load_product())
    (payload / "macos" / "lib").symlink_to(tmp_path)
    with pytest.raises(PayloadError, match="lib"):
        macos_payload.check_payload(payload / "macos")


# -- 3. partial files under predictable names -----------------------------------------------------

def plant(folder: Path, names: list[str], victim: Path) -> None:
    """Links at every name a writer used to take for its partial, all to `victim`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(victim)


def untouched(victim: Path) -> bool:
    return victim.read_text() == "precious\n"


def test_build_and_release_never_follow_a_planted_partial(tmp_path, test_payload, dev_keys):
    from builder import release
    from builder.config import load_product

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    name = load_product().service_name
    stem = f"{name}-1.0.0-acct-1-grp-1"
    plant(out, [f".{stem}.exe.partial", f".{stem}.summary.json.partial"], victim)
    # Signed: an EXE's enrollment lives in its signature.
    proc = run_cli(*base_args(out, test_payload), "--format", "exe", "--token-env", "TOK", "--sign-cert", dev_keys.sign_cert,
                   "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert, env={"TOK": TOKEN})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert untouched(victim)
    assert (out / f"{stem}.exe").is_file() and not (out / f"{stem}.exe").is_symlink()
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == [f"{stem}.exe", f"{stem}.summary.json"]

    rel = tmp_path / "release"
    plant(rel, [".manifest.json.partial", f".{name}-1.2.3.exe.partial", f".{name}-1.2.3.summary.json.partial"], victim)
    release.release(format_names=["exe"], product=load_product(), version="1.2.3", payload=test_payload,
                    signers=signers_for(dev_keys), trust=trust_for(dev_keys), out=rel, source_date_epoch=1767225600)
    assert untouched(victim)
    assert (rel / "manifest.json").is_file() and not (rel / "manifest.json").is_symlink()


def test_stamp_never_follows_a_planted_partial_or_output(tmp_path, release_dir, dev_keys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "shared"
    plant(out, [".group.exe.partial"], victim)
    (out / "group.exe").symlink_to(victim)  # the output's own name: replaced, never written through
    proc = run_cli("stamp", "--release", release_dir, "--format", "exe", "--account-id", "acct-1", "--group-id", "grp-1",
                   "--token-env", "TOK", "--out", out / "group.exe", "--ca", dev_keys.ca_cert,
                   "--enrollment-key", dev_keys.folder / "enrollment.key", env={"TOK": TOKEN})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_no_token(proc)
    assert untouched(victim)
    assert (out / "group.exe").is_file() and not (out / "group.exe").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [".group.exe.partial", "group.exe"]


def test_partials_are_new_files_with_unpredictable_names(tmp_path):
    from builder import fileio

    target = tmp_path / "x.bin"
    names = set()
    for _ in range(3):
        fd, path = fileio.create_partial(target)
        os.close(fd)
        names.add(path.name)
        assert path.parent == tmp_path and path.name.startswith(".x.bin.")
    assert len(names) == 3
    work = fileio.new_private_dir(target)
    assert work.parent == tmp_path and stat.S_IMODE(work.stat().st_mode) == 0o700


# -- 4. secrets at rest ---------------------------------------------------------------------------

def private_below(root: Path, path: Path) -> bool:
    """`path` is 0600 and every folder from it up to `root` (excluded) is 0700."""
    if stat.S_IMODE(path.stat().st_mode) != 0o600:
        return False
    folder = path.parent
    while folder != root:
        if stat.S_IMODE(folder.stat().st_mode) != 0o700:
            return False
        folder = folder.parent
    return True


def test_local_store_objects_that_hold_a_token_are_private(service):
    old = os.umask(0o022)
    try:
        answer = service.post({"account_id": ACCOUNT, "group_id": "grp-private", "token": new_token("private"),
                               "format": "exe"})
        assert answer.status_code == 200, answer.text[:300]
        root = service.store.root
        stamps = [p for p in (root / "stamps").rglob("*") if p.is_file()]
        assert stamps and all(private_below(root, p) for p in stamps)
        key = service.store.put_if_absent("installers/ab/" + "ab" * 32 + ".msi", b"baked installer").key
        assert private_below(root, service.store.local_path(key))
    finally:
        os.umask(old)


def test_pkg_stamp_writes_its_intermediate_only_into_a_private_folder(tmp_path, test_payload, monkeypatch,
                                                                     enrollment_key, trust):
    from builder import release, stamp
    from builder.config import load_product
    from builder.enrollment import Enrollment
    from builder.signing.signers import Signers

    rel_dir = tmp_path / "release"
    release.release(format_names=["pkg"], product=load_product(), version="1.2.3", payload=test_payload,
                    signers=Signers(unsigned=True), trust=trust, out=rel_dir, source_date_epoch=1767225600)
    seen = []
    real_write = Path.write_bytes

    def spy(self, data):
        seen.append((self.name, stat.S_IMODE(self.parent.stat().st_mode)))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    enrollment = enrollment_key.sign(Enrollment(account_id="acct-1", group_id="grp-1", token=Secret(TOKEN),
                                                console_url="https://console.example.com"), trust)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    stamp.stamp(release.Release.open(rel_dir), "pkg", enrollment, Signers(unsigned=True), shared / "group.pkg")
    assert seen and all(mode == 0o700 for _name, mode in seen), seen


# -- 5. revocation --------------------------------------------------------------------------------

def test_a_revoked_token_is_dead_for_every_account_and_group(service):
    token = new_token("revoke-everywhere")
    body = {"account_id": ACCOUNT, "group_id": "grp-rev-a", "token": token, "format": "exe"}
    first = service.post(body)
    other_group = service.post({**body, "group_id": "grp-rev-b"})
    assert first.status_code == 200 and other_group.status_code == 200
    revoked = service.client.post("/v1/revocations", json={"account_id": ACCOUNT, "group_id": "grp-rev-a", "token": token},
                                  headers=auth())
    assert revoked.status_code == 200
    # an installer already issued to another group carries the same token: no longer handed out
    assert service.client.get(f"/v1/installers/{other_group.json()['id']}", headers=auth()).status_code == 410
    for changed in ({"group_id": "grp-rev-b"}, {"group_id": "grp-rev-new"}, {"account_id": "acct-elsewhere"},
                    {"format": "msi-tagged"}):
        answer = service.post({**body, **changed})
        assert answer.status_code == 403, (changed, answer.status_code)
        assert "revoked" in answer.json()["error"]
    # Case and padding variants are other strings to the console: they are not revoked (README).
    assert service.post({**body, "token": token + "="}).status_code == 200
    fp = token_fingerprint(Secret(token))
    assert f"revocations/tokens/{fp}.json" in service.keys("revocations")


# -- 6. redaction after validation ------------------------------------------------------------------

@pytest.mark.parametrize("token, status", [("no such installer", 422), ("installer", 200)])
def test_a_word_sent_as_a_token_is_not_masked_in_later_answers(service, token, status):
    answer = service.post({"account_id": ACCOUNT, "group_id": "grp-words", "token": token, "format": "exe"})
    assert answer.status_code == status, answer.text[:300]
    missing = service.client.get("/v1/installers/" + "f" * 32, headers=auth())
    error = missing.json()["error"]
    assert missing.status_code == 404 and error.startswith("no such installer id: "), error
    assert "*" not in error  # the words the client sent as a token are not masked out of it


# -- 7. command-line edges -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["existing folder", "/proc"])
def test_stamp_out_that_cannot_be_written_is_one_line(tmp_path, release_dir, dev_keys, where):
    if where == "existing folder":
        out = tmp_path / "group.exe"
        out.mkdir()
    else:
        out = Path("/proc/group.exe")
    proc = run_cli("stamp", "--release", release_dir, "--format", "exe", "--account-id", "acct-1", "--group-id", "grp-1",
                   "--token-env", "TOK", "--out", out, "--ca", dev_keys.ca_cert,
                   "--enrollment-key", dev_keys.folder / "enrollment.key", env={"TOK": TOKEN})
    assert proc.returncode == errors.OutputError.exit_code, proc.stderr[-2000:]
    assert "--out" in one_error_line(proc)
    assert_no_token(proc)
    if where == "existing folder":
        assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["group.exe"]


@pytest.mark.parametrize("source", ["/dev/zero", "big file", "stdin"])
def test_token_file_reads_at_most_the_rule_plus_one_byte(tmp_path, release_dir, dev_keys, source):
    stdin = None
    if source == "big file":
        path = tmp_path / "token"
        path.write_text("A" * 100_000)
        source = str(path)
    elif source == "stdin":
        stdin, source = "A" * 100_000, "-"
    proc = run_cli("stamp", "--release", release_dir, "--format", "exe", "--account-id", "acct-1", "--group-id", "grp-1",
                   "--token-file", source, "--out", tmp_path / "g.exe", "--ca", dev_keys.ca_cert,
                   "--enrollment-key", dev_keys.folder / "enrollment.key", stdin=stdin, timeout=60)
    assert proc.returncode == errors.EnrollmentError.exit_code, proc.stderr[-2000:]
    assert "4096 bytes" in one_error_line(proc)
    assert not (tmp_path / "g.exe").exists()


def test_a_largest_token_with_a_line_end_is_still_read(tmp_path):
    from builder.enrollment import MAX_TOKEN_BYTES, read_token

    path = tmp_path / "token"
    path.write_bytes(b"A" * MAX_TOKEN_BYTES + b"\r\n")
    assert len(read_token(str(path), None).reveal()) == MAX_TOKEN_BYTES


# -- 8. the token in children's environments -------------------------------------------------------

def test_withheld_variables_reach_no_tool(monkeypatch):
    from builder.tools import runner

    monkeypatch.setitem(runner.TOOLS, "env", runner.Tool("env", "coreutils", (), "tests"))
    monkeypatch.setenv("RED_TEAM_TOKEN", TOKEN)
    runner.withhold_env("RED_TEAM_TOKEN")
    out = runner.run("env", [], log_stdout=False).stdout.decode()
    leaked = TOKEN in out or "RED_TEAM_TOKEN" in out
    assert not leaked and "RED_TEAM_TOKEN" not in os.environ


@pytest.mark.parametrize("name", ["BUILDER_SIGN_PASSWORD", "BUILDER_MAC_SIGN_PASSWORD", "BUILDER_ENROLLMENT_KEY_PASSWORD",
                                  "BUILDER_NOTARY_KEY", "BUILDER_QUEUE_KEY", "BUILDER_API_KEYS", "BUILDER_STORAGE_HMAC_KEY",
                                  "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY",
                                  "AZURE_STORAGE_CONNECTION_STRING"])
def test_no_secret_the_environment_holds_reaches_a_tool(monkeypatch, name):
    """Every variable builder.config reads a secret from is kept from every tool's environment."""
    from builder.tools import runner

    monkeypatch.setitem(runner.TOOLS, "env", runner.Tool("env", "coreutils", (), "tests"))
    monkeypatch.setenv(name, TOKEN)
    out = runner.run("env", [], log_stdout=False).stdout.decode()
    leaked = TOKEN in out
    assert not leaked, name


def test_token_env_is_dropped_from_every_tool_the_build_runs(tmp_path, test_payload, dev_keys):
    import shutil

    shims = tmp_path / "shims"
    shims.mkdir()
    dumps = tmp_path / "env-dumps"
    dumps.mkdir()
    for tool in ("makensis", "osslsigncode", "wixl", "msibuild", "msiinfo", "msidump"):
        real = shutil.which(tool)
        shim = shims / tool
        shim.write_text(f'#!/bin/sh\nenv > "{dumps}/{tool}.$$"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)
    out = tmp_path / "out"
    proc = run_cli(*base_args(out, test_payload), "--format", "exe", "--format", "msi", "--token-env", "RED_TEAM_TOKEN",
                   "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert,
                   env={"RED_TEAM_TOKEN": TOKEN, "PATH": f"{shims}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = list(dumps.iterdir())
    assert {p.name.split(".")[0] for p in seen} >= {"makensis", "wixl"}
    leaked = any(TOKEN in p.read_text() or "RED_TEAM_TOKEN=" in p.read_text() for p in seen)
    assert not leaked, "a tool inherited the token's environment variable"


def test_secrets_of_the_environment_reach_no_tool(monkeypatch):
    from builder.tools import runner

    monkeypatch.setitem(runner.TOOLS, "env", runner.Tool("env", "coreutils", (), "tests"))
    secret = "sign-password-" + secrets.token_hex(8)
    for name in ("BUILDER_SIGN_PASSWORD", "BUILDER_QUEUE_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, secret)
    out = runner.run("env", [], log_stdout=False).stdout.decode()
    leaked = secret in out
    assert not leaked and os.environ["BUILDER_SIGN_PASSWORD"] == secret  # still there for this process

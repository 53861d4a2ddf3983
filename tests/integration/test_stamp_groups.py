"""`builder stamp --groups FILE`: many groups' installers from one release opened once, all or
none; and a release whose files are checked lazily, each format the first time a stamp reads it.

Outputs are read back by tools that are not ours (osslsigncode; the slot and the JWS parsed
here from their documented layout) as well as by `builder verify`. No token is printed: every
leak check is a boolean, and the tokens come from files and variables this module writes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from builder import errors, formats, release, stamp
from builder.errors import FormatError, OutputError, VerificationError
from builder.signing.signers import Signers
from tests.integration.test_cli import run_cli
from tests.support.service import build_release, enrollment_key_for

pytestmark = pytest.mark.timeout(300)

SLOT_MAGIC = b"ENRSLOT1"  # payload/README.md: magic, uint32 LE length, the JWS
CONSOLE = "https://console.example.com"


@pytest.fixture(scope="module")
def release_dir(dev_keys, test_payload, tmp_path_factory) -> Path:
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("groups-release") / "release",
                         formats=("exe", "msi"))


@pytest.fixture
def release_copy(release_dir, tmp_path) -> Path:
    """A copy of the release that a test may tamper with."""
    copy = tmp_path / "release-copy"
    shutil.copytree(release_dir, copy)
    return copy


class Groups:
    """A groups file in a folder of its own, with its token files; every token is kept here only."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "groups.jsonl"
        self.tokens: dict[tuple[str, str], str] = {}
        self.env: dict[str, str] = {}
        self.lines: list[str] = []

    def new_token(self) -> str:
        return secrets.token_urlsafe(32)

    def add(self, account: str, group: str, *, via: str = "file", **extra) -> None:
        token = self.new_token()
        self.tokens[(account, group)] = token
        doc = {"account": account, "group": group, **extra}
        if via == "file":
            name = f"token-{len(self.lines)}"
            (self.folder / name).write_text(token + "\n")
            doc["token_file"] = name  # relative: from the groups file's folder
        else:
            var = f"GROUPS_TEST_TOKEN_{len(self.lines)}"
            self.env[var] = token
            doc["token_env"] = var
        self.lines.append(json.dumps(doc))

    def raw(self, line: str) -> None:
        self.lines.append(line)

    def write(self) -> Path:
        self.path.write_text("\n".join(self.lines) + "\n")
        return self.path

    def leaked(self, proc) -> bool:
        text = proc.stdout + proc.stderr
        return any(t in text for t in self.tokens.values())


def stamp_groups_cli(release_dir, groups: Groups, fmt: str, out: Path, dev_keys, *extra, quiet=False):
    return run_cli(*(["-q"] if quiet else []), "stamp", "--release", release_dir, "--format", fmt, "--groups", groups.write(), "--out", out,
                   "--enrollment-key", dev_keys.folder / "enrollment.key", *extra, env=groups.env)


def listing(folder: Path) -> dict[str, str]:
    """Every entry of `folder`, hidden ones included, with its content's sha256."""
    if not folder.exists():
        return {}
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir")
            for p in folder.iterdir()}


def slot_claims(path: Path) -> dict:
    """The enrollment in an EXE's slot, read from the layout payload/README.md documents (the
    slot is the last thing in the file's PKCS#7): magic, length, then a JWS whose middle part is
    base64url JSON."""
    data = path.read_bytes()
    at = data.rfind(SLOT_MAGIC)
    assert at > 0, "no slot in the stamped file"
    (length,) = struct.unpack("<I", data[at + 8:at + 12])
    jws = data[at + 12:at + 12 + length].decode("ascii")
    parts = jws.split(".")
    assert len(parts) == 3
    return json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))


def osslsigncode_ok(path: Path, ca: Path) -> bool:
    proc = subprocess.run(["osslsigncode", "verify", "-CAfile", str(ca), "-in", str(path)], capture_output=True, text=True)
    return proc.returncode == 0


def error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# -- stamping many groups -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["exe", "msi-tagged"])
def test_every_group_is_stamped_and_reads_back(release_dir, dev_keys, tmp_path, fmt):
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    groups.add("acct-1", "grp-2", via="env", console_url="https://console.example.com/enroll")
    groups.add("acct:0042@example.com", "grp-A_1.x:y@z")
    out = tmp_path / "out"
    proc = stamp_groups_cli(release_dir, groups, fmt, out, dev_keys, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not groups.leaked(proc), "a token leaked into the output"
    docs = json.loads(proc.stdout)
    suffix = formats.kind(fmt).suffix
    want = {f"acct-1+grp-1{suffix}", f"acct-1+grp-2{suffix}", f"acct:0042@example.com+grp-A_1.x:y@z{suffix}"}
    assert isinstance(docs, list) and [d["line"] for d in docs] == [1, 2, 3]
    assert {Path(d["path"]).name for d in docs} == want
    assert set(listing(out)) == want  # nothing else: no partial, no work folder
    for doc in docs:
        path = Path(doc["path"])
        assert path.parent == out and doc["resigned"] is False and doc["format"] == fmt
        assert hashlib.sha256(path.read_bytes()).hexdigest() == doc["sha256"] and path.stat().st_size == doc["size"]
        assert osslsigncode_ok(path, dev_keys.ca_cert), f"osslsigncode verify failed on {path.name}"
        assert doc["enrollment"]["token"].startswith("****")
    # Each installer carries its own group's enrollment.
    verified = run_cli("verify", "--json", "--ca", dev_keys.ca_cert, *[d["path"] for d in docs])
    assert verified.returncode == 0, verified.stdout[-2000:]
    assert not groups.leaked(verified), "verify printed a token"
    for doc, report in zip(docs, json.loads(verified.stdout)):
        got = report["enrollment"]
        assert (got["account_id"], got["group_id"]) == (doc["enrollment"]["account_id"], doc["enrollment"]["group_id"])
    if fmt == "exe":
        for (account, group), token in groups.tokens.items():
            claims = slot_claims(out / f"{account}+{group}.exe")
            assert (claims["account_id"], claims["group_id"]) == (account, group)
            assert claims["console_url"].startswith(CONSOLE)
            same_token = claims["enrollment_token"] == token
            assert same_token, f"{account}+{group}: the slot does not hold this group's token"


def test_the_summary_table_names_every_group_and_a_rerun_replaces_the_same_files(release_dir, dev_keys, tmp_path):
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    groups.add("acct-2", "grp-1", via="env")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")
    first = stamp_groups_cli(release_dir, groups, "exe", out, dev_keys)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "acct-1+grp-1.exe" in first.stdout and "acct-2+grp-1.exe" in first.stdout
    assert "[1/2]" in first.stderr and "[2/2]" in first.stderr  # progress, on stderr
    assert not groups.leaked(first), "a token leaked into the output"
    second = stamp_groups_cli(release_dir, groups, "exe", out, dev_keys, quiet=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[1/2]" not in second.stderr
    assert sorted(listing(out)) == ["acct-1+grp-1.exe", "acct-2+grp-1.exe", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


# -- what is refused, before anything is written --------------------------------------------------

def _symlinked_token(groups: Groups) -> None:
    groups.add("acct-1", "grp-1")
    secret = groups.folder / "elsewhere"
    secret.write_text(groups.new_token())
    (groups.folder / "link").symlink_to(secret)
    groups.raw(json.dumps({"account": "acct-1", "group": "grp-2", "token_file": "link"}))


def _large_token(groups: Groups) -> None:
    groups.add("acct-1", "grp-1")
    (groups.folder / "big").write_text("A" * 100_000)
    groups.raw(json.dumps({"account": "acct-1", "group": "grp-2", "token_file": "big"}))


@pytest.mark.parametrize("case, code, words", [
    ("newline in an id", errors.EnrollmentError.exit_code, ['line 2', '"group"']),
    ("control character", errors.EnrollmentError.exit_code, ['line 2', '"account"']),
    ("token inline", errors.UsageError.exit_code, ['line 2', '"token"', "token_file"]),
    ("token file is a link", errors.UsageError.exit_code, ['line 2', "link"]),
    ("token file too large", errors.EnrollmentError.exit_code, ['line 2', "4096 bytes"]),
    ("host not pinned", errors.EnrollmentError.exit_code, ['line 2', "console"]),
    ("same group twice", errors.UsageError.exit_code, ['line 2', "line 1 too", "acct-1+grp-1.exe"]),
    ("same group in another case", errors.UsageError.exit_code, ['line 2', "line 1 too"]),
    ("unknown key", errors.UsageError.exit_code, ['line 2', '"tokn"']),
    ("a token as a key", errors.UsageError.exit_code, ['line 2', "unknown key", "not shown"]),
    ("not JSON", errors.UsageError.exit_code, ['line 2', "JSON"]),
    ("a key twice", errors.UsageError.exit_code, ['line 2', '"group" is given twice']),
    ("no token", errors.UsageError.exit_code, ['line 2', "token_file"]),
    ("token variable unset", errors.UsageError.exit_code, ['line 2', "NOT_SET_ANYWHERE", "not set"]),
])
def test_a_bad_line_is_named_and_leaves_out_as_it_was(release_dir, dev_keys, tmp_path, case, code, words):
    groups = Groups(tmp_path / "in")
    inline = groups.new_token()
    if case == "token file is a link":
        _symlinked_token(groups)
    elif case == "token file too large":
        _large_token(groups)
    else:
        groups.add("acct-1", "grp-1")
        bad = {
            "newline in an id": lambda: groups.add("acct-1", "grp-2\n"),
            "control character": lambda: groups.add("acct\x07", "grp-2"),
            "token inline": lambda: groups.raw(json.dumps({"account": "acct-1", "group": "grp-2", "token": inline})),
            "host not pinned": lambda: groups.add("acct-1", "grp-2", console_url="https://console.attacker.example"),
            "same group twice": lambda: groups.add("acct-1", "grp-1", via="env"),
            "same group in another case": lambda: groups.add("ACCT-1", "Grp-1"),
            "unknown key": lambda: groups.raw(json.dumps({"account": "acct-1", "group": "grp-2", "tokn": inline})),
            "a token as a key": lambda: groups.raw(json.dumps({"account": "acct-1", "group": "grp-2", inline: "x"})),
            "not JSON": lambda: groups.raw('{"account": "acct-1", "group": ' + inline),
            "a key twice": lambda: groups.raw('{"account": "a", "group": "g", "group": "h", "token_env": "X"}'),
            "no token": lambda: groups.raw(json.dumps({"account": "acct-1", "group": "grp-2"})),
            "token variable unset": lambda: groups.raw(json.dumps({"account": "a", "group": "g", "token_env": "NOT_SET_ANYWHERE"})),
        }[case]
        bad()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "acct-1+grp-1.exe").write_bytes(b"an earlier run's installer")
    before = listing(out)
    proc = stamp_groups_cli(release_dir, groups, "exe", out, dev_keys)
    assert proc.returncode == code, proc.stderr[-2000:]
    line = error_line(proc)
    for word in words:
        assert word in line, line
    leaked = groups.leaked(proc) or inline in proc.stdout + proc.stderr
    assert not leaked, "a token leaked into the output"
    assert listing(out) == before


def test_a_folder_in_place_of_an_output_is_refused_before_anything_is_written(release_dir, dev_keys, tmp_path):
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    groups.add("acct-1", "grp-2")
    out = tmp_path / "out"
    (out / "acct-1+grp-2.exe").mkdir(parents=True)
    proc = stamp_groups_cli(release_dir, groups, "exe", out, dev_keys)
    assert proc.returncode == errors.OutputError.exit_code, proc.stderr[-2000:]
    assert "acct-1+grp-2.exe" in error_line(proc)
    assert listing(out) == {"acct-1+grp-2.exe": "dir"}


def test_a_failure_mid_way_leaves_out_as_it_was(release_dir, dev_keys, tmp_path, monkeypatch):
    rel = release.Release.open(release_dir, ca=dev_keys.ca_cert, lazy=True)
    key = enrollment_key_for(dev_keys)
    from builder.enrollment import Enrollment, Secret

    signed = [(i, key.sign(Enrollment(account_id="acct-1", group_id=f"grp-{i}", token=Secret(secrets.token_urlsafe(32)),
                                      console_url=CONSOLE), rel.trust())) for i in (1, 2, 3)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "acct-1+grp-1.exe").write_bytes(b"an earlier run's installer")
    before = listing(out)
    real, calls = stamp.write_pieces, []

    def failing(base, pieces, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(base, pieces, dst)

    monkeypatch.setattr(stamp, "write_pieces", failing)
    with pytest.raises(OutputError, match="nothing was placed"):
        stamp.stamp_groups(rel, "exe", signed, Signers(verify_ca=dev_keys.ca_cert), out)
    assert len(calls) == 2 and listing(out) == before


def test_groups_goes_with_no_single_group_option(release_dir, dev_keys, tmp_path):
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    proc = stamp_groups_cli(release_dir, groups, "exe", tmp_path / "out", dev_keys, "--account-id", "a",
                            "--token-env", "X")
    assert proc.returncode == errors.UsageError.exit_code
    line = error_line(proc)
    assert "--groups" in line and "--account-id" in line and "--token-env" in line
    assert not (tmp_path / "out").exists()
    # Without --groups, one group's ids are still required.
    proc = run_cli("stamp", "--release", release_dir, "--format", "exe", "--token-env", "X", "--out", tmp_path / "g.exe",
                   "--enrollment-key", dev_keys.folder / "enrollment.key", env={"X": "x" * 20})
    assert proc.returncode == errors.UsageError.exit_code and "--account-id" in error_line(proc)


# -- a release checked lazily: the same refusals, for the format that is used ----------------------

def single(release_dir, fmt: str, out: Path, dev_keys):
    return run_cli("stamp", "--release", release_dir, "--format", fmt, "--account-id", "acct-1", "--group-id", "grp-1",
                   "--token-env", "TOK", "--console-url", CONSOLE, "--out", out, "--ca", dev_keys.ca_cert,
                   "--enrollment-key", dev_keys.folder / "enrollment.key", env={"TOK": secrets.token_urlsafe(32)})


def _flip_a_byte(rel: Path, fmt: str) -> None:
    path = rel / json.loads((rel / "manifest.json").read_text())["files"][fmt]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _edit_manifest(rel: Path, fmt: str, **changes) -> None:
    manifest = json.loads((rel / "manifest.json").read_text())
    manifest["files"][fmt].update(changes)
    (rel / "manifest.json").write_text(json.dumps(manifest))


def _link_in_place(rel: Path, fmt: str) -> None:
    path = rel / json.loads((rel / "manifest.json").read_text())["files"][fmt]["file"]
    copy = rel.parent / ("elsewhere-" + path.name)
    shutil.copyfile(path, copy)  # the same bytes: the hash would match
    path.unlink()
    path.symlink_to(copy)


@pytest.mark.parametrize("tamper, code, words", [
    ("a byte of the exe", VerificationError.exit_code, "does not match its sha256"),
    ("the exe's sha256 in the manifest", VerificationError.exit_code, "does not match its sha256"),
    ("the exe's size in the manifest", FormatError.exit_code, "changed size"),
    ("the exe's name in the manifest", FormatError.exit_code, "not a file name in the release"),
    ("the exe replaced by a link", FormatError.exit_code, "is a link"),
])
def test_a_tampered_exe_stops_exe_stamps_and_not_msi_stamps(release_copy, dev_keys, tmp_path, tamper, code, words):
    if tamper == "a byte of the exe":
        _flip_a_byte(release_copy, "exe")
    elif tamper == "the exe's sha256 in the manifest":
        _edit_manifest(release_copy, "exe", sha256="0" * 64)
    elif tamper == "the exe's size in the manifest":
        _edit_manifest(release_copy, "exe", size=1234)
    elif tamper == "the exe's name in the manifest":
        _edit_manifest(release_copy, "exe", file="../../etc/hostname")
    else:
        _link_in_place(release_copy, "exe")
    proc = single(release_copy, "exe", tmp_path / "g.exe", dev_keys)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert words in error_line(proc)
    assert not (tmp_path / "g.exe").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    out = tmp_path / "out"
    proc = stamp_groups_cli(release_copy, groups, "exe", out, dev_keys, "--ca", dev_keys.ca_cert)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert words in error_line(proc)
    assert not out.exists()
    # The msi was not touched: its stamps work, one or many.
    proc = single(release_copy, "msi-tagged", tmp_path / "g.msi", dev_keys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert osslsigncode_ok(tmp_path / "g.msi", dev_keys.ca_cert)
    proc = stamp_groups_cli(release_copy, groups, "msi-tagged", out, dev_keys, "--ca", dev_keys.ca_cert)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(listing(out)) == ["acct-1+grp-1.msi"]


def test_a_tampered_msi_is_refused_by_an_eager_open_and_by_verify_all(release_copy, dev_keys):
    _flip_a_byte(release_copy, "msi")
    with pytest.raises(VerificationError, match="sha256"):
        release.Release.open(release_copy, ca=dev_keys.ca_cert)
    rel = release.Release.open(release_copy, ca=dev_keys.ca_cert, lazy=True)
    rel.file("exe")
    with pytest.raises(VerificationError, match="sha256"):
        rel.verify_all()
    with pytest.raises(VerificationError, match="sha256"):
        rel.file("msi")  # a failed check is not remembered as passed


def test_a_lazy_release_checks_each_format_once_when_it_is_used(release_dir, dev_keys, monkeypatch):
    release._verified.clear()
    hashed, verified = [], []
    real_hash = release.fileio.sha256_file
    monkeypatch.setattr(release.fileio, "sha256_file", lambda p: hashed.append(Path(p).suffix) or real_hash(p))
    for name in ("exe", "msi"):
        cls = type(formats.get(name))
        real = cls.verify
        monkeypatch.setattr(cls, "verify", lambda self, path, ca, real=real: verified.append(path.suffix) or real(self, path, ca))
    rel = release.Release.open(release_dir, ca=dev_keys.ca_cert, lazy=True)
    assert hashed == [] and verified == []
    rel.file("msi")
    rel.file("msi")
    assert hashed == [".msi"] and verified == [".msi"]
    rel.verify_all()
    assert hashed == [".msi", ".exe"] and verified == [".msi", ".exe"]
    # Signatures are verified once per file and CA in a process; hashes on every open.
    release.Release.open(release_dir, ca=dev_keys.ca_cert)
    assert sorted(hashed) == [".exe", ".exe", ".msi", ".msi"] and len(verified) == 2


def test_read_groups_resolves_token_files_from_the_groups_folder_and_withholds_variables(tmp_path, monkeypatch):
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    groups.add("acct-1", "grp-2", via="env")
    for var, value in groups.env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)  # not the groups file's folder
    lines = stamp.read_groups(groups.write(), "exe", CONSOLE)
    assert [(g.line, g.enrollment.group_id, g.enrollment.console_url) for g in lines] == [(1, "grp-1", CONSOLE), (2, "grp-2", CONSOLE)]
    same = [g.enrollment.token.reveal() == groups.tokens[("acct-1", g.enrollment.group_id)] for g in lines]
    assert same == [True, True]
    assert not any(var in os.environ for var in groups.env)


def test_baked_msis_are_re_signed_for_every_group(release_dir, dev_keys, tmp_path):
    groups = Groups(tmp_path / "in")
    groups.add("acct-1", "grp-1")
    groups.add("acct-1", "grp-2", via="env")
    out = tmp_path / "out"
    proc = stamp_groups_cli(release_dir, groups, "msi", out, dev_keys, "--json", "--ca", dev_keys.ca_cert,
                            "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not groups.leaked(proc), "a token leaked into the output"
    docs = json.loads(proc.stdout)
    assert [Path(d["path"]).name for d in docs] == ["acct-1+grp-1.msi", "acct-1+grp-2.msi"]
    assert set(listing(out)) == {"acct-1+grp-1.msi", "acct-1+grp-2.msi"}
    for doc in docs:
        assert doc["resigned"] is True
        assert hashlib.sha256(Path(doc["path"]).read_bytes()).hexdigest() == doc["sha256"]
        assert osslsigncode_ok(Path(doc["path"]), dev_keys.ca_cert), f"osslsigncode verify failed on {doc['path']}"


def test_a_refused_enrollment_keeps_its_words_its_class_and_gains_its_line(release_dir, dev_keys, tmp_path):
    """An enrollment the release's agents would refuse (here: expired) handed to stamp_groups:
    the error names the line and still says why, with the class (and exit code) a single stamp gives."""
    from builder.enrollment import Enrollment, Secret
    from builder.trust import EnrollmentRefused

    rel = release.Release.open(release_dir, ca=dev_keys.ca_cert, lazy=True)
    enrollment = Enrollment(account_id="acct", group_id="grp", token=Secret("expired-token-0123456789"),
                            console_url="https://console.example.com")
    expired = enrollment_key_for(dev_keys).sign(enrollment, rel.trust(), issued_at=1_000_000, expires_at=1_000_060)
    with pytest.raises(EnrollmentRefused) as info:
        stamp.stamp_groups(rel, "exe", [(3, expired)], Signers(verify_ca=dev_keys.ca_cert), tmp_path / "out",
                           where="--groups g.jsonl")
    assert str(info.value).startswith("--groups g.jsonl line 3: the enrollment expired"), str(info.value)
    assert info.value.reason == "expired" and info.value.exit_code == errors.EnrollmentError.exit_code
    assert not (tmp_path / "out").exists()

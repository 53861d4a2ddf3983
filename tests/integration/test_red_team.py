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
from builder.service.issuer import token_fingerprint
from tests.integration.test_cli import TOKEN, assert_no_token, base_args, run_cli
from tests.integration.test_service import ACCOUNT, auth, new_token, start_service
from tests.support.service import build_release, signers_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def release_dir(dev_keys, test_payload, tmp_path_factory) -> Path:
    return build_release(dev_keys, test_payload, tmp_path_factory.mktemp("red-team-release") / "release", formats=("exe",))


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

def test_build_refuses_an_account_id_with_a_trailing_newline(tmp_path, test_payload):
    out = tmp_path / "out"
    args = base_args(out, test_payload)
    args[args.index("acct-1")] = "acct-1\n"
    proc = run_cli(*args, "--format", "exe", "--token-env", "TOK", "--no-sign", env={"TOK": TOKEN})
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
    from builder.formats import macos_common
    from builder.formats.windows_payload import payload_files

    payload = payload_copy(test_payload, tmp_path)
    (payload / "windows" / "sub").mkdir()
    (payload / "windows" / "sub" / "agent-copy.exe").symlink_to(payload / "windows" / "agent.exe")
    with pytest.raises(PayloadError, match="agent-copy.exe"):
        payload_files(payload / "windows", load_product())
    (payload / "macos" / "lib").symlink_to(tmp_path)
    with pytest.raises(PayloadError, match="lib"):
        macos_common.check_payload(payload / "macos")

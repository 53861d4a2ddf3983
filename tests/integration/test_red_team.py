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

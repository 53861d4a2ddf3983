"""The test console (tests/support/console.py), driven with plain HTTPS requests, and the Python
reference agent's `run` enrolling with it on this host.

The console's own tests do not depend on what the agent sends beyond the endpoint's contract.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import console as consolesupport
from tests.support import signed
from tests.support.servers import running

ROOT = Path(__file__).resolve().parents[2]
AGENT_PY = ROOT / "payload" / "agent" / "agent.py"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[consolesupport.TestConsole]:
    with running(consolesupport.start_console(tmp_path / "console", device_cap=3)) as c:
        yield c


def post(console: consolesupport.TestConsole, body: object, token: str | None, *,
         path: str = "/api/v1/enroll", raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(console.url + path, data=data, headers=headers, method="POST")
    context = ssl.create_default_context(cafile=str(console.ca_pem))  # checks the name `localhost`
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def enrollment(account: str = "acct-1", group: str = "group-a", **device: str) -> dict:
    return {"account_id": account, "group_id": group, "device": device}


def test_enroll_records_account_group_and_device(console) -> None:
    token = console.state.add_token("acct-1", "group-a")
    status, answer = post(console, enrollment(hostname="WIN-01", os="windows"), token)
    assert status == 200, answer
    assert answer == {"device_id": "WIN-01", "account_id": "acct-1", "group_id": "group-a"}
    [device] = console.state.devices("acct-1", "group-a")
    assert device.device == {"hostname": "WIN-01", "os": "windows"}
    # The same device again is the same record; the console lists it in its group over HTTPS too.
    assert post(console, enrollment(hostname="WIN-01", os="windows"), token)[0] == 200
    assert len(console.state.devices("acct-1")) == 1 and device.enrollments == 2
    context = ssl.create_default_context(cafile=str(console.ca_pem))
    with urllib.request.urlopen(console.url + "/api/v1/devices?account_id=acct-1&group_id=group-a",
                                context=context, timeout=30) as response:
        listed = json.loads(response.read())["devices"]
    assert [d["device_id"] for d in listed] == ["WIN-01"]
    assert console.state.devices("acct-1", "group-b") == []


def test_a_device_without_a_name_is_a_new_device_each_time(console) -> None:
    token = console.state.add_token("acct-1", "group-a")
    body = {"account_id": "acct-1", "group_id": "group-a"}  # no "device" at all
    first, second = post(console, body, token)[1], post(console, body, token)[1]
    assert first["device_id"] != second["device_id"]
    assert len(console.state.devices("acct-1", "group-a")) == 2


@pytest.mark.parametrize(
    ("token", "status", "error"),
    [("unknown", 401, "unknown_token"), ("revoked", 401, "token_revoked"), (None, 401, "missing_token"),
     ("other-group", 403, "wrong_scope")],
)
def test_token_refusals_record_nothing(console, token, status, error) -> None:
    good = console.state.add_token("acct-1", "group-a")
    revoked = console.state.add_token("acct-1", "group-a")
    console.state.revoke(revoked)
    other = console.state.add_token("acct-1", "group-b")
    sent = {"unknown": "enr_never-issued", "revoked": revoked, "other-group": other, None: None}[token]
    got_status, answer = post(console, enrollment(hostname="WIN-01"), sent)
    assert (got_status, answer["error"]) == (status, error)
    assert answer["reason"]  # a sentence the agent can put in its status
    assert console.state.devices("acct-1") == []
    assert post(console, enrollment(hostname="WIN-01"), good)[0] == 200  # the right token still works


def test_malformed_bodies_are_refused(console) -> None:
    token = console.state.add_token("acct-1", "group-a")
    for raw in (b"{", b"[]", json.dumps({"account_id": "acct-1"}).encode(),
                json.dumps({"account_id": "acct-1", "group_id": "group-a", "device": "WIN-01"}).encode()):
        status, answer = post(console, None, token, raw=raw)
        assert (status, answer["error"]) == (400, "malformed"), raw
    assert post(console, enrollment(), token, path="/api/v1/other")[0] == 404
    assert console.state.devices("acct-1") == []


def test_device_cap_per_account(console) -> None:
    token = console.state.add_token("acct-1", "group-a")
    for n in range(3):
        assert post(console, enrollment(hostname=f"WIN-{n}"), token)[0] == 200
    status, answer = post(console, enrollment(hostname="WIN-3"), token)
    assert (status, answer["error"]) == (403, "device_limit")
    assert "3 devices" in answer["reason"]
    assert post(console, enrollment(hostname="WIN-0"), token)[0] == 200  # a known device re-enrolls
    other = console.state.add_token("acct-2", "group-a")  # the cap is per account
    assert post(console, enrollment("acct-2", hostname="WIN-3"), other)[0] == 200
    assert len(console.state.devices("acct-1")) == 3


def test_the_product_limit_is_ten_thousand(tmp_path: Path) -> None:
    with running(consolesupport.start_console(tmp_path / "console")) as console:
        assert console.state.device_cap == 10_000
        token = console.state.add_token("big", "all")
        console.state.add_devices("big", "all", 9_999)
        assert post(console, enrollment("big", "all", hostname="last-one"), token)[0] == 200
        status, answer = post(console, enrollment("big", "all", hostname="one-too-many"), token)
        assert (status, answer["error"]) == (403, "device_limit")
        assert "10000 devices" in answer["reason"]
        assert len(console.state.devices("big")) == 10_000


def test_the_certificate_is_for_localhost_from_the_test_ca(console) -> None:
    token = console.state.add_token("acct-1", "group-a")
    request = urllib.request.Request(console.url + "/api/v1/enroll", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.URLError) as caught:  # the system store does not know the CA
        urllib.request.urlopen(request, context=ssl.create_default_context(), timeout=30)
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)
    assert console.state.requests == 0  # the token never reached the console


# ------------------------------------------------------------------ the reference agent (host)


KEY = signed.new_key()


def run_agent(config: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "AGENT_CA_BUNDLE"}
    return subprocess.run([sys.executable, str(config.parent / "agent.py"), "run", "--config", str(config),
                           "--ca-bundle", str(ca), "--attempts", "2", "--backoff", "0.01"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**env, "NO_PROXY": "127.0.0.1,localhost"})


def write_config(path: Path, console, token: str, account: str = "acct-1", group: str = "group-a") -> Path:
    """agent.py installed with trust.json beside it (pinning KEY and the console's host) and a
    config holding an enrollment signed by KEY."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(AGENT_PY, path.parent / "agent.py")
    (path.parent / "trust.json").write_bytes(signed.trust_json([KEY], [f"localhost:{console.port}"]))
    se = signed.sign(KEY, account_id=account, group_id=group, token=token, console_url=console.url + "/")
    path.write_text(json.dumps({"enrollment": se}))
    return path


def test_reference_agent_enrolls_and_appears_in_its_group(console, tmp_path: Path) -> None:
    token = console.state.add_token("acct-1", "group-a")
    config = write_config(tmp_path / "etc" / "enrollment.json", console, token)
    result = run_agent(config, console.ca_pem)
    assert result.returncode == 0, result.stderr
    assert [d.group_id for d in console.state.devices("acct-1")] == ["group-a"]
    assert json.loads((config.parent / "status.json").read_text())["state"] == "enrolled"
    assert token not in result.stdout + result.stderr


@pytest.mark.parametrize("why", ["revoked", "cap"])
def test_reference_agent_is_refused(console, tmp_path: Path, why: str) -> None:
    token = console.state.add_token("acct-1", "group-a")
    if why == "revoked":
        console.state.revoke(token)
    else:
        console.state.add_devices("acct-1", "group-a", 3)
    config = write_config(tmp_path / "etc" / "enrollment.json", console, token)
    result = run_agent(config, console.ca_pem)
    assert result.returncode == 8, result.stderr  # final: the console refused
    assert console.state.refusals[-1].error == {"revoked": "token_revoked", "cap": "device_limit"}[why]
    assert len(console.state.devices("acct-1")) == (0 if why == "revoked" else 3)
    assert token not in result.stdout + result.stderr

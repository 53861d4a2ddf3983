"""A stamp that signs again vouches, with the vendor's key, for the bytes it re-bakes: the pins,
the console hosts, the agent. It signs only what a trusted signature already vouched for: a
release that is unsigned, or signed under a root this machine does not trust (and --ca does not
name), is refused when keys would sign, on the command line and in the service (the ConnectWise
case: a vendor-signed installer pointing at whoever published the release)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder import errors, release, stamp
from builder.config import load_product
from builder.enrollment import Enrollment, Secret
from builder.signing import devca
from builder.signing.signers import Signers
from tests.support.service import build_release, enrollment_key_for, signers_for, trust_for

REPO = Path(__file__).resolve().parents[2]
EPOCH = 1767225600
TOKEN = "resign-trust-token-0123456789"


def _signed(dev_keys, rel: release.Release):
    enrollment = Enrollment(account_id="acct", group_id="grp", token=Secret(TOKEN),
                            console_url="https://console.example.com")
    return enrollment_key_for(dev_keys).sign(enrollment, rel.trust())


def test_an_unsigned_release_is_not_signed_again(test_payload, dev_keys, tmp_path):
    release.release(format_names=["msi"], product=load_product(), version="1.2.3", payload=test_payload,
                    signers=Signers(unsigned=True), trust=trust_for(dev_keys), out=tmp_path / "rel",
                    source_date_epoch=EPOCH)
    rel = release.Release.open(tmp_path / "rel", ca=dev_keys.ca_cert)
    out = tmp_path / "out" / "g.msi"
    with pytest.raises(errors.VerificationError) as info:
        stamp.stamp(rel, "msi", _signed(dev_keys, rel), signers_for(dev_keys), out)
    assert "unsigned" in str(info.value) and "--no-sign" in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # Unsigned in, unsigned out still works (development).
    made = stamp.stamp(rel, "msi", _signed(dev_keys, rel), Signers(unsigned=True), out)
    assert made.resigned is False and out.is_file()


def test_a_release_signed_under_an_untrusted_root_is_not_signed_again(test_payload, dev_keys, tmp_path):
    other = devca.create(tmp_path / "other-ca")  # whoever could write the release folder or bucket
    build_release(dev_keys, test_payload, tmp_path / "rel", formats=("msi",), signed_by=other)
    # Without --ca the release opens (its hash matches; the untrusted root is a warning) ...
    release._verified.clear()
    rel = release.Release.open(tmp_path / "rel")
    with pytest.raises(errors.VerificationError) as info:  # ... but nothing signs what it holds
        stamp.stamp(rel, "msi", _signed(dev_keys, rel), signers_for(dev_keys), tmp_path / "out" / "g.msi")
    assert "root" in str(info.value) and "--ca" in str(info.value)
    assert not (tmp_path / "out" / "g.msi").exists()
    # The operator who names that root with --ca vouches for it.
    release._verified.clear()
    trusted = release.Release.open(tmp_path / "rel", ca=other.ca_cert)
    made = stamp.stamp(trusted, "msi", _signed(dev_keys, trusted), signers_for(dev_keys), tmp_path / "out" / "g.msi")
    assert made.resigned
    verify = subprocess.run(["osslsigncode", "verify", "-CAfile", str(dev_keys.ca_cert), "-in", str(made.path)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout[-2000:]


def test_the_cli_refuses_to_sign_an_unsigned_release_in_one_line(test_payload, dev_keys, tmp_path):
    key = dev_keys.folder / "enrollment.key"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOK": TOKEN}
    run = lambda *a: subprocess.run([sys.executable, "-m", "builder", *map(str, a)], capture_output=True, text=True,
                                    env=env, cwd=REPO)
    made = run("release", "--version", "1.0.0", "--payload", test_payload, "--out", tmp_path / "rel",
               "--enrollment-key", key, "--format", "msi", "--no-sign")
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / "out"
    proc = run("stamp", "--release", tmp_path / "rel", "--format", "msi", "--account-id", "a", "--group-id", "g",
               "--token-env", "TOK", "--enrollment-key", key, "--out", out / "g.msi",
               "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert)
    assert proc.returncode == errors.VerificationError.exit_code, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "unsigned" in line
    leaked = TOKEN in proc.stdout or TOKEN in proc.stderr
    assert not leaked
    assert not out.exists() or not any(out.iterdir())


def test_the_service_refuses_to_sign_a_published_release_no_trusted_signature_vouches_for(test_payload, dev_keys,
                                                                                          tmp_path):
    """Someone who can write the bucket publishes a release signed under their own CA: the
    service (no --ca: system roots) serves nothing it would have to sign again from it."""
    from builder.config import Environment
    from builder.service.problems import describe
    from builder.service.setup import RELEASES_PREFIX, ServiceOptions, make_issuer
    from builder.storage import publish_release

    other = devca.create(tmp_path / "other-ca")
    build_release(dev_keys, test_payload, tmp_path / "rel", formats=("msi",), signed_by=other)
    issuer = make_issuer(ServiceOptions(storage_url=(tmp_path / "store").as_uri(), state_dir=tmp_path / "state",
                                        signers=signers_for(dev_keys), enrollment_key=enrollment_key_for(dev_keys)),
                         Environment.read({"BUILDER_STORAGE_HMAC_KEY": "k" * 64}))
    publish_release(tmp_path / "rel", issuer.store, RELEASES_PREFIX, version="1.0.0")
    release._verified.clear()
    enrollment = Enrollment(account_id="acct", group_id="grp", token=Secret(TOKEN),
                            console_url="https://console.example.com")
    try:
        with pytest.raises(errors.VerificationError) as info:
            issuer.request("test", release="1.0.0", fmt="msi", enrollment=enrollment, wait_s=60)
        problem = describe(info.value)
        assert (problem.status, problem.code) == (503, "release_refused"), problem
        assert issuer.store.list("installers") == []  # nothing was made or stored
    finally:
        issuer.close()


# -- what the service takes from storage -------------------------------------------------------


def _service(tmp_path, dev_keys, *, ca):
    from builder.config import Environment
    from builder.service.setup import ServiceOptions, make_issuer

    return make_issuer(ServiceOptions(storage_url=(tmp_path / "store").as_uri(), state_dir=tmp_path / "state",
                                      signers=signers_for(dev_keys), ca=ca, enrollment_key=enrollment_key_for(dev_keys)),
                       Environment.read({"BUILDER_STORAGE_HMAC_KEY": "k" * 64}))


def _request(issuer, fmt: str):
    enrollment = Enrollment(account_id="acct", group_id="grp", token=Secret(TOKEN),
                            console_url="https://console.example.com")
    return issuer.request("test", release="1.0.0", fmt=fmt, enrollment=enrollment, wait_s=60)


def test_the_service_serves_no_unsigned_release(test_payload, dev_keys, tmp_path):
    """An unsigned release in the bucket (a manifest saying "signed": false skips every signature
    check): the service refuses the release as a whole, exe included."""
    from builder.service.problems import describe
    from builder.storage import publish_release
    from builder.service.setup import RELEASES_PREFIX

    release.release(format_names=["msi"], product=load_product(), version="1.0.0", payload=test_payload,
                    signers=Signers(unsigned=True), trust=trust_for(dev_keys), out=tmp_path / "rel",
                    source_date_epoch=EPOCH)
    issuer = _service(tmp_path, dev_keys, ca=dev_keys.ca_cert)
    publish_release(tmp_path / "rel", issuer.store, RELEASES_PREFIX, version="1.0.0")
    try:
        for fmt in ("msi", "msi-tagged"):
            with pytest.raises(errors.BuilderError) as info:
                _request(issuer, fmt)
            problem = describe(info.value)
            assert (problem.status, problem.code) == (503, "release_refused"), (fmt, problem)
        assert issuer.store.list("installers") == []
    finally:
        issuer.close()


@pytest.mark.parametrize("damage", ["climbs out", "files not a map", "entry without key", "key climbs out",
                                    "sha256 not hex", "size not a number"])
def test_an_index_naming_a_path_outside_the_release_is_refused_and_writes_nothing_there(test_payload, dev_keys,
                                                                                         tmp_path, damage):
    """Someone who can write the bucket rewrites a release's index so that a file name climbs out
    of the service's cache: the release is refused as malformed; nothing is written outside."""
    import json

    from builder.service.problems import describe
    from builder.storage import publish_release
    from builder.service.setup import RELEASES_PREFIX

    build_release(dev_keys, test_payload, tmp_path / "rel", formats=("exe",))
    issuer = _service(tmp_path, dev_keys, ca=dev_keys.ca_cert)
    index_key = publish_release(tmp_path / "rel", issuer.store, RELEASES_PREFIX, version="1.0.0")
    index_path = tmp_path / "store" / index_key
    index = json.loads(index_path.read_text())
    [name] = [n for n in index["files"] if n.endswith(".exe")]
    entry = index["files"][name]
    if damage == "climbs out":
        index["files"]["../../../escaped.exe"] = entry
    elif damage == "files not a map":
        index["files"] = list(index["files"])
    elif damage == "entry without key":
        del entry["key"]
    elif damage == "key climbs out":
        entry["key"] = "../../../escaped.exe"
    elif damage == "sha256 not hex":
        entry["sha256"] = {"x": 1}
    else:
        entry["size"] = "30 MB"
    index_path.chmod(0o600)
    index_path.write_text(json.dumps(index))
    try:
        with pytest.raises(errors.BuilderError) as info:
            _request(issuer, "exe")
        problem = describe(info.value)
        assert (problem.status, problem.code) == (503, "release_refused"), problem
        assert not list(tmp_path.rglob("escaped.exe"))
    finally:
        issuer.close()

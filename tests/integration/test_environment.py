"""The environment is read once, by builder.config.Environment: SOURCE_DATE_EPOCH is checked
there; no other module reads os.environ (the tool runner's child environment and --token-env
aside); and a stamp that signs names its release's product, not the signer's default."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from builder import release, stamp
from builder.config import Environment, load_product
from builder.enrollment import Enrollment, Secret
from builder.errors import UsageError
from builder.signing.authenticode import SigningKey
from builder.signing.signers import Signers
from tests.support.service import enrollment_key_for, trust_for

REPO = Path(__file__).resolve().parents[2]
EPOCH = 1767225600
# Who may touch os.environ: config reads it; the runner builds children's environments and
# withholds secrets from them; read_token reads the variable --token-env names.


def _environ_readers() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in sorted((REPO / "builder").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            hit = (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
                   and isinstance(node.value, ast.Name) and node.value.id == "os")
            hit |= isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv", "environb") for a in node.names)
            if hit:
                found.setdefault(str(path.relative_to(REPO)), []).append(node.lineno)
    return found


def test_no_module_but_config_reads_the_environment():
    readers = _environ_readers()
    assert "builder/config.py" in readers  # the check sees a read where there is one
    assert set(readers) <= {"builder/config.py", "builder/tools/runner.py", "builder/enrollment.py"}, readers
    owners = {_function_at(REPO / "builder/enrollment.py", line) for line in readers.get("builder/enrollment.py", [])}
    assert owners <= {"read_token"}, owners


def _function_at(path: Path, line: int) -> str | None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.lineno <= line <= node.end_lineno:
            return node.name
    return None


@pytest.mark.parametrize("raw", ["soon", "1767225600\n", " 1767225600", "-1", "0", "99999999999", "1.5", "١٢٣"])
def test_a_bad_source_date_epoch_is_refused_naming_it(raw):
    with pytest.raises(UsageError) as info:
        Environment.read({"SOURCE_DATE_EPOCH": raw})
    assert "SOURCE_DATE_EPOCH" in str(info.value)


def test_the_cli_refuses_a_bad_source_date_epoch_in_one_line_before_anything_runs(tmp_path):
    env = {**os.environ, "SOURCE_DATE_EPOCH": "tomorrow"}
    proc = subprocess.run([sys.executable, "-m", "builder", "dev-keys", str(tmp_path / "keys")], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == UsageError.exit_code
    assert proc.stderr.count("\n") == 1 and "SOURCE_DATE_EPOCH" in proc.stderr
    assert not (tmp_path / "keys").exists()


def test_a_service_setting_does_not_stop_other_commands(tmp_path):
    """BUILDER_API_KEYS_FILE is the service's: a missing file stops `serve`, not `builder build`."""
    env = Environment.read({"BUILDER_API_KEYS_FILE": str(tmp_path / "missing")})
    assert env.api_keys_file == tmp_path / "missing"


def test_the_environment_is_resolved_once_into_values():
    env = Environment.read({"SOURCE_DATE_EPOCH": str(EPOCH), "BUILDER_SIGN_PASSWORD": "", "BUILDER_QUEUE_KEY": "",
                            "AWS_REGION": "eu-west-1", "BUILDER_NOTARY_KEY_ID": "K", "HOME": "/root"})
    assert env.epoch() == EPOCH
    assert env.sign_password is not None and env.sign_password.reveal() == ""  # set, even empty: given
    assert env.queue_key is None  # empty: not set
    assert dict(env.storage) == {"AWS_REGION": "eu-west-1"} and dict(env.notary) == {"BUILDER_NOTARY_KEY_ID": "K"}


def test_a_baked_stamp_is_signed_in_its_releases_products_name(test_payload, dev_keys, tmp_path):
    """The service's signers carry the default product's name; a release of another product is
    re-signed in that product's name (the description Windows shows in its UAC prompt)."""
    product = replace(load_product(), name="Acme Field Agent")
    signing = SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key, description=load_product().name)
    signers = Signers(authenticode=replace(signing, description=product.name), verify_ca=dev_keys.ca_cert)
    release.release(format_names=["msi"], product=product, version="1.2.3", payload=test_payload, signers=signers,
                    trust=trust_for(dev_keys), out=tmp_path / "rel", source_date_epoch=EPOCH)
    rel = release.Release.open(tmp_path / "rel", ca=dev_keys.ca_cert)
    enrollment = Enrollment(account_id="acct", group_id="grp", token=Secret("t0ken-for-product-test"),
                            console_url="https://console.example.com")
    signed = enrollment_key_for(dev_keys).sign(enrollment, rel.trust())
    out = stamp.stamp(rel, "msi", signed, Signers(authenticode=signing, verify_ca=dev_keys.ca_cert), tmp_path / "g.msi")
    assert out.resigned
    names = _program_names(out.path, tmp_path)
    assert names == ["Acme Field Agent"], names


def _program_names(path: Path, tmp: Path) -> list[str]:
    """The SpcSpOpusInfo program names in the file's Authenticode signature: osslsigncode
    extracts the signature, openssl's asn1parse locates each name (an SpcString, [1] ASCII or
    [0] BMP, inside the attribute 1.3.6.1.4.1.311.2.1.12)."""
    der = tmp / "sig.der"
    subprocess.run(["osslsigncode", "extract-signature", "-in", str(path), "-out", str(der)], check=True,
                   capture_output=True)
    lines = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", str(der)], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    data = der.read_bytes()
    names = []
    for i, line in enumerate(lines):
        if line.endswith(":1.3.6.1.4.1.311.2.1.12"):
            # SET > SEQUENCE > [0] programName > [0] BMP or [1] ASCII
            m = re.match(r"\s*(\d+):d=\d+\s+hl=(\d+)\s+l=\s*(\d+)\s+prim: cont \[ ([01]) \]", lines[i + 4])
            assert m, lines[i:i + 5]
            start, header, length, tag = (int(g) for g in m.groups())
            raw = data[start + header:start + header + length]
            names.append(raw.decode("utf-16-be" if tag == 0 else "ascii"))
    return names

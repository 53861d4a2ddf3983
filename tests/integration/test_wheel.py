"""The wheel works outside the checkout: built with pip, installed into a fresh virtualenv in a
temporary folder, and run from there. The templates travel inside the package
(builder/templates); nothing may be read from the checkout.

The new virtualenv gets the project's dependencies from the checkout's .venv through a .pth
line (no network beyond what `pip wheel` needs for setuptools); the checkout's editable
`builder` is not visible there (a .pth inside an added folder is not processed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh virtualenv holding only the built wheel (and a path to the dependencies)."""
    work = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", REPO, cwd=work)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (work / "dist").glob("builder-*.whl")
    venv = work / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=work).returncode == 0
    pip = run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=work)
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=work).stdout.strip())
    (site / "checkout-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_installed_package_reads_nothing_from_the_checkout(installed, tmp_path):
    where = run(installed / "python", "-c", "import json, builder, builder.config as c; "
                "print(json.dumps([builder.__file__, str(c.TEMPLATES_DIR)]))", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, templates = map(Path, json.loads(where.stdout))
    venv = installed.parent
    assert module.is_relative_to(venv) and templates.is_relative_to(venv), (module, templates)
    assert not module.is_relative_to(REPO) and (templates / "wix" / "agent.wxs.j2").is_file()


def test_build_release_and_stamp_from_the_wheel(installed, test_payload, tmp_path):
    builder = installed / "builder"
    keys = tmp_path / "keys"
    assert run(builder, "dev-keys", keys, cwd=tmp_path).returncode == 0
    env = {"TOK": "wheel-test-token-0123456789abcdef"}
    common = ["--payload", test_payload, "--enrollment-key", keys / "enrollment.key", "--no-sign"]
    proc = run(builder, "build", "--format", "msi", "--format", "pkg", "--version", "1.0.0", "--account-id", "a",
               "--group-id", "g", "--token-env", "TOK", "--console-url", "https://console.example.com",
               "--out", tmp_path / "out", *common, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir() if p.suffix in (".msi", ".pkg")) == [".msi", ".pkg"]
    proc = run(builder, "release", "--format", "msi", "--format", "pkg", "--format", "dmg", "--version", "1.0.0",
               "--out", tmp_path / "rel", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for fmt, suffix in (("msi", ".msi"), ("dmg", ".dmg")):
        proc = run(builder, "stamp", "--release", tmp_path / "rel", "--format", fmt, "--account-id", "a",
                   "--group-id", "g", "--token-env", "TOK", "--console-url", "https://console.example.com",
                   "--enrollment-key", keys / "enrollment.key", "--no-sign", "--out", tmp_path / f"g{suffix}",
                   cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = run(builder, "inspect", "--json", tmp_path / f"g{suffix}", cwd=tmp_path)
        assert json.loads(report.stdout)[0]["enrollment"]["group_id"] == "g", report.stderr

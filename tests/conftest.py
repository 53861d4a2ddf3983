"""Fixtures shared by every suite: development keys, the test payload, wine prefixes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder.signing import devca
from builder.signing.enrollment_key import DEV_KEY_NAME, FileEnrollmentKey, create_dev_key
from builder.trust import Trust
from tests.support import wine as winesupport

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dev_keys(tmp_path_factory) -> devca.DevKeys:
    """A development CA, code-signing keys, a test TSA and an enrollment key (enrollment.key,
    as `builder dev-keys` makes), made once per session."""
    keys = devca.create(tmp_path_factory.mktemp("dev-keys"))
    create_dev_key(keys.folder)
    return keys


@pytest.fixture(scope="session")
def enrollment_key(dev_keys) -> FileEnrollmentKey:
    """The session's enrollment key: dev_keys.folder / enrollment.key."""
    return FileEnrollmentKey(dev_keys.folder / DEV_KEY_NAME)


@pytest.fixture(scope="session")
def trust(enrollment_key) -> Trust:
    """The pins of the suite's releases: the session's enrollment key, the default console host."""
    return Trust((enrollment_key.pin,), ("console.example.com",))


@pytest.fixture(scope="session")
def test_payload() -> Path:
    """payload/build with windows/agent.exe: the mingw-built TEST agent (payload/README.md)."""
    subprocess.run(["make", "-s", "payload-test"], cwd=REPO, check=True)
    root = REPO / "payload" / "build"
    assert (root / "windows" / "agent.exe").is_file()
    return root


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "wine_template" in getattr(item, "fixturenames", ()):
            item.add_marker(winesupport.needs_x86_64)


@pytest.fixture(scope="session")
def wine_template(tmp_path_factory) -> winesupport.WinePrefix:
    prefix = winesupport.make_template(tmp_path_factory.mktemp("wine-template") / "prefix")
    yield prefix
    prefix.kill()


@pytest.fixture
def wine(wine_template, tmp_path) -> winesupport.WinePrefix:
    """A fresh Windows machine (a copy of the booted template prefix) for one test."""
    prefix = winesupport.copy_prefix(wine_template, tmp_path / "prefix")
    yield prefix
    prefix.kill()

import io
import os

import pytest

from builder.enrollment import Enrollment, Secret, read_token, validate_console_url, validate_id
from builder.errors import EnrollmentError, UsageError

HOSTILE_URL = "https://console.example.com/e?a=1&b='x'$y;z(!)*%20&c=$INSTDIR"


def make(**kw):
    base = dict(account_id="acct-1", group_id="grp-1", token=Secret("tok.en-_+/=~"), console_url="https://c.example.com")
    base.update(kw)
    return Enrollment(**base)


def test_secret_is_masked_everywhere():
    s = Secret("super-secret-value-123")
    assert "super" not in repr(s) and "super" not in str(s) and "super" not in s.masked()
    assert "super" not in repr(make(token=s))
    assert s.fingerprint().startswith("sha256:") and len(s.fingerprint()) == 23


def test_secret_refuses_pickling():
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Secret("abcd"))


def test_hostile_but_legal_values_round_trip_through_json():
    e = make(account_id="a:b@c.d-e_f", console_url=HOSTILE_URL, token=Secret("A" * 4096))
    back = Enrollment.from_json_bytes(e.to_json_bytes(), "test")
    assert back == e


@pytest.mark.parametrize("bad", ["", "-lead", "grüppe", "a b", 'a"b', "a/b", "a\\b", "a$b", "x" * 129, "<x>", "a\nb"])
def test_bad_ids_are_refused_with_the_field_name(bad):
    with pytest.raises(EnrollmentError) as info:
        validate_id("group_id", bad)
    assert info.value.field == "group_id" and str(info.value).startswith("group_id ")


@pytest.mark.parametrize("bad", ["http://c.example.com", "https://", "https://c.example.com/a b", 'https://c/"', "https://c/[x]", "https://c/ü", "ftp://c"])
def test_bad_urls_are_refused(bad):
    with pytest.raises(EnrollmentError) as info:
        validate_console_url(bad)
    assert info.value.field == "console_url" and str(info.value).startswith("console_url ")


@pytest.mark.parametrize("bad", ["", "a b", "tok'en", 'to"k', "tok$en", "x" * 4097, "tök"])
def test_bad_tokens_are_refused_without_echoing_them(bad):
    with pytest.raises(EnrollmentError) as info:
        make(token=Secret(bad))
    if bad:
        assert bad not in str(info.value)


def test_token_sources(tmp_path, monkeypatch):
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert read_token(str(f), None).reveal() == "from-file"
    assert read_token(None, "TOK", {"TOK": "from-env"}).reveal() == "from-env"
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert read_token("-", None).reveal() == "from-stdin"
    with pytest.raises(UsageError):
        read_token(None, None)
    with pytest.raises(UsageError):
        read_token(str(f), "TOK")
    with pytest.raises(UsageError, match="NOPE"):
        read_token(None, "NOPE", {})
    with pytest.raises(UsageError, match="--token-file"):
        read_token(str(tmp_path / "missing"), None)


def test_a_token_file_that_must_be_regular_refuses_links_and_fifos_as_it_opens_them(tmp_path):
    real = tmp_path / "token"
    real.write_text("tok-0123456789abcdef\n")
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "fifo")  # would block a plain open() until a writer came
    assert read_token(str(real), None, regular_only=True).reveal() == "tok-0123456789abcdef"
    for name in ("link", "fifo"):
        with pytest.raises(UsageError, match="is a link or not a regular file"):
            read_token(str(tmp_path / name), None, regular_only=True)
    assert read_token(str(tmp_path / "link"), None).reveal() == "tok-0123456789abcdef"  # --token-file follows links

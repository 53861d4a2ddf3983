"""Signed download links (builder.storage.links), as the service's download route checks them:
only a link this key signed, for this key and expiry, is OK; hostile input is INVALID, never an
exception."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs, urlsplit

import pytest

from builder.storage.links import LinkStatus, check_link, sign_link

ROUTE = "/v1/download"


def test_a_signed_link_is_ok_until_it_expires_and_for_nothing_else():
    key = secrets.token_bytes(32)
    now = 1_800_000_000
    link = sign_link(key, "0" * 32, now + 60, route=ROUTE)
    parts = urlsplit(link)
    assert parts.path == f"{ROUTE}/{'0' * 32}"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert check_link(key, "0" * 32, q["exp"], q["sig"], now) is LinkStatus.OK
    assert check_link(key, "0" * 32, q["exp"], q["sig"], now + 60) is LinkStatus.EXPIRED
    assert LinkStatus.EXPIRED.http_status == 410 and LinkStatus.INVALID.http_status == 403
    flipped = ("0" if q["sig"][0] != "0" else "1") + q["sig"][1:]
    assert check_link(key, "0" * 32, q["exp"], flipped, now) is LinkStatus.INVALID
    assert check_link(key, "0" * 32, str(now + 3600), q["sig"], now) is LinkStatus.INVALID  # later expiry
    assert check_link(key, "1" * 32, q["exp"], q["sig"], now) is LinkStatus.INVALID
    for exp, sig in ((q["exp"], ""), ("", q["sig"]), ("-1", q["sig"]), (q["exp"], q["sig"].upper()),
                     (q["exp"] + "x", q["sig"]), (None, None)):
        assert check_link(key, "0" * 32, exp, sig, now) is LinkStatus.INVALID
    assert check_link(key, "../" + "0" * 32, q["exp"], q["sig"], now) is LinkStatus.INVALID
    assert check_link(secrets.token_bytes(32), "0" * 32, q["exp"], q["sig"], now) is LinkStatus.INVALID


def test_a_link_is_signed_only_for_a_valid_key_and_expiry():
    with pytest.raises(ValueError):
        sign_link(b"k" * 32, "../x", 1_800_000_000, route=ROUTE)
    with pytest.raises(ValueError):
        sign_link(b"k" * 32, "x", 0, route=ROUTE)

"""Signed enrollments and trust files for the agents' tests, made from the contract in
payload/README.md with `cryptography` directly, not with builder's code: the agents are tested
against an independent producer, and builder's own signer is tested against the agents."""

from __future__ import annotations

import base64
import hashlib
import json
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(key) -> dict:
    """The public JWK of `key` (private or public), with its RFC 7638 thumbprint as kid."""
    pub = key.public_key() if hasattr(key, "public_key") else key
    nums = pub.public_numbers()
    x, y = b64(nums.x.to_bytes(32, "big")), b64(nums.y.to_bytes(32, "big"))
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True)
    return {"crv": "P-256", "kid": b64(hashlib.sha256(canonical.encode()).digest()), "kty": "EC", "x": x, "y": y}


def kid(key) -> str:
    return jwk(key)["kid"]


def trust_json(keys, hosts) -> bytes:
    return json.dumps({"console_hosts": list(hosts), "keys": [jwk(k) for k in keys], "version": 1}).encode()


def sign_parts(key, header: dict, payload: dict) -> str:
    """An SE from explicit header and payload objects (for malformed-but-signed cases)."""
    signing_input = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        b64(json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode())
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def sign(key, *, account_id: str = "acct-1", group_id: str = "grp-1",
         console_url: str = "https://console.example.com", token: str = "tok-0123456789abcdef",
         issued_at: int | None = None, expires_at: int | None = None, key_id: str | None = None,
         extra: dict | None = None) -> str:
    """A signed enrollment as the console's builder makes it (payload keys sorted, compact)."""
    k = kid(key) if key_id is None else key_id
    payload = {"account_id": account_id, "group_id": group_id, "console_url": console_url,
               "enrollment_token": token, "key_id": k,
               "issued_at": int(time.time()) if issued_at is None else issued_at}
    if expires_at is not None:
        payload["expires_at"] = expires_at
    payload.update(extra or {})
    return sign_parts(key, {"alg": "ES256", "kid": k, "typ": "enrollment+jws"}, payload)


def tamper(se: str, part: int, index: int = 5) -> str:
    """`se` with one character of part `part` (0 header, 1 payload, 2 signature) changed."""
    parts = se.split(".")
    chars = list(parts[part])
    chars[index] = "A" if chars[index] != "A" else "B"
    parts[part] = "".join(chars)
    return ".".join(parts)

"""Notarization as the formats see it: submit a signed pkg or dmg when credentials are given (else
say once why not), and the `notarized` fields of a verify report. builder.signing.notary does the
talking to Apple and the stapling."""

from __future__ import annotations

from pathlib import Path

from builder import log
from builder.signing import notary
from builder.signing.apple.native import ap

NO_CREDENTIALS = "no App Store Connect credentials"
_warned: set[str] = set()


def stapled_ticket(path: Path) -> bool:
    """Whether a notarization ticket is stapled to `path`: read where Apple's stapler writes it
    (builder.binfmt.ticket), or, as a second opinion, anywhere apple-platform's reader sees one."""
    if notary.stapled_ticket(path) is not None:
        return True
    if ap is None:
        return False
    try:
        found = ap.read_signature(str(path))
    except Exception:  # noqa: BLE001 - the library's own errors: nothing it can read, no ticket
        return False

    def walk(node) -> bool:
        if isinstance(node, dict):
            return any("ticket" in str(k).lower() or walk(v) for k, v in node.items())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return isinstance(node, str) and node.lower() in ("ticket", "notarizationticket")

    return walk(found)


def notarization_report(path: Path) -> dict:
    """The `notarized` fields of a verify report."""
    ticket = notary.stapled_ticket(path)
    if ticket is not None:
        return {"notarized": True, "ticket_bytes": len(ticket),
                "notarization": f"a notarization ticket is stapled ({len(ticket)} bytes; Apple's signature "
                                "on it is checked by Gatekeeper, not here)"}
    if stapled_ticket(path):
        return {"notarized": True, "notarization": "a notarization ticket is stapled"}
    return {"notarized": False, "notarization": "no stapled ticket; Gatekeeper checks online or warns"}


def notarize(path: Path, notary_settings, *, staple: bool = True):
    """Submit `path` (a signed pkg or dmg) to Apple's notary service, wait, and staple the ticket
    to `path` in place. `notary_settings` is a builder.signing.notary.Notary, or None: then a
    "not notarized" result and one warning per process. Any failure with credentials (network,
    bad key, rejection) is NotarizationError, exit 13."""
    path = Path(path)
    if notary_settings is None:
        if NO_CREDENTIALS not in _warned:
            _warned.add(NO_CREDENTIALS)
            log.warning(f"not notarized: {NO_CREDENTIALS} (Gatekeeper will warn on first open)")
        return notary.NotaryResult(notarized=False, reason=NO_CREDENTIALS)
    return notary.notarize(path, notary_settings, staple_ticket=staple)

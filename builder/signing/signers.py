"""What signs a run's output: the key types and the one object that carries them.

They live with the signing code: formats, release, stamp, the CLI and the service name them
without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from builder.signing.authenticode import SigningKey


@dataclass(frozen=True, kw_only=True)
class AppleKey:
    """A PKCS#12 holding a Developer ID identity, with its password (never from argv)."""

    pkcs12: Path
    password: "object"  # builder.enrollment.Secret


@dataclass(frozen=True, kw_only=True)
class Signers:
    """How to sign each platform's output. `unsigned` only with an explicit --no-sign."""

    authenticode: SigningKey | None = None
    apple_application: AppleKey | None = None
    apple_installer: AppleKey | None = None
    notary: object | None = None
    unsigned: bool = False
    # Trusted root for verifying what was just signed (a development CA in tests and demo).
    verify_ca: Path | None = None

    def for_product(self, name: str) -> "Signers":
        """These keys signing a product called `name` (the Authenticode description Windows shows
        in its prompts): a stamp signs with its release's product, not the service's default."""
        if self.authenticode is None or self.authenticode.description == name:
            return self
        return replace(self, authenticode=replace(self.authenticode, description=name))

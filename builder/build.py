"""`builder build`: every requested format, in parallel, into the output folder, or nothing.

Each format works in a private temporary folder (rendered sources carry the token, so they
are 0600 and deleted afterwards). A finished installer is verified, then renamed into the
output folder; if any format fails, the installers this run already placed are removed again,
so the output folder never holds a half-written, unsigned or partial set.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from builder import formats, log
from builder.config import Product
from builder.fileio import atomic_output, sha256_file, write_atomic
from builder.trust import SignedEnrollment, Trust
from builder.errors import BuilderError, OutputError, PayloadError, UsageError, VerificationError
from builder.formats.base import BuildRequest, refuse_symlinks
from builder.signing.signers import Signers



@dataclass(frozen=True)
class Output:
    format: str
    path: Path
    size: int
    sha256: str
    signer: str | None
    notarized: bool | None
    seconds: float
    details: dict

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "signer": self.signer,
            "notarized": self.notarized,
            "seconds": round(self.seconds, 3),
            **({"details": self.details} if self.details else {}),
        }


def check_payload(payload: Path, platform: str, product: Product) -> None:
    folder = payload / platform
    if not payload.is_dir():
        raise PayloadError(f"--payload {payload}: no such folder", "run `make payload` or give the agent's folder")
    if folder.is_dir() or folder.is_symlink():
        refuse_symlinks(folder)
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise PayloadError(f"--payload {payload}: {platform}/ is missing or empty", f"put the {platform} agent in {folder}")
    if platform == "windows":
        exe = folder / product.agent_exe
        if not exe.is_file() or exe.stat().st_size == 0:
            raise PayloadError(f"--payload {payload}: {platform}/{product.agent_exe} is missing or empty", "build the Windows agent (make payload)")


# How to ask for each identity a format signs with (the format names them: `signed_with`).
_IDENTITIES = {
    "authenticode": ("an Authenticode signing key", "--sign-cert with --sign-key, --sign-pkcs12 or --sign-pkcs11"),
    "apple_application": ("a Developer ID Application identity", "--mac-sign-pkcs12 with a 'Developer ID Application' .p12"),
    "apple_installer": ("a Developer ID Installer identity", "--mac-sign-pkcs12 with a 'Developer ID Installer' .p12"),
}


def check_identities(chosen: list, signers: Signers) -> None:
    """UsageError naming the first format whose signing identity is missing, before any format
    runs: a missing Mac identity does not surface after the Windows installers were built."""
    if signers.unsigned:
        return
    for fmt in chosen:
        for attr in fmt.signed_with:
            if getattr(signers, attr) is None:
                what, fix = _IDENTITIES[attr]
                raise UsageError(f"the {fmt.name} needs {what}", f"give {fix}, or --no-sign")


def build(
    *,
    format_names: list[str],
    product: Product,
    version: str,
    payload: Path,
    enrollment: SignedEnrollment | None,
    trust: Trust,
    signers: Signers,
    out: Path,
    source_date_epoch: int,
    basename: str | None = None,
) -> list[Output]:
    """Build `format_names` into `out`. Returns the outputs; raises BuilderError leaving `out` as it was."""
    chosen = [formats.get(n) for n in dict.fromkeys(format_names)]
    for fmt in chosen:
        check_payload(payload, fmt.platform, product)
    check_identities(chosen, signers)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{{field}} {out}: cannot create it ({exc.strerror})", "choose a writable folder", field="out") from None
    if enrollment is not None:
        log.register_secret(enrollment.token.reveal())
    stem = basename or default_basename(product, version, enrollment)
    targets = {fmt.name: out / f"{stem}{fmt.suffix}" for fmt in chosen}

    placed: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="builder-") as tmp:
        def one(fmt) -> Output:
            work = Path(tmp) / fmt.name
            work.mkdir(mode=0o700)
            request = BuildRequest(
                product=product, version=version, payload=payload, enrollment=enrollment, trust=trust,
                work=work, source_date_epoch=source_date_epoch, signers=signers,
            )
            start = time.perf_counter()
            with log.step(f"{fmt.name}: build and sign"):
                built = fmt.build(request)
            details = dict(built.details)
            if not signers.unsigned:
                with log.step(f"{fmt.name}: verify"):  # a ✗ when it does not verify, never a ✓ before the error
                    report = fmt.verify(built.path, signers.verify_ca)
                    if not report.get("ok"):
                        raise VerificationError(f"{fmt.name}: the signed installer does not verify: "
                                                f"{report.get('detail', 'see builder verify')}",
                                                "check the signing certificate chain (--ca)")
                details["timestamp"] = (report.get("signature") or {}).get("timestamp")
            return Output(fmt.name, built.path, built.path.stat().st_size, sha256_file(built.path),
                          built.signer, built.notarized, time.perf_counter() - start, details)

        # Formats spend their time in external tools, so threads run them side by side.
        with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
            futures = [pool.submit(one, fmt) for fmt in chosen]
            results, first_error = [], None
            for fut in futures:
                try:
                    results.append(fut.result())
                except BuilderError as exc:
                    first_error = first_error or exc
        if first_error:
            raise first_error
        try:
            outputs = []
            for res in results:
                target = targets[res.format]
                with open(res.path, "rb") as src, atomic_output(target) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                placed.append(target)
                outputs.append(Output(res.format, target, res.size, res.sha256, res.signer, res.notarized, res.seconds, res.details))
            write_summary(out / f"{stem}.summary.json", outputs, enrollment, version)
        except OSError as exc:
            for p in placed:
                p.unlink(missing_ok=True)
            raise OutputError(f"{{field}} {out}: cannot write the installers ({exc.strerror})", "check free space and permissions", field="out") from None
    return outputs


def default_basename(product: Product, version: str, enrollment: SignedEnrollment | None) -> str:
    base = product.service_name + "-" + version
    if enrollment is None:
        return base
    # Ids may hold unicode letters: keep file names ASCII and unambiguous.
    safe = lambda s: "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "_" for c in s)  # noqa: E731
    return f"{base}-{safe(enrollment.account_id)}-{safe(enrollment.group_id)}"


def write_summary(path: Path, outputs: list[Output], enrollment: SignedEnrollment | None, version: str) -> None:
    doc = summary_doc(outputs, enrollment, version)
    write_atomic(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def summary_doc(outputs: list[Output], enrollment: SignedEnrollment | None, version: str) -> dict:
    return {
        "version": version,
        "enrollment": enrollment.public() if enrollment else None,
        "installers": [o.as_dict() for o in outputs],
    }

"""The `builder` command line: parse, call the library, print. No format logic lives here."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click
from rich.markup import escape

from builder import __version__, formats, log
from builder.config import (
    ENROLLMENT_KEY_PASSWORD_ENV,
    MAC_SIGN_PASSWORD_ENV,
    SIGN_PASSWORD_ENV,
    Environment,
    load_product,
    parse_set_options,
    validate_version,
)
from builder.enrollment import Enrollment, Secret, read_token
from builder.errors import BuilderError, ToolMissingError, UsageError
from builder.signing.signers import AppleKey, Signers
from builder.signing.authenticode import OfflineTSA, SigningKey
from builder.tools import runner


# The library names the input an error concerns (BuilderError.field); the command line says
# which of its options gave it.
OPTION_OF_FIELD = {"account_id": "--account-id", "group_id": "--group-id", "console_url": "--console-url",
                   "release": "--release", "format": "--format", "out": "--out"}


def cli_words(exc: BuilderError) -> str:
    message = exc.worded(lambda name: OPTION_OF_FIELD.get(name, name))
    return f"{message}: {exc.hint}" if exc.hint else message


def fail(exc: BuilderError):
    """One line on stderr, and the error's exit code."""
    log.console.print(f"[bold red]error:[/] {escape(log.redact(cli_words(exc)))}", soft_wrap=True)
    sys.exit(exc.exit_code)


def handle_errors(fn):
    """Turn a BuilderError into one line on stderr and its exit code; anything else is a bug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BuilderError as exc:
            fail(exc)

    return wrapper


def emit_json(doc) -> None:
    click.echo(log.redact(json.dumps(doc, indent=2, ensure_ascii=False)))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="builder")
@click.option("-v", "--verbose", is_flag=True, help="Debug log: every tool command line (secrets redacted) and its output.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the result.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Build, sign, stamp and verify remote-support agent installers."""
    log.setup(verbose=verbose, quiet=quiet)
    try:
        ctx.obj = Environment.read()  # the one read of the environment (builder.config)
    except BuilderError as exc:
        fail(exc)
    for secret in (ctx.obj.sign_password, ctx.obj.mac_sign_password, ctx.obj.enrollment_key_password):
        if secret is not None and secret.reveal():
            log.register_secret(secret.reveal(), permanent=True)


def environment() -> Environment:
    """The environment `main` read for this command."""
    return click.get_current_context().find_root().obj


def open_store_at(storage_url: str):
    """The store at `storage_url`, with the storage credentials of the environment."""
    from builder.storage import StorageSettings, open_store

    return open_store(storage_url, StorageSettings.from_env(environment().storage))


# --- shared option groups ---------------------------------------------------------------

def product_options(fn):
    fn = click.option("--config", "config_file", type=click.Path(path_type=Path), help="Product identity file (TOML) over the embedded defaults.")(fn)
    fn = click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE", help="Override one product identity value.")(fn)
    return fn


def identity_option(fn):
    return click.option("--allow-example-identity", is_flag=True,
                        help="Sign installers that still carry the example product identity or console hosts "
                             "(only for trying builder out with your own keys).")(fn)


DEVELOPMENT_MARK = "DEVELOPMENT"  # in the subject of every certificate `builder dev-keys` makes


def development_signers(signers: Signers) -> bool:
    """Whether every identity that signs is one `builder dev-keys` made (tests, demos)."""
    from builder.signing import authenticode

    subjects = []
    if signers.authenticode is not None:
        subjects.append(authenticode.signer_subject(signers.authenticode) or "")
    if signers.apple_application is not None or signers.apple_installer is not None:
        from builder.signing import apple

        # The whole subject: Apple's CN names the team only; `dev-keys` marks its O.
        subjects += [apple.open_identity(k).certificate.subject.rfc4514_string()
                     for k in (signers.apple_application, signers.apple_installer) if k]
    return bool(subjects) and all(DEVELOPMENT_MARK in s for s in subjects)


def guard_example_identity(product, signers: Signers, trust, allow: bool) -> None:
    """ConfigError when real keys would sign the example product identity or console hosts."""
    from builder.config import example_fields, is_example_host

    signing = signers.authenticode or signers.apple_application or signers.apple_installer
    if allow or not signing or development_signers(signers):
        return  # no key at all is the formats' own error, before any tool runs
    found = [", ".join(example_fields(product))]
    hosts = [h for h in trust.console_hosts if is_example_host(h)]
    if hosts:
        found.append("console hosts " + ", ".join(hosts))
    found = [f for f in found if f]
    if found:
        from builder.errors import ConfigError

        raise ConfigError(f"your signing keys would ship the example product identity ({'; '.join(found)})",
                          "give --config with your product identity and --console-host with your console, "
                          "or --allow-example-identity to try builder out")


def enrollment_options(fn=None, *, ids_required: bool = True):
    if fn is None:  # @enrollment_options(ids_required=False): the command checks them itself
        return functools.partial(enrollment_options, ids_required=ids_required)
    for opt in reversed(
        [
            click.option("--account-id", required=ids_required, help="The console account id."),
            click.option("--group-id", required=ids_required, help="The device group the agent joins."),
            click.option("--token-file", help="File holding the enrollment token, or - for stdin."),
            click.option("--token-env", metavar="NAME", help="Environment variable holding the enrollment token."),
            click.option("--console-url", help="Console URL (default: product.console_url)."),
        ]
    ):
        fn = opt(fn)
    return fn


def enrollment_key_options(fn):
    for opt in reversed(
        [
            click.option("--enrollment-key", type=click.Path(path_type=Path),
                         help=f"EC P-256 private key (PEM) that signs enrollments; password from ${ENROLLMENT_KEY_PASSWORD_ENV}."),
            click.option("--enrollment-key-pkcs11", metavar="URI",
                         help=f"PKCS#11 URI of an HSM enrollment key; PIN from ${ENROLLMENT_KEY_PASSWORD_ENV}."),
            click.option("--expires-in", type=click.IntRange(min=60), metavar="SECONDS",
                         help="The enrollment expires this long after it is signed (default: never)."),
        ]
    ):
        fn = opt(fn)
    return fn


def pin_options(fn):
    for opt in reversed(
        [
            click.option("--console-host", "console_hosts", multiple=True, metavar="HOST",
                         help="Console host the agents may talk to: host, *.domain, either with :port (repeatable; default: product.console_hosts)."),
            click.option("--enrollment-public-key", "public_keys", multiple=True, type=click.Path(path_type=Path),
                         help="Also pin this enrollment public key (PEM; repeatable, for key rotation)."),
        ]
    ):
        fn = opt(fn)
    return fn


def resolve_enrollment_key(enrollment_key, enrollment_key_pkcs11, pkcs11_module=None, *, required: bool):
    """The enrollment signing key from the options (None when not given and not required)."""
    from builder.signing import enrollment_key as ek

    if enrollment_key and enrollment_key_pkcs11:
        raise UsageError("give one of --enrollment-key and --enrollment-key-pkcs11", "not both")
    password = environment().enrollment_key_password
    if enrollment_key:
        return ek.FileEnrollmentKey(enrollment_key, password)
    if enrollment_key_pkcs11:
        extra = {"module": pkcs11_module} if pkcs11_module else {}
        return ek.Pkcs11EnrollmentKey(enrollment_key_pkcs11, password, **extra)
    if required:
        raise UsageError("enrollments are signed: give --enrollment-key PEM or --enrollment-key-pkcs11 URI",
                         "`builder dev-keys DIR` makes a DEVELOPMENT enrollment key")
    return None


def resolve_trust(product, console_hosts, public_keys, key):
    """The pins a release or build puts in its installers: --enrollment-public-key keys and the
    signing key's own, and --console-host (else product.console_hosts)."""
    from builder.signing.enrollment_key import load_public_key
    from builder.trust import Trust

    pins = [load_public_key(p) for p in public_keys] + ([key.pin] if key is not None else [])
    return Trust(tuple(pins), tuple(console_hosts or product.console_hosts))


def sign_enrollment(key, enrollment, trust, expires_in):
    """`enrollment` signed with `key` for agents pinned to `trust`. Its issue time is
    SOURCE_DATE_EPOCH when set (reproducible output), else now; an expiry counts from now."""
    issued = environment().epoch()
    expires = int(time.time()) + expires_in if expires_in else None
    signed = key.sign(enrollment, trust, issued_at=min(issued, expires - 1) if expires else issued, expires_at=expires)
    log.register_secret(signed.jws.reveal(), permanent=True)
    return signed


def signing_options(fn):
    for opt in reversed(
        [
            click.option("--sign-cert", type=click.Path(path_type=Path), help="Code-signing certificate chain (PEM)."),
            click.option("--sign-key", type=click.Path(path_type=Path), help="Its private key (PEM)."),
            click.option("--sign-pkcs12", type=click.Path(path_type=Path), help=f"PKCS#12 with key and chain; password from ${SIGN_PASSWORD_ENV}."),
            click.option("--sign-pkcs11", metavar="URI", help=f"PKCS#11 URI of an HSM key (with --sign-cert); PIN from ${SIGN_PASSWORD_ENV}."),
            click.option("--pkcs11-module", default=None, help="PKCS#11 module (default: SoftHSM's)."),
            click.option("--timestamp-url", help="RFC 3161 timestamp server."),
            click.option("--test-tsa", "test_tsa", type=click.Path(path_type=Path), help="Development key folder whose test TSA timestamps offline (tests only).", hidden=True),
            click.option("--mac-sign-pkcs12", type=click.Path(path_type=Path), multiple=True, help=f"Developer ID Application/Installer PKCS#12 (repeatable); password from ${MAC_SIGN_PASSWORD_ENV}."),
            click.option("--notarize-key", type=click.Path(path_type=Path),
                         help="App Store Connect API key JSON (issuer_id, key_id, private_key) to notarize pkg and dmg; "
                              "or $BUILDER_NOTARY_ISSUER, $BUILDER_NOTARY_KEY_ID, $BUILDER_NOTARY_KEY."),
            click.option("--notary-url", hidden=True,
                         help="Base URL of a stand-in for Apple's notary service and ticket lookup (tests only)."),
            click.option("--no-sign", is_flag=True, help="Build unsigned installers (development only)."),
            click.option("--ca", type=click.Path(path_type=Path), help="Trusted root for verifying what was signed (default: system roots)."),
        ]
    ):
        fn = opt(fn)
    return fn


def resolve_notary(notarize_key, notary_url, env: Environment):
    """The notarization key and service: --notarize-key FILE over the BUILDER_NOTARY_* variables;
    None when neither is given (pkg and dmg are then "not notarized")."""
    from builder.signing import notary

    credentials = (notary.credentials_from_file(notarize_key) if notarize_key
                   else notary.credentials_from_env(env.notary))
    if credentials is None:
        if notary_url:
            raise UsageError("--notary-url needs a notarization key", "give --notarize-key FILE")
        return None
    service = notary.NotaryService.local(notary_url) if notary_url else notary.NotaryService()
    return notary.Notary(credentials=credentials, service=service)


def resolve_signers(*, sign_cert, sign_key, sign_pkcs12, sign_pkcs11, pkcs11_module, timestamp_url, test_tsa,
                    mac_sign_pkcs12, no_sign, ca, product, notarize_key=None, notary_url=None,
                    env: Environment | None = None) -> Signers:
    # Called with the signing options as click parsed them (`**signing` in each command).
    """All signing options resolved once, into one frozen object."""
    any_key = any([sign_cert, sign_key, sign_pkcs12, sign_pkcs11, mac_sign_pkcs12, notarize_key])
    if no_sign:
        if any_key:
            raise UsageError("--no-sign was given together with signing options", "drop one of them")
        log.warning("UNSIGNED build (--no-sign): Windows SmartScreen and macOS Gatekeeper will warn or refuse. Development only.")
        return Signers(unsigned=True)
    env = env or environment()
    password = env.sign_password
    authenticode = None
    if sign_cert or sign_key or sign_pkcs12 or sign_pkcs11:
        if sign_pkcs12 and password is None:
            raise UsageError(f"--sign-pkcs12 needs its password in ${SIGN_PASSWORD_ENV}", "export it (an empty value for none)")
        tsa = None
        if test_tsa:
            tsa = OfflineTSA(certs=test_tsa / "tsa.pem", key=test_tsa / "tsa.key", time=env.epoch())
        extra = {"pkcs11_module": pkcs11_module} if pkcs11_module else {}
        if timestamp_url:
            check_timestamp_server(timestamp_url)
        elif tsa is None:
            log.warning("no --timestamp-url: the Authenticode signatures stop being trusted when the signing "
                        "certificate expires; give your CA's RFC 3161 timestamp server")
        authenticode = SigningKey(
            cert=sign_cert, key=sign_key, pkcs12=sign_pkcs12, pkcs11_uri=sign_pkcs11, password=password,
            timestamp_url=timestamp_url, test_tsa=tsa, description=product.name, **extra,
        )
        from builder.signing.authenticode import check_key_matches

        check_key_matches(authenticode)  # a wrong password or a foreign key named before any tool runs
    apple_app = apple_installer = None
    if mac_sign_pkcs12:
        mac_password = env.mac_sign_password
        if mac_password is None:
            raise UsageError(f"--mac-sign-pkcs12 needs its password in ${MAC_SIGN_PASSWORD_ENV}", "export it (an empty value for none)")
        from builder.signing import apple

        apple_app, apple_installer = apple.classify_identities([AppleKey(pkcs12=p, password=mac_password) for p in mac_sign_pkcs12])
    notary = resolve_notary(notarize_key, notary_url, env)
    return Signers(authenticode=authenticode, apple_application=apple_app, apple_installer=apple_installer,
                   notary=notary, verify_ca=ca)


def check_timestamp_server(url: str, timeout: float = 10.0) -> None:
    """A TCP connection to the timestamp server before anything is built: osslsigncode reports an
    unreachable one only as `Unable to set unauthenticated attributes`, after the build."""
    import socket
    from urllib.parse import urlsplit

    from builder.errors import SigningError

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--timestamp-url {url!r} is not an http(s) URL", "for example http://timestamp.digicert.com")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise SigningError(f"--timestamp-url {url}: the timestamp server does not answer "
                           f"({exc.strerror or exc.__class__.__name__})",
                           "check the URL and the network, or leave it out (the signatures then die with the certificate)") from None


def _read_token(token_file: str | None, token_env: str | None) -> Secret:
    """The token of --token-file or --token-env. A variable it came from is taken out of this
    process's environment, so that no tool, helper or child process started later inherits it."""
    token = read_token(token_file, token_env)
    if token_env is not None:
        runner.withhold_env(token_env)
    return token


def _enrollment(account_id: str, group_id: str, token: Secret, console_url: str) -> Enrollment:
    """The enrollment of the command line, validated; only then is its token registered for
    redaction (a word given as a token must not be masked in every message)."""
    enrollment = Enrollment(account_id=account_id, group_id=group_id, token=token, console_url=console_url)
    log.register_secret(token.reveal(), permanent=True)
    return enrollment


# --- commands -----------------------------------------------------------------------------

@main.command()
@click.option("--format", "format_names", multiple=True, required=True, type=click.Choice(formats.NAMES), help="Installer format (repeatable).")
@click.option("--version", "version", required=True, help="Agent version, MAJOR.MINOR.BUILD.")
@enrollment_options
@enrollment_key_options
@pin_options
@click.option("--payload", type=click.Path(path_type=Path), default=Path("payload/build"), show_default=True, help="Agent payload: windows/ and macos/ sub-folders.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@signing_options
@product_options
@identity_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@handle_errors
def build(format_names, version, account_id, group_id, token_file, token_env, console_url, enrollment_key,
          enrollment_key_pkcs11, expires_in, console_hosts, public_keys, payload, out, config_file, set_items, as_json,
          allow_example_identity, **signing):
    """Build signed installers with one group's signed enrollment stamped in."""
    from builder import build as build_mod

    product = load_product(config_file, parse_set_options(set_items))
    validate_version(version)
    token = _read_token(token_file, token_env)
    enrollment = _enrollment(account_id, group_id, token, console_url or product.console_url)
    key = resolve_enrollment_key(enrollment_key, enrollment_key_pkcs11, signing["pkcs11_module"], required=True)
    trust = resolve_trust(product, console_hosts, public_keys, key)
    signed = sign_enrollment(key, enrollment, trust, expires_in)
    signers = resolve_signers(product=product, **signing)
    guard_example_identity(product, signers, trust, allow_example_identity)
    outputs = build_mod.build(format_names=list(format_names), product=product, version=version, payload=payload,
                              enrollment=signed, trust=trust, signers=signers, out=out, source_date_epoch=environment().epoch())
    doc = build_mod.summary_doc(outputs, signed, version)
    if as_json:
        emit_json(doc)
    else:
        log.summary_table(
            f"Installers for group {signed.group_id} of account {signed.account_id}, console {signed.console_url}, "
            f"enrollment key {signed.key_id}",
            ["format", "file", "size", "sha256", "signer", "notarization"],
            [[o.format, str(o.path), f"{o.size:,}", o.sha256[:16] + "…", o.signer or "UNSIGNED",
              _notarization_cell(o.details.get("notarization"))] for o in outputs],
        )


def _notarization_cell(notarization) -> str:
    if not notarization:
        return "-"
    if notarization.get("notarized"):
        return (f"{notarization.get('status')}{', stapled' if notarization.get('stapled') else ''} "
                f"({notarization.get('submission_id')})")
    return "not notarized"  # the reason is in --json and in the warning above the table


def _report(path: Path, ca: Path | None, check: bool) -> dict:
    if not path.is_file():
        raise UsageError(f"{path}: no such file", "check the path")
    fmt = formats.for_file(path)
    return fmt.verify(path, ca) if check else fmt.inspect(path)


# What `kind` means to an admin reading verify's report (the MSI's two kinds look alike otherwise).
_KINDS = {"msi": " (the enrollment is the ENROLLMENT property's default: GPO, Intune)",
          "msi-tagged": " (the enrollment is in a slot of its signature, read at install time)"}


def _print_report(path: Path, doc: dict) -> None:
    """One file's report, on stdout (the result of verify and inspect)."""
    sig = doc.get("signature") or {}
    out = log.result
    out(f"{path}")
    for key in ("format", "kind", "version", "product"):
        if doc.get(key):
            out(f"  {key}: {doc[key]}" + _KINDS.get(doc[key], "") * (key == "kind"))
    if sig:
        status = "ok" if sig.get("ok") else f"FAILED ({sig.get('detail')})"
        out(f"  signature: {status}; signer: {sig.get('signer') or '-'}; timestamp: {sig.get('timestamp') or 'none'}")
    if "notarized" in doc:
        out(f"  notarized: {'yes' if doc['notarized'] else 'no'} ({doc.get('notarization', '')})")
    enr = doc.get("enrollment")
    if enr:
        state = enr.get("state", "?")
        detail = f"signed by pinned key {enr.get('key_id')}" if state == "valid" else enr.get("reason", "")
        out(f"  enrollment: {state}" + (f" ({detail})" if detail else ""))
        for key, value in enr.items():
            if key not in ("state", "reason", "key_id") and value is not None:
                out(f"    {key}: {value}")
    else:
        out("  enrollment: none stamped")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--ca", type=click.Path(path_type=Path), help="Trusted root (default: system roots).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def verify(files, ca, as_json):
    """Check signatures and show the enrollment stamped in installers (token masked)."""
    docs = [{"file": str(f), **_report(f, ca, check=True)} for f in files]
    if as_json:
        emit_json(docs)  # always an array: a script reads one shape for one file or many
    else:
        for f, d in zip(files, docs):
            _print_report(f, d)
    bad = [d for d in docs if not d.get("ok")]
    if bad:
        from builder.errors import VerificationError

        raise VerificationError("; ".join(f"{d['file']}: does not verify ({d.get('detail')})" for d in bad),
                                "rebuild it, or give the right --ca")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def inspect(files, as_json):
    """Show structure and stamped enrollment without checking signatures."""
    docs = [{"file": str(f), **_report(f, None, check=False)} for f in files]
    if as_json:
        emit_json(docs)  # always an array: a script reads one shape for one file or many
    else:
        for f, d in zip(files, docs):
            _print_report(f, d)


@main.command()
@click.option("--storage", "storage_url", help="Also check this store answers (file://, s3://, az://).")
@click.option("--redis", "redis_url", help="Also check this Redis answers (the service's queue).")
@enrollment_key_options
@signing_options
@click.option("--json", "as_json", is_flag=True)
def doctor(storage_url, redis_url, enrollment_key, enrollment_key_pkcs11, expires_in, as_json, **signing):
    """The external tools (present, version, how to install), and, when given, the signing keys,
    the enrollment key, the store and Redis: each opened as a real run would open it."""
    from builder.tools import runner

    tools = []
    for tool in runner.TOOLS.values():
        ver = runner.version(tool)
        tools.append({"tool": tool.command, "purpose": tool.purpose, "version": ver,
                      "install": None if ver else f"apt-get install {tool.package}"})
    checks = _doctor_checks(storage_url, redis_url, enrollment_key, enrollment_key_pkcs11, signing)
    if as_json:
        emit_json({"tools": tools, "checks": checks})
    else:
        log.summary_table("Tools", ["tool", "for", "version", "install"],
                          [[r["tool"], r["purpose"], r["version"] or "MISSING", r["install"] or ""] for r in tools])
        if checks:
            log.summary_table("Checks", ["check", "status", "detail"],
                              [[c["check"], c["status"], c["detail"]] for c in checks])
    if not all(r["version"] for r in tools):
        sys.exit(ToolMissingError.exit_code)
    failed = [c for c in checks if c["status"] != "ok"]
    if failed:
        sys.exit(failed[0]["exit_code"])


def _doctor_checks(storage_url, redis_url, enrollment_key, enrollment_key_pkcs11, signing: dict) -> list[dict]:
    """One row per thing given on the command line: ok, or the error a real run would stop with."""
    checks = []

    def check(name: str, fn) -> None:
        try:
            detail = fn()
        except BuilderError as exc:
            checks.append({"check": name, "status": "FAILED", "detail": log.redact(cli_words(exc)), "exit_code": exc.exit_code})
        else:
            checks.append({"check": name, "status": "ok", "detail": detail, "exit_code": 0})

    if any(signing.get(k) for k in ("sign_cert", "sign_key", "sign_pkcs12", "sign_pkcs11", "mac_sign_pkcs12",
                                    "timestamp_url")):
        def signers_ok() -> str:
            from builder.signing import authenticode

            signers = resolve_signers(product=load_product(), **signing)
            said = []
            if signers.authenticode is not None:
                said.append(f"Authenticode: {authenticode.signer_subject(signers.authenticode)}")
            for kind, key in (("Application", signers.apple_application), ("Installer", signers.apple_installer)):
                if key is not None:
                    from builder.signing import apple

                    said.append(f"Developer ID {kind}: {apple.identity_subject(key)}")
            return "; ".join(said) or "no identity"
        check("signing keys", signers_ok)
    if enrollment_key or enrollment_key_pkcs11:
        check("enrollment key", lambda: "key id " + resolve_enrollment_key(
            enrollment_key, enrollment_key_pkcs11, signing.get("pkcs11_module"), required=True).kid)
    if storage_url:
        def store_ok() -> str:
            from builder.service.setup import RELEASES_PREFIX
            from builder.storage.published import published_versions

            store = open_store_at(storage_url)
            return f"{store.url}: answers, {len(published_versions(store, RELEASES_PREFIX))} release(s) published"
        check("storage", store_ok)
    if redis_url:
        def redis_ok() -> str:
            import redis

            from builder.errors import QueueError

            try:
                redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5).ping()
            except (redis.RedisError, ValueError) as exc:
                raise QueueError(f"--redis {redis_url}: does not answer ({exc.__class__.__name__})",
                                   "start Redis or fix the URL") from None
            return f"{redis_url}: answers"
        check("redis", redis_ok)
    return checks


@main.command("dev-keys")
@click.argument("folder", type=click.Path(path_type=Path))
@handle_errors
def dev_keys(folder):
    """Make a DEVELOPMENT CA and signing keys (PKCS#12 password: 'development')."""
    from builder.signing import devca

    from builder.signing.enrollment_key import create_dev_key

    keys = devca.create(folder)
    create_dev_key(keys.folder)
    log.warning(f"development keys in {keys.folder}: for tests and demos only, never for shipping")


@main.command("enrollment")
@enrollment_options
@enrollment_key_options
@click.option("--release", "release_dir", type=click.Path(path_type=Path),
              help="Check against this release's pins (default: the product's console hosts and this key).")
@product_options
@click.option("--json", "as_json", is_flag=True, help="Also the key id, expiry and a ready msiexec line, as JSON.")
@handle_errors
def enrollment_cmd(account_id, group_id, token_file, token_env, console_url, enrollment_key, enrollment_key_pkcs11,
                   expires_in, release_dir, config_file, set_items, as_json):
    """Print one group's signed enrollment: what `msiexec /i agent.msi ENROLLMENT=...` takes.

    It holds the token: hand it to the admin who deploys, never to a log."""
    from builder.release import Release

    key = resolve_enrollment_key(enrollment_key, enrollment_key_pkcs11, required=True)
    if release_dir:
        rel = Release.open(release_dir, verify=False)
        product, trust = rel.product(), rel.trust()
    else:
        product = load_product(config_file, parse_set_options(set_items))
        trust = resolve_trust(product, (), (), key)
    token = _read_token(token_file, token_env)
    enrollment = _enrollment(account_id, group_id, token, console_url or product.console_url)
    signed = sign_enrollment(key, enrollment, trust, expires_in)
    jws = signed.jws.reveal()
    if as_json:
        # Printed on purpose, without the redactor: the signed enrollment is this command's output.
        click.echo(json.dumps({"enrollment": jws, **{k: v for k, v in signed.public().items() if k != "token"},
                               "msiexec": f"msiexec /i agent.msi ENROLLMENT={jws} /qn"}, indent=2))
    else:
        click.echo(jws)


@main.command("release")
@click.option("--format", "format_names", multiple=True, type=click.Choice(formats.NAMES), help="Formats to build (default: all).")
@click.option("--version", "version", required=True, help="Agent version, MAJOR.MINOR.BUILD.")
@click.option("--payload", type=click.Path(path_type=Path), default=Path("payload/build"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Release folder (base installers + manifest.json).")
@pin_options
@click.option("--enrollment-key", type=click.Path(path_type=Path), help="Pin this private key's public half (PEM).")
@signing_options
@product_options
@identity_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
@handle_errors
def release_cmd(format_names, version, payload, out, console_hosts, public_keys, enrollment_key, config_file, set_items,
                as_json, allow_example_identity, **signing):
    """Build and sign every format once, with an empty enrollment slot, and write the manifest."""
    from builder import release as release_mod

    product = load_product(config_file, parse_set_options(set_items))
    validate_version(version)
    key = resolve_enrollment_key(enrollment_key, None, required=False)
    trust = resolve_trust(product, console_hosts, public_keys, key)
    signers = resolve_signers(product=product, **signing)
    guard_example_identity(product, signers, trust, allow_example_identity)
    manifest = release_mod.release(format_names=list(format_names or formats.NAMES), product=product, version=version,
                                   payload=payload, signers=signers, trust=trust, out=out, source_date_epoch=environment().epoch())
    if as_json:
        emit_json(manifest)
    else:
        log.summary_table(f"Release {version}", ["format", "file", "size", "sha256", "slot", "notarization"],
                          [[f, e["file"], f"{e['size']:,}", e["sha256"][:16] + "…",
                            f"{e['slot']['size']} B at {e['slot']['extents'][0][0]}" if e.get("slot") else "-",
                            _notarization_cell(e.get("notarization"))]
                           for f, e in manifest["files"].items()])


@main.command("stamp")
@click.option("--release", "release_dir", type=click.Path(path_type=Path), required=True, help="A folder made by `builder release`.")
@click.option("--format", "fmt", required=True, type=click.Choice(formats.KIND_NAMES),
              help="msi: Property defaults baked in and re-signed (GPO/Intune); msi-tagged: slot only, no re-signing.")
@enrollment_options(ids_required=False)
@click.option("--groups", "groups_file", type=click.Path(path_type=Path),
              help="Stamp every group of this file (JSON lines: account, group, console_url, token_file or token_env) "
                   "into the folder --out, all or none; instead of --account-id ... --console-url.")
@enrollment_key_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output installer file (with --groups: a folder).")
@signing_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def stamp_cmd(release_dir, fmt, account_id, group_id, token_file, token_env, console_url, groups_file, enrollment_key,
              enrollment_key_pkcs11, expires_in, out, as_json, **signing):
    """Turn a release into one group's installer, or --groups into many (signing keys only for msi, pkg and dmg)."""
    from builder import stamp as stamp_mod
    from builder.release import Release

    _check_stamp_options(groups_file, account_id=account_id, group_id=group_id, token_file=token_file,
                         token_env=token_env, console_url=console_url)
    ca = signing["ca"]
    # Each format's file is checked (sha256, signature) when the stamp first reads it: a stamp
    # of one format does not pay for the others, and is refused as before when its file changed.
    rel = Release.open(release_dir, ca=ca, lazy=True)
    product = rel.product()
    if groups_file is not None:
        lines = stamp_mod.read_groups(groups_file, fmt, product.console_url)
    else:
        token = _read_token(token_file, token_env)
        lines = [stamp_mod.GroupLine(0, _enrollment(account_id, group_id, token, console_url or product.console_url))]
    key = resolve_enrollment_key(enrollment_key, enrollment_key_pkcs11, signing["pkcs11_module"], required=True)
    trust = rel.trust()
    sign = functools.partial(sign_enrollment, key, trust=trust, expires_in=expires_in)
    signed = (stamp_mod.sign_groups(lines, sign, f"--groups {groups_file}") if groups_file is not None
              else [(0, sign(lines[0].enrollment))])
    if formats.kind(fmt).slotted and not _any_key(signing):
        signers = Signers(unsigned=not rel.manifest.get("signed"), verify_ca=ca)  # nothing is re-signed
    else:
        signers = resolve_signers(product=product, **signing)
    if groups_file is None:
        enrollment = signed[0][1]
        result = stamp_mod.stamp(rel, fmt, enrollment, signers, out)
        doc = {**result.as_dict(), "release": rel.version, "enrollment": enrollment.public()}
        if as_json:
            emit_json(doc)
        else:
            log.result(f"{result.path}: group {enrollment.group_id} of account {enrollment.account_id}, console "
                       f"{enrollment.console_url}, key {enrollment.key_id}; {result.size:,} bytes, sha256 {result.sha256}, "
                       f"{'re-signed' if result.resigned else ('signature kept' if result.signer else 'unsigned')}, "
                       f"{result.bytes_written:,} bytes written"
                       + (f", notarization: {_notarization_cell(result.notarization)}" if result.notarization else ""))
        return
    results = stamp_mod.stamp_groups(rel, fmt, signed, signers, out, where=f"--groups {groups_file}")
    docs = [{"line": line, **r.as_dict(), "release": rel.version, "enrollment": e.public()}
            for (line, e), r in zip(signed, results)]
    if as_json:
        emit_json(docs)
    else:
        log.summary_table(f"{len(docs)} {fmt} installers of release {rel.version} in {out}",
                          ["line", "account", "group", "console", "file", "size", "sha256", "signature"],
                          [[str(line), e.account_id, e.group_id, e.console_url, r.path.name, f"{r.size:,}",
                            r.sha256[:16] + "…", "re-signed" if r.resigned else ("kept" if r.signer else "unsigned")]
                           for (line, e), r in zip(signed, results)])


def _check_stamp_options(groups_file, **single) -> None:
    """--groups takes every group's fields from its file; without it, one group's from the options."""
    if groups_file is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in single.items() if v is not None]
        if given:
            raise UsageError(f"--groups takes each group's fields from its file: {', '.join(given)} cannot go with it",
                             "drop them, or stamp one group without --groups")
        return
    missing = [f"--{k.replace('_', '-')}" for k in ("account_id", "group_id") if single[k] is None]
    if missing:
        raise UsageError(f"missing option {' and '.join(missing)}", "give the group's ids, or --groups FILE")


# --- storage and service --------------------------------------------------------------------

def _any_key(signing: dict) -> bool:
    return any(signing[k] for k in ("sign_cert", "sign_key", "sign_pkcs12", "sign_pkcs11", "mac_sign_pkcs12",
                                    "notarize_key"))


def _service_signers(signing: dict, env: Environment) -> Signers:
    """Keys for the formats a service re-signs (baked msi, pkg, dmg); none needed for exe/msi-tagged.
    What they sign is named after each release's product when it is stamped (Signers.for_product)."""
    if not _any_key(signing) and not signing["no_sign"]:
        return Signers(verify_ca=signing["ca"])
    return resolve_signers(product=load_product(), env=env, **signing)


@main.command("publish")
@click.argument("release_dir", type=click.Path(path_type=Path))
@click.option("--to", "storage_url", required=True, help="file:///path, s3://bucket/prefix or az://container/prefix")
@handle_errors
def publish_cmd(release_dir, storage_url):
    """Upload a release folder: objects first, its index last; never overwrites."""
    from builder.release import Release
    from builder.service.setup import RELEASES_PREFIX
    from builder.storage import publish_release

    rel = Release.open(release_dir, verify=False)
    store = open_store_at(storage_url)
    with log.step(f"publish release {rel.version} to {store.url}"):
        key = publish_release(release_dir, store, RELEASES_PREFIX, version=rel.version)
    log.result(f"release {rel.version}: {key}")


@main.command("releases")
@click.option("--storage", "storage_url", required=True, help="file:///path, s3://bucket/prefix or az://container/prefix")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def releases_cmd(storage_url, as_json):
    """The releases published to a store: version, formats, signed; and which one `latest` is per format."""
    from builder.service.setup import RELEASES_PREFIX
    from builder.storage.published import latest_per_format, published_releases

    store = open_store_at(storage_url)
    found = published_releases(store, RELEASES_PREFIX)
    latest = latest_per_format(found)
    for r in found:
        r["latest_for"] = sorted(f for f, v in latest.items() if v == r["version"])
    if as_json:
        emit_json(found)
    else:
        log.summary_table(f"Releases in {store.url}", ["version", "formats", "signed", "latest for"],
                          [[r["version"], " ".join(r["formats"]), "yes" if r["signed"] else "NO",
                            " ".join(r["latest_for"]) or "-"] for r in found])


@main.command("prune")
@click.option("--storage", "storage_url", required=True, help="file:///path, s3://bucket/prefix or az://container/prefix")
@click.option("--keep", type=click.IntRange(min=1), required=True, help="How many of the newest releases to keep.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def prune_cmd(storage_url, keep, dry_run, as_json):
    """Remove old releases from a store, with the installers issued from them and the objects no
    kept release uses. The newest release of each format is always kept."""
    from builder.service.setup import RELEASES_PREFIX
    from builder.storage.published import prune, prune_plan

    store = open_store_at(storage_url)
    plan = prune_plan(store, RELEASES_PREFIX, keep)
    if not dry_run:
        with log.step(f"prune {len(plan['keys'])} objects from {store.url}"):
            prune(store, plan)
    if as_json:
        emit_json({**plan, "dry_run": dry_run})
    else:
        verb = "would remove" if dry_run else "removed"
        log.result(f"kept {', '.join(plan['keep']) or 'nothing'}; {verb} {', '.join(plan['remove']) or 'no release'} "
                   f"({len(plan['keys'])} objects)")


@main.command("issued")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), default=Path(".builder-service"), show_default=True,
              help="The service's state folder (its audit log).")
@click.option("--account-id", required=True)
@click.option("--group-id", help="Only this group.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def issued_cmd(state_dir, account_id, group_id, as_json):
    """What the service issued to an account (or one group), from its audit log: installers,
    signed enrollments and refusals, with the key id and the token's fingerprint, never the token."""
    from builder.service.audit import Audit
    from builder.service.setup import AUDIT_FILE

    rows = Audit.read(state_dir / AUDIT_FILE, account_id, group_id)
    for r in rows:
        r["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.pop("ts")))
    if as_json:
        emit_json(rows)
    else:
        log.summary_table(f"Issued to account {account_id}" + (f", group {group_id}" if group_id else ""),
                          ["time", "action", "group", "format", "release", "installer", "token", "by", "detail"],
                          [[r["time"], r["action"], r["group_id"] or "", r["format"] or "", r["release"] or "",
                            r["installer_id"] or "", r["token_fingerprint"] or "", r["caller"], r["detail"] or ""]
                           for r in rows])


def service_options(fn):
    fn = click.option("--storage", "storage_url", required=True, help="file:///path, s3://bucket/prefix or az://container/prefix")(fn)
    fn = click.option("--state", "state_dir", type=click.Path(path_type=Path), default=Path(".builder-service"), show_default=True,
                      help="Cache of releases and the audit log (SQLite).")(fn)
    fn = click.option("--redis", "redis_url", help="redis://host:port/db: hand stamping to `builder worker` processes.")(fn)
    return fn


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@service_options
@enrollment_key_options
@signing_options
@handle_errors
def serve_cmd(host, port, storage_url, state_dir, redis_url, enrollment_key, enrollment_key_pkcs11, expires_in, **signing):
    """Serve group installers over HTTP (API keys from BUILDER_API_KEYS or BUILDER_API_KEYS_FILE)."""
    import uvicorn

    from builder.service.app import ServiceSettings, create_app
    from builder.service.setup import ServiceOptions, api_keys_from, link_secret_of, make_issuer

    env = environment()
    signers = _service_signers(signing, env)
    ca = signing["ca"]
    key = resolve_enrollment_key(enrollment_key, enrollment_key_pkcs11, signing["pkcs11_module"], required=True)
    issuer = make_issuer(ServiceOptions(storage_url=storage_url, state_dir=state_dir, signers=signers, ca=ca,
                                        redis_url=redis_url, enrollment_key=key), env)
    settings = ServiceSettings(api_keys=api_keys_from(env), link_secret=link_secret_of(issuer), enrollment_ttl_s=expires_in)
    issuer.warm()
    uvicorn.run(create_app(issuer, settings), host=host, port=port, log_level="warning", access_log=False)


@main.command("worker")
@service_options
@signing_options
@click.option("--burst", is_flag=True, help="Exit when the queue is empty.")
@handle_errors
def worker_cmd(storage_url, state_dir, redis_url, burst, **signing):
    """Do stamping jobs from Redis (BUILDER_QUEUE_KEY must match the service's)."""
    from builder.service import jobs

    if not redis_url:
        raise UsageError("builder worker needs --redis URL", "the same Redis the service uses")
    issuer = _worker_issuer(storage_url, state_dir, signing, redis_url=redis_url, env=environment())
    # The helper is a new process: it reads the environment itself, as `main` did here.
    helper = jobs.SigningHelper(functools.partial(_helper_context, storage_url, state_dir, signing), log.settings())
    jobs.serve_jobs(issuer, helper)
    helper.start()
    try:
        issuer.warm()
        issuer.queue.worker().work(burst=burst, with_scheduler=True)
    finally:
        helper.stop()


def _helper_context(storage_url, state_dir, signing: dict):
    """In the worker's signing helper: its issuer (no queue) and the key that opens the jobs."""
    from builder.service import jobs

    env = Environment.read()
    return _worker_issuer(storage_url, state_dir, signing, env=env), jobs.fernet_from(env.queue_key)


def _worker_issuer(storage_url, state_dir, signing: dict, *, env: Environment, redis_url: str | None = None):
    """The issuer of `builder worker`, and of its signing helper (which takes no jobs from Redis)."""
    from builder.service.setup import ServiceOptions, make_issuer

    return make_issuer(ServiceOptions(storage_url=storage_url, state_dir=state_dir, signers=_service_signers(signing, env),
                                      ca=signing["ca"], redis_url=redis_url), env)


@main.command("issue")
@click.option("--format", "fmt", required=True, type=click.Choice(formats.KIND_NAMES))
@click.option("--release", "release", default="latest", show_default=True)
@enrollment_options
@enrollment_key_options
@click.option("--base-url", default="http://127.0.0.1:8080", show_default=True, help="Where `builder serve` answers (for the link).")
@service_options
@signing_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def issue_cmd(fmt, release, account_id, group_id, token_file, token_env, console_url, enrollment_key,
              enrollment_key_pkcs11, expires_in, base_url, storage_url, state_dir, redis_url, as_json, **signing):
    """Issue one group's installer through the service's own code path, without HTTP."""
    from builder.service.setup import ServiceOptions, link_secret_of, make_issuer
    from builder.storage.links import sign_link

    env = environment()
    signers = _service_signers(signing, env)
    ca = signing["ca"]
    key = resolve_enrollment_key(enrollment_key, enrollment_key_pkcs11, signing["pkcs11_module"], required=True)
    issuer = make_issuer(ServiceOptions(storage_url=storage_url, state_dir=state_dir, signers=signers, ca=ca,
                                        redis_url=redis_url, enrollment_key=key), env)
    token = _read_token(token_file, token_env)
    version = issuer.resolve(release, fmt)  # latest: the newest release holding this format
    enrollment = _enrollment(account_id, group_id, token, console_url or issuer.default_console_url(version))
    installer_id, rec = issuer.request("cli", release=version, fmt=fmt, enrollment=enrollment, wait_s=600)
    issuer.close()
    if not issuer.store.presigned_links:  # `builder serve` serves the download itself
        url = base_url.rstrip("/") + sign_link(link_secret_of(issuer), installer_id, int(time.time()) + 3600, route="/v1/download")
    else:
        url = issuer.store.presigned_url(rec.key, 3600)
    doc = {"id": installer_id, "status": "ready", "sha256": rec.sha256, "size": rec.size, "key": rec.key, "url": url}
    if as_json:
        emit_json(doc)
    else:
        log.result(f"installer {installer_id}: {rec.key} ({rec.size:,} bytes, sha256 {rec.sha256})")
        log.result(f"download link (valid 1 h, served by `builder serve`): {url}")

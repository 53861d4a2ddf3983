from builder import log


def test_redact_replaces_registered_secrets():
    log.register_secret("s3cr3t-value-0123456789")
    assert log.redact("token=s3cr3t-value-0123456789; again s3cr3t-value-0123456789") == "token=***; again ***"
    log.register_secret("ab")  # too short to redact safely: ignored
    assert log.redact("abc") == "abc"

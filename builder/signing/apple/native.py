"""apple-platform-py (bindings to apple-platform-rs, the `rcodesign` code), loaded once for the
modules that sign and read signatures with it."""

from __future__ import annotations

from builder.errors import SigningError

try:  # the native library is large; a machine that never signs for macOS need not load it
    import apple_platform as ap
    from apple_platform import errors as ap_errors
except ImportError:  # pragma: no cover - the project depends on apple-platform-py
    ap = None
    ap_errors = None


def require_library() -> None:
    if ap is None:  # pragma: no cover
        raise SigningError("apple-platform-py is not installed", "pip install apple-platform-py")

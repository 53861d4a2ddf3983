"""Authenticode and Apple signing."""

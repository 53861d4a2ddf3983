"""Wrappers around external programs; all of them go through runner.run."""

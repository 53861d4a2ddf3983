"""Test helpers shared by the suites: a wine prefix driver, development keys."""

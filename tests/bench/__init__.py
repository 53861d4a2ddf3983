"""`make bench`: speed targets measured side by side in one run (tests/bench/run.py).

Benchmarks report; they do not fail on a missed target. A run exits non-zero only when
something in it broke (a build, a stamp, a request that did not succeed).
"""

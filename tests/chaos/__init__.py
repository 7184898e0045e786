"""Chaos tests: processes of a real federation killed (SIGKILL) and restarted while it runs.

`harness.py` is the importable part (no pytest in it); `crash_resume.py` runs it from the
command line; tests/integration/test_crash_resume.py runs a reduced, fixed plan of it.
"""

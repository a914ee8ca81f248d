"""Benchmarks: linkedblob side by side with CNCF distribution's registry (``python -m bench``).

Not part of the installed package and not part of the test run (``tests/test_bench_quick.py``
only runs the quick mode, to keep the harness from rotting).
"""

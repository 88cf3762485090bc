"""Loaded by every Python process the tests start, through PYTHONPATH: applies the simulation
named by MERGEBUILD_SIMULATE (tests/simulate.py) before mergebuild is imported."""

import os

if os.environ.get("MERGEBUILD_SIMULATE"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from simulate import apply

    apply(os.environ["MERGEBUILD_SIMULATE"])

"""Development tooling for das-ingest, kept out of the product package and its wheel.

The local stack (``das_dev.devstack``: kinesalite, moto, a throwaway PostgreSQL) that the tests,
the benchmarks and ``make stack`` run, and ``make demo`` (``das_dev.demo``). It is importable
from a checkout (``make setup``, then run from the repository's root); ``pip install das-ingest``
never installs it, and the product package ``ingest`` never imports it.
"""

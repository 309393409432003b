"""Development tooling for das-ingest, kept out of the product package and its wheel.

The local stack (``das_dev.devstack``: kinesalite, moto, a throwaway PostgreSQL) that the tests,
the benchmarks and ``make stack`` run, and ``make demo`` (``das_dev.demo``). ``make setup`` links
it into the checkout's virtualenv (the editable install maps the product package only);
``pip install das-ingest`` never installs it, and the product package ``ingest`` never imports
it.
"""

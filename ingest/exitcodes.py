"""The exit-code contract every das-ingest command keeps (documented once, in ``EXIT_CODES``
below, which ``das-ingest --help`` prints and docs/operations.md repeats)."""

from __future__ import annotations

from ingest.errors import ConfigError

#: The command did what it was asked.
OK = 0
#: A runtime failure: something could not be done (for ``verify``: findings; for ``decrypt`` and
#: ``dead-letters retry``: some records failed).
FAILURE = 1
#: A usage or configuration error: a bad option or variable, a refused login, an unmigrated
#: schema, an unknown stream. Nothing was changed; fix the invocation and run it again.
USAGE = 2
#: A dependency was unavailable (the warehouse unreachable, KMS unable to check anchors, S3
#: unreachable, throttling or failing): the same command may well succeed later.
UNAVAILABLE = 3

EXIT_CODES = """\
exit codes (every command): 0 success; 1 runtime failure (verify: findings; decrypt and
dead-letters retry: some records failed); 2 usage or configuration error (bad option or
variable, refused login, schema not migrated); 3 a dependency unavailable (warehouse
unreachable; archive and verify --archive: S3 unreachable or throttling; verify: KMS could not
check the anchors). Errors are one line on stderr."""


class UsageError(ConfigError):
    """A bad option value or combination, found after parsing: exit 2 with one line."""

"""What the operator documentation says about startup and exit codes is what the code does.
The behaviour itself is tested elsewhere (tests/test_deploy.py: /healthz answers while the
warehouse is unreachable at startup; tests/test_exit_codes.py: the codes); here the texts are
held to it, so a stale sentence cannot come back."""

from __future__ import annotations

import re
from pathlib import Path

from ingest import exitcodes

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    ROOT / "docs" / "operations.md",
    ROOT / "docs" / "archive.md",
    ROOT / "README.md",
    ROOT / "Dockerfile",
    ROOT / "docker-compose.yml",
    *sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")),
]

#: Claims the texts once made: the endpoints came up after the warehouse check, an unreachable
#: warehouse at startup exited 2, and an unreachable S3 was a configuration error (archive).
STALE = [
    r"nothing listens",
    r"comes? up (only )?(after|once) the warehouse",
    r"starts after the warehouse",
    r"unreachable warehouse at startup, no AWS region",
    r"an unreachable warehouse, a refused login or a missing schema is a\s+configuration error",
    # archive and verify --archive: an unreachable S3 once exited 2 (the bucket check counted
    # any error as configuration) and an S3 error mid-run exited 1; both are exit 3 now.
    r"refused or\s+unreachable \(`HeadBucket`\)",
    r"S3 or the\s+bucket unusable",
    r"Interrupted by an S3 or\s+network error",
]


def test_no_stale_startup_claims() -> None:
    for path in TEXTS:
        text = path.read_text()
        for claim in STALE:
            assert not re.search(claim, text, re.IGNORECASE), f"{path.name}: {claim}"


def test_the_startup_sequence_is_documented_as_run_does_it() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    sequence = re.search(r"Startup sequence: (.*?)\n\n", doc, re.S)
    assert sequence, "docs/operations.md has no startup sequence"
    text = " ".join(sequence[1].split())
    # the order run keeps: the decode processes, the endpoints, then the warehouse
    assert text.index("starts its decode processes") < text.index(
        "serves `/metrics`, `/healthz` and `/readyz`"
    )
    assert text.index("serves `/metrics`, `/healthz` and `/readyz`") < text.index(
        "then connects to the warehouse"
    )
    assert "retrying with backoff while it is unreachable" in text
    # and the test that holds run to it exists
    assert (
        "async def test_a_warehouse_unreachable_at_startup_is_waited_for_not_fatal"
        in (ROOT / "tests" / "test_deploy.py").read_text()
    )


def test_the_exit_code_table_is_the_contract() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    table = doc.split("### Exit codes", 1)[1].split("###", 1)[0]
    codes = [int(c) for c in re.findall(r"^\| (\d) \|", table, re.M)]
    assert codes == [exitcodes.OK, exitcodes.FAILURE, exitcodes.USAGE, exitcodes.UNAVAILABLE]

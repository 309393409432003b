"""`make soak` itself, in miniature: a quarter of a minute of traffic, two workers, kills, an
outage of Kinesis and of KMS, and the report says nothing was lost or duplicated (about 20 s on
a 2-core machine; the real soak runs for minutes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _field(report: str, name: str) -> str:
    match = re.search(rf"^  {name}\s+(.+)$", report, re.MULTILINE)
    assert match, f"no {name!r} in the report:\n{report}"
    return match.group(1).strip()


@pytest.mark.slow
def test_a_short_soak_loses_and_duplicates_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAS_"))}
    command = [
        "--minutes",
        "0.25",
        "--rate",
        "100",
        "--chunk",
        "500",
        "--workers",
        "2",
        "--shards",
        "2",
        "--kill-every",
        "4,6",
        "--outage-every",
        "3",
        "--outage-seconds",
        "4",
        "--drain-seconds",
        "120",
        "--seed",
        "5",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = done.stdout
    assert done.returncode == 0, report[-3000:] + done.stderr[-3000:]
    produced = int(_field(report, "events produced"))
    assert produced == 1500  # three chunks of 500 at 100 events/s in 15 s
    assert int(_field(report, "events stored")) == produced
    assert int(_field(report, "duplicated")) == 0
    assert int(_field(report, "lost")) == 0
    assert int(_field(report, "dead letters")) == 0
    assert _field(report, "SIGTERM exit codes") == "[0, 0]"
    assert _field(report, "result") == "OK"
    assert "kinesis 4 s outage: not ready" in report
    assert "kms 4 s outage: not ready" in report
    kills = re.match(r"(\d+)", _field(report, "SIGKILLs"))
    assert kills
    assert int(kills.group(1)) >= 1

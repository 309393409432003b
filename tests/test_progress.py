"""Progress of long commands: a tqdm bar on a terminal, plain lines elsewhere, never stdout."""

from __future__ import annotations

import io

from ingest.progress import Progress
from tests.cli_helpers import das_ingest
from tests.fleet import migrated


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress("verify: chains checked", unit="chains", stream=out, interval=0) as progress:
        progress.set_total(2)
        progress.update()
        progress.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("verify: chains checked: 1/2 chains (running")
    assert lines[-1].startswith("verify: chains checked: 2/2 chains (done")
    assert "\r" not in out.getvalue()


def test_plain_lines_are_rate_limited() -> None:
    out = io.StringIO()
    with Progress("x", stream=out, interval=3600) as progress:
        for _ in range(1000):
            progress.update()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert "x: 1000 (done" in out.getvalue()


def test_a_bar_on_a_terminal() -> None:
    out = Terminal()
    with Progress("dead-letters retry", total=3, unit="dead letters", stream=out) as progress:
        progress.update(3)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "3/3" in text
    assert "dead-letters retry" in text


async def test_commands_report_progress_on_stderr_only(pg_dsn: str) -> None:
    await migrated(pg_dsn)
    env = {"DAS_DSN": pg_dsn}
    retention = await das_ingest("retention", "--retention-keep", "30d", "--dry-run", env=env)
    assert retention.returncode == 0, retention.stderr
    assert "retention: partitions: 1/1 partitions (done" in retention.stderr
    assert "retention" not in retention.stdout.replace("retention period", "")
    verify = await das_ingest("verify", "--no-anchors", env=env)
    assert verify.returncode == 0, verify.stderr
    assert "verify: chains checked: 0/0 chains (done" in verify.stderr
    retry = await das_ingest(
        "dead-letters", "retry", "--all", env={**env, "AWS_REGION": "us-east-1"}
    )
    assert retry.returncode == 0, retry.stderr
    assert "dead-letters retry: 0/0 dead letters (done" in retry.stderr

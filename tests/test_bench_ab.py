"""python -m bench.ab: an interleaved A/B of two worker configurations on one workload."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ab(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAS_"))}
    return subprocess.run(
        [sys.executable, "-m", "bench.ab", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_two_arms_run_interleaved_and_their_medians_are_tabled(tmp_path: Path) -> None:
    # The second arm's worker runs through --python: a wrapper that notes its arguments, then
    # runs this interpreter. Both parts of an arm (its flags, its Python) must reach the worker.
    calls = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    done = ab(
        "--arm", "base",
        "--arm", "small=--chunk-kib 16",
        "--python", "small", str(python),
        "--records", "200", "--rounds", "2", "--events-per-record", "10",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    head = re.search(r"^(\d[\d,]*) records, ([\d,]+) events; ceiling ([\d,]+) events/s$", out, re.M)
    assert head, out
    assert int(head[2].replace(",", "")) == 2000
    assert int(head[3].replace(",", "")) > 0
    rounds = re.findall(
        r"^round (\d) (\w+): ([\d,]+) events/s \((\d+)% of the ceiling\)", out, re.M
    )
    # every round runs each arm once, the order reversed every other round
    assert [(r[0], r[1]) for r in rounds] == [
        ("1", "base"), ("1", "small"), ("2", "small"), ("2", "base"),
    ]  # fmt: skip
    assert all(int(r[2].replace(",", "")) > 0 for r in rounds)
    rows = [line for line in out.splitlines() if line.startswith(("| base ", "| small "))]
    assert len(rows) == 2, out
    base, small = ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    assert base[1] == "(none)"
    assert small[1] == f"--chunk-kib 16 [{python}]"
    # the wrapper ran the small arm's worker, in both rounds, with its flags; never base's
    runs = calls.read_text().splitlines()
    assert len(runs) == 2, runs
    assert all(r.startswith("-P -m ingest run ") and r.endswith(" --chunk-kib 16") for r in runs), (
        runs
    )
    for row in (base, small):
        assert int(row[2].replace(",", "")) > 0
        assert row[3].endswith("%")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--arm", "a"], "give at least two arms (--arm LABEL[=FLAGS])"),
        (["--arm", "a", "--arm", "a=--no-policies"], "each --arm needs a label of its own"),
        (["--arm", "a", "--arm", "=-x"], "every --arm needs a label before its '='"),
        (["--arm", "a", "--arm", "b='--x"], "--arm: No closing quotation"),
        (["--arm", "a", "--arm", "b", "--python", "c", sys.executable],
         "--python c: no --arm has that label"),
        (["--arm", "a", "--arm", "b", "--python", "b", "/nonexistent/python"],
         "--python b: /nonexistent/python is not an executable"),
        (["--arm", "a", "--arm", "b", "--rounds", "0"], "--rounds must be 1 or more"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(argv: list[str], error: str) -> None:
    done = ab(*argv, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1] == f"python -m bench.ab: error: {error}"
    assert "Traceback" not in done.stderr

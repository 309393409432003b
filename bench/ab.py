"""Interleaved A/B of `das-ingest run` end to end: worker flags or whole builds, one workload.

``python -m bench.ab --arm base --arm 'big=--chunk-kib 1024' [--python big PATH/bin/python]``

One stream is filled once (``--records`` records of ``--events-per-record`` events, suite
``--suite``) and its decode-pool ceiling measured once; then every round runs each arm into a
fresh warehouse, the order reversed every other round so a drift in the machine's load favours
no arm. Each run prints its steady rate, its share of the ceiling and the CPU per event of the
worker's main process, its decode processes, PostgreSQL and kinesalite in the steady window
(see ``python -m bench --ceiling-only``); the end is a table of each arm's medians.

An arm is a label and, after an ``=``, the extra flags of its worker (shell-quoted).
``--python LABEL PATH`` runs that arm's worker with another interpreter, such as a second
checkout's virtualenv, to compare two builds: a PYTHONPATH does not override this checkout's
editable install. The warehouse is migrated by this checkout either way.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import ceiling, e2e, workload
from bench.encoder import SUITE_ID, UNSIGNED_SUITE_ID
from bench.report import Table, num
from das_dev.devstack import LocalStack, install_signal_handlers
from ingest.aws import aws_client
from ingest.emulate.producer import create_kms_key

SUITES = {"0x0178": UNSIGNED_SUITE_ID, "0x0378": SUITE_ID}
#: The parties whose CPU per event each run prints (e2e.PARTIES, less moto and the bench).
PARTIES = (e2e.WORKER_MAIN, e2e.DECODE, e2e.POSTGRES, e2e.KINESALITE)
COLUMNS = ("main", "decode", "PostgreSQL", "kinesalite")


@dataclass
class Arm:
    label: str
    flags: list[str]
    python: str | None = None
    #: per run: steady events/s, share of the ceiling, then µs/event of each of PARTIES
    runs: list[list[float]] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[Arm]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m bench.ab --arm 512 --arm '1024=--chunk-kib 1024'",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="LABEL[=FLAGS]",
        help="an arm: its label and, after '=', its worker's extra flags (quote them); give "
        "two or more",
    )
    parser.add_argument(
        "--python",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABEL", "PATH"),
        help="run arm LABEL's worker with this Python (another checkout's virtualenv)",
    )
    parser.add_argument("--events-per-record", type=int, default=1, metavar="N", help="default: 1")
    parser.add_argument("--suite", choices=sorted(SUITES), default="0x0178", help="default: 0x0178")
    parser.add_argument("--records", type=int, default=16000, metavar="N", help="default: 16,000")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="default: 3")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        metavar="N",
        help="das-ingest run --processes (default: 2)",
    )
    args = parser.parse_args(argv)
    if len(args.arm) < 2:
        parser.error("give at least two arms (--arm LABEL[=FLAGS])")
    pairs = [arm.partition("=")[::2] for arm in args.arm]
    labels = [label for label, _ in pairs]
    if not all(labels):
        parser.error("every --arm needs a label before its '='")
    if len(set(labels)) != len(labels):
        parser.error("each --arm needs a label of its own")
    for name, value in (("--events-per-record", args.events_per_record),
                        ("--records", args.records), ("--rounds", args.rounds)):  # fmt: skip
        if value < 1:
            parser.error(f"{name} must be 1 or more")
    try:
        arms = {label: Arm(label, shlex.split(flags)) for label, flags in pairs}
    except ValueError as exc:
        parser.error(f"--arm: {exc}")
    for label, path in args.python:
        if label not in arms:
            parser.error(f"--python {label}: no --arm has that label")
        if not os.access(path, os.X_OK):
            parser.error(f"--python {label}: {path} is not an executable")
        arms[label].python = path
    return args, list(arms.values())


async def measure(
    stack: LocalStack, args: argparse.Namespace, arms: list[Arm]
) -> tuple[float, workload.Workload]:
    """Fill the stream, measure the ceiling, run the rounds; the ceiling's events/s and the
    workload."""
    async with aws_client("kinesis") as kinesis, aws_client("kms") as kms:
        key_id = await create_kms_key(kms)
        stream = "aws-rds-das-cluster-BENCHAB"
        await workload.create_stream(kinesis, stream)
        size = args.events_per_record
        work = await workload.build(
            kms, key_id, stream, size, args.records * size, seed=size, suite=SUITES[args.suite]
        )
        await workload.put(kinesis, work)
    top = (await ceiling.decode_pool_rate(work, args.processes)).events_per_second
    print(f"{work.records:,} records, {work.events:,} events; ceiling {top:,.0f} events/s")
    for round_no in range(args.rounds):
        for arm in arms if round_no % 2 == 0 else arms[::-1]:
            run = await e2e.run_worker(
                stack, work, worker_args=arm.flags, processes=args.processes, python=arm.python
            )
            window = run.steady_cpu
            costs = [window.per_event_us(p) if window else float("nan") for p in PARTIES]
            rate = run.steady_events_per_second
            arm.runs.append([rate, rate / top if top else 0.0, *costs])
            shown = ", ".join(f"{c} {_us(v)}" for c, v in zip(COLUMNS, costs, strict=True))
            print(
                f"round {round_no + 1} {arm.label}: {rate:,.0f} events/s "
                f"({arm.runs[-1][1]:.0%} of the ceiling); µs/event {shown}",
                flush=True,
            )
    return top, work


def _us(value: float) -> str:
    """µs/event, or '-' when the run had no steady window to account (NaN)."""
    return "-" if math.isnan(value) else num(value, 1)


def table(args: argparse.Namespace, arms: list[Arm], top: float, work: workload.Workload) -> Table:
    result = Table(
        f"A/B: {args.events_per_record} events/record, suite {args.suite}, {work.records:,} "
        f"records ({work.events:,} events), {args.rounds} rounds, ceiling {top:,.0f} events/s "
        "(medians)",
        ["arm", "worker flags", "steady events/s", "% of ceiling"]
        + [f"{c} µs/event" for c in COLUMNS],
    )
    for arm in arms:
        medians = [statistics.median(column) for column in zip(*arm.runs, strict=True)]
        costs = [_us(v) for v in medians[2:]]
        flags = " ".join(arm.flags) or "(none)"
        if arm.python:
            flags += f" [{arm.python}]"
        result.add(arm.label, flags, num(medians[0]), f"{medians[1]:.0%}", *costs)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args, arms = parse_args(argv)
    install_signal_handlers()
    e2e.drop_stray_aws_variables()
    with LocalStack() as stack:
        os.environ.update(stack.env())
        top, work = asyncio.run(measure(stack, args, arms))
    print()
    print(table(args, arms, top, work).render())
    return 0


if __name__ == "__main__":
    sys.exit(main())

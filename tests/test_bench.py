"""The benchmark: its quick mode prints every row with sane numbers, and its fast encoder writes
messages that both decryptors open to the same events (so the bench measures real work)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from bench import e2e, procs
from bench.encoder import SIGNATURE_LENGTH, UNSIGNED_SUITE_ID, FastEncryptor
from ingest.decode import decode_record
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.lean import LeanDecryptor
from ingest.emulate.encoder import Encryptor, EsdkEncryptor, encode_payload
from ingest.emulate.producer import EmulateOptions
from ingest.errors import DecryptError

ROOT = Path(__file__).resolve().parent.parent
KEY = os.urandom(32)
SIZES = ("1", "10", "100")


def _tables(output: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables by the title above them: each row as {header: cell}."""
    tables: dict[str, list[list[str]]] = {}
    title = ""
    for line in output.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = []
        elif line.startswith("|") and title:
            tables[title].append([c.strip() for c in line.strip("|").split("|")])
    return {
        t: [dict(zip(rows[0], row, strict=True)) for row in rows[2:]]
        for t, rows in tables.items()
        if rows
    }


def _number(cell: str) -> float:
    """'1,234 (1,200-1,300)' -> 1234.0; '5.0x' -> 5.0."""
    match = re.match(r"[\d,]+(\.\d+)?", cell)
    assert match, f"not a number: {cell!r}"
    return float(match.group(0).replace(",", ""))


def _table(tables: dict[str, list[dict[str, str]]], prefix: str) -> list[dict[str, str]]:
    found = [rows for title, rows in tables.items() if title.startswith(prefix)]
    assert len(found) == 1, f"expected one table titled {prefix!r}, got {list(tables)}"
    return found[0]


@pytest.mark.slow
def test_quick_bench_prints_every_row() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAS_"))}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "Machine: " in out
    tables = _tables(out)

    stages = _table(tables, "Decode, one process")
    assert [r["events/record"] for r in stages] == list(SIZES)
    for row in stages:
        assert len(row) == 11  # events/record and ten stages (fingerprint and policy included)
        assert all(_number(c) > 0 for c in row.values()), row

    rates = _table(tables, "Decode throughput")
    assert [r["events/record"] for r in rates] == list(SIZES)
    for row in rates:
        assert set(row) == {
            "events/record",
            "lean verified",
            "lean unverified",
            "esdk",
            "lean verified + policy pack",
        }
        assert all(_number(c) > 0 for c in row.values()), row

    suites = _table(tables, "Decrypt per Encryption SDK suite")
    assert [r["suite"] for r in suites] == ["0x0378 (signed, ECDSA P-384)", "0x0178 (unsigned)"]
    for row in suites:
        assert set(row) == {"suite", "lean verified", "lean unverified", "esdk"}
        assert all(_number(row[c]) > 0 for c in ("lean verified", "lean unverified", "esdk"))

    e2e = _table(tables, "End to end")
    ours = ["das-ingest", "das-ingest --skip-signature-verification"]
    if any(r["consumer"] == "das-ingest --no-integrity-chain" for r in e2e):
        ours.append("das-ingest --no-integrity-chain")
    consumers = [*ours, "reference (seed)"]
    assert [(r["events/record"], r["consumer"]) for r in e2e] == [
        (s, c) for s in SIZES for c in consumers
    ]
    for row in e2e:
        assert int(row["records"]) > 0
        assert int(row["events"]) >= int(row["records"]) * int(row["events/record"]) // 2
        assert _number(row["events/s"]) > 0
        assert _number(row["records/s"]) > 0
        assert _number(row["vs reference"]) > 0
        kms_per_1000 = _number(row["KMS calls/1000 records"])
        if row["consumer"] == "reference (seed)":
            assert kms_per_1000 == 1000.0  # one KMS call per record, by design
        else:
            assert 0 < kms_per_1000 < 1000.0
            assert _number(row["first commit s"]) > 0
            assert _number(row["steady events/s"]) > 0
            assert _number(row["steady vs reference"]) > 0
            assert 50 < _number(row["peak RSS MB"]) < 2000

    latency = _table(tables, "Latency")
    assert len(latency) == 1
    p50, p99 = _number(latency[0]["p50 s"]), _number(latency[0]["p99 s"])
    assert 0 < p50 <= p99

    ceiling = _table(tables, "Steady state vs the ceiling")
    assert [(r["events/record"], r["suite"]) for r in ceiling] == [
        (size, suite) for size in ("1", "10") for suite in ("0x0378", "0x0178")
    ]
    for row in ceiling:
        assert _number(row["ceiling events/s"]) > 0
        assert _number(row["steady events/s"]) > 0
        assert row["% of ceiling"].endswith("%")
    cpu = _table(tables, "CPU in the steady window")
    assert [(r["events/record"], r["suite"]) for r in cpu] == [
        (r["events/record"], r["suite"]) for r in ceiling
    ]
    # a quick run's 1-event stream may commit too few times for a steady window
    measured = [r for r in cpu if r["window s"] != "-"]
    assert measured, cpu
    for row in measured:
        shares = {h: _number(c) for h, c in row.items() if h.endswith(" %")}
        assert len(shares) == 9  # six parties, the rest of the machine, idle; the ceiling's
        # the parties, the rest of the machine and idle are the whole machine (8 roundings)
        assert 92 <= sum(v for h, v in shares.items() if not h.startswith("ceiling")) <= 108
        assert 0 < shares["ceiling: decode %"] <= 100
        assert _number(row["ceiling: decode µs/event"]) > 0
        if _number(row["window s"]) >= 1.0:  # 10 ms ticks: a shorter one may read 0
            assert _number(row["decode µs/event"]) > 0
            assert row["% of ceiling given its CPU"].endswith("%")
    archived = _table(tables, "Archive: one UTC day of 2,000 events")
    assert [r["step"] for r in archived] == [
        "fill the warehouse (decode + COPY + chain)",
        "das-ingest archive (write, read back, verify)",
        "das-ingest verify --archive",
    ]
    for row in archived[1:]:
        assert int(row["events"].replace(",", "")) >= 1000
        assert _number(row["events/s"]) > 0
        assert 50 < _number(row["peak RSS MB"]) < 2000
    per_event = re.search(r"Bytes per event: Parquet ([\d.]+) .* PostgreSQL ([\d.]+) ", out)
    assert per_event, out
    assert 0 < float(per_event[1]) < float(per_event[2])

    checks = out.split("### Checks", 1)[1]
    assert checks.count("at most one Decrypt per distinct data key: ok") == len(SIZES) * len(ours)
    assert checks.count("limit 400 MB: ok") >= 1
    assert "FAILED" not in checks
    # The quick mode is meant to stay under a minute; allow a loaded machine some slack.
    assert elapsed < 180


def _sealed_records(encryptor: Encryptor, events_per_record: int) -> list[tuple[bytes, str]]:
    options = EmulateOptions(
        stream="aws-rds-das-cluster-BENCHTEST",
        events_per_record=events_per_record,
        count=events_per_record * 6,
        engine="both",
    )
    return [
        (
            encode_payload(orjson.dumps(r.doc), r.version, KEY, b"blob", encryptor),
            r.version,
        )
        for r in options.inner_records()
    ]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_fast_encoder_messages_open_with_both_decryptors(size: int) -> None:
    plaintext = os.urandom(size)
    message = FastEncryptor().encrypt(plaintext, KEY)
    assert LeanDecryptor().decrypt(message, KEY) == plaintext
    assert LeanDecryptor(verify_signatures=False).decrypt(message, KEY) == plaintext
    assert EsdkDecryptor().decrypt(message, KEY) == plaintext
    # The SDK's fixed-length footer: u16 length, then the 103-byte DER signature.
    assert message[-SIGNATURE_LENGTH - 2 : -SIGNATURE_LENGTH] == SIGNATURE_LENGTH.to_bytes(2, "big")


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096 + 5])
def test_fast_encoder_writes_the_unsigned_suite_of_aurora_postgresql(size: int) -> None:
    plaintext = os.urandom(size)
    message = FastEncryptor(suite=UNSIGNED_SUITE_ID).encrypt(plaintext, KEY)
    assert message[2:4] == b"\x01\x78"  # suite 0x0178
    assert message[20:22] == b"\x00\x00"  # an empty encryption context, as Aurora sends
    assert LeanDecryptor().decrypt(message, KEY) == plaintext
    assert EsdkDecryptor().decrypt(message, KEY) == plaintext
    tampered = bytearray(message)
    tampered[-1] ^= 0x01  # the last tag: AES-GCM notices, with no signature to lean on
    with pytest.raises(DecryptError):
        LeanDecryptor().decrypt(bytes(tampered), KEY)


def test_fast_encoder_signatures_are_real() -> None:
    message = bytearray(FastEncryptor().encrypt(b"x" * 100, KEY))
    message[-5] ^= 0x01  # inside the signature: only the ECDSA verify can notice
    with pytest.raises(DecryptError, match="signature"):
        LeanDecryptor().decrypt(bytes(message), KEY)
    with pytest.raises(DecryptError):
        EsdkDecryptor().decrypt(bytes(message), KEY)
    assert LeanDecryptor(verify_signatures=False).decrypt(bytes(message), KEY) == b"x" * 100


@pytest.mark.parametrize("events_per_record", [1, 10, 100])
def test_fast_encoder_records_decode_like_the_emulators(events_per_record: int) -> None:
    fast = _sealed_records(FastEncryptor(), events_per_record)
    slow = _sealed_records(EsdkEncryptor(), events_per_record)
    assert len(fast) == len(slow)
    for (fast_raw, _), (slow_raw, _) in zip(fast, slow, strict=True):
        reference = decode_record(slow_raw, KEY, EsdkDecryptor())
        assert decode_record(fast_raw, KEY, EsdkDecryptor()) == reference
        assert decode_record(fast_raw, KEY, LeanDecryptor()) == reference
        assert decode_record(fast_raw, KEY, LeanDecryptor(verify_signatures=False)) == reference


def test_the_chain_cost_check_compares_median_rates() -> None:
    from bench.__main__ import NO_CHAIN, chain_overhead
    from bench.e2e import WorkerRun

    def run(events_per_second: float) -> WorkerRun:
        return WorkerRun(int(events_per_second), 1, 1.0, 0.1, 0.0, 0, None, 0)

    assert chain_overhead(10, {"das-ingest": [run(950)]}) is None
    cheap = chain_overhead(10, {"das-ingest": [run(950)], f"das-ingest {NO_CHAIN}": [run(1000)]})
    assert cheap is not None
    assert cheap[1] is True
    assert "5.0%" in cheap[0]
    assert cheap[0].endswith(": ok")
    dear = chain_overhead(
        100,
        {"das-ingest": [run(850), run(890), run(990)], f"das-ingest {NO_CHAIN}": [run(1000)]},
    )
    assert dear is not None
    assert dear[1] is False  # the median, 890: 11%
    assert "11.0%" in dear[0]
    assert dear[0].endswith("FAILED")


def test_the_policy_pack_cost_check_compares_median_rates() -> None:
    from bench.__main__ import NO_POLICIES, policy_overhead
    from bench.e2e import WorkerRun

    def run(events_per_second: float, cpu: float = 2.0) -> WorkerRun:
        return WorkerRun(
            int(events_per_second), 1, 1.0, 0.1, 0.0, 0, None, 0,
            worker_cpu_seconds=cpu, postgres_cpu_seconds=cpu / 4,
        )  # fmt: skip

    assert policy_overhead(10, {"das-ingest": [run(950)]}) is None
    off = f"das-ingest {NO_POLICIES}"
    cheap = policy_overhead(10, {"das-ingest": [run(930, 2.2)], off: [run(1000)]})
    assert cheap is not None
    assert cheap == (
        "- Policy pack cost, 10/record: (off - on) / off end-to-end events/s = 7.0% (930 with "
        f"the built-in pack, 1,000 with {NO_POLICIES}; median of 1 and 1 runs), limit 10%: ok; "
        "CPU per run 2.20 s worker + 0.55 s PostgreSQL with the pack, 2.00 s worker + 0.50 s "
        "PostgreSQL without",
        True,
    )
    dear = policy_overhead(10, {"das-ingest": [run(800), run(880), run(990)], off: [run(1000)]})
    assert dear is not None
    assert dear[1] is False  # the median, 880: 12%


def test_steady_is_start_to_start_over_the_commits() -> None:
    """B events every T seconds is B/T; the last commit's events are not counted (the clock
    stops at its start), so a big last batch cannot inflate a short run."""
    every_half_second = [(100.0 + 0.5 * i, 50) for i in range(5)]
    assert e2e.steady_rate(every_half_second) == pytest.approx(100.0)
    big_last = [*every_half_second[:-1], (102.0, 5_000)]
    assert e2e.steady_rate(big_last) == pytest.approx(100.0)
    small_first = [(100.0, 5), *every_half_second[1:]]
    assert e2e.steady_rate(small_first) < 100.0
    assert e2e.steady_rate([(100.0, 50)]) == 0.0


def test_the_policy_pair_runs_only_the_pack_on_and_off() -> None:
    from bench.__main__ import NO_POLICIES, parse_args, variants

    args = parse_args(["--policy-pair", "--e2e-repeat", "4"])
    assert args.sizes == [10]  # the record size, unless asked otherwise
    assert args.no_reference
    assert [(v.label, v.flags) for v in variants(args)] == [
        ("das-ingest", []),
        (f"das-ingest {NO_POLICIES}", [NO_POLICIES]),
    ]
    assert parse_args(["--policy-pair", "--events-per-record", "100"]).sizes == [100]
    with pytest.raises(SystemExit):
        parse_args(["--policy-pair", "--quick"])


_BUSY_PARENT = """
import os, subprocess, sys, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
spin(0.4)
# a grandchild that spins and exits: its CPU reaches this process's cutime once reaped
subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)
spin(0.2)
t = os.times()
print(t.user + t.system + t.children_user + t.children_system, flush=True)
sys.stdin.readline()
"""
_SPIN = """
import time
end = time.process_time() + 0.4
while time.process_time() < end:
    pass
"""
_IDLE = "import sys; sys.stdin.readline()"


def test_a_busy_process_tree_is_charged_its_cpu_and_the_parties_fit_in_the_machine() -> None:
    """Real processes: a child that spins, runs a grandchild that spins and exits, spins again
    and reports its own CPU seconds (os.times: its own and its reaped child's); an idle child
    beside it. The samples charge the busy tree's CPU to its party, nothing to the idle one's,
    and no more to all of them than the machine was busy."""
    me = os.getpid()
    parties = ("busy", "idle", "test")
    samples: list[procs.CpuSample] = []

    def sample(roots: dict[int, str]) -> None:
        snap = procs.snapshot()
        samples.append(procs.cpu_sample(snap, roots, own_only=(me,), parties=parties))

    sample({me: "test"})
    idle = subprocess.Popen([sys.executable, "-c", _IDLE], stdin=subprocess.PIPE, text=True)
    busy = subprocess.Popen(
        [sys.executable, "-c", _BUSY_PARENT, _SPIN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    roots = {me: "test", busy.pid: "busy", idle.pid: "idle"}
    try:
        assert busy.stdout is not None
        sample(roots)
        reported = float(busy.stdout.readline())
        time.sleep(0.05)
        sample(roots)
    finally:
        for child in (busy, idle):
            child.communicate("\n", timeout=30)
    window = procs.cpu_window(samples, samples[0].at, samples[-1].at)
    assert reported > 0.9  # 0.4 + 0.4 (grandchild) + 0.2 s spun, and interpreter start-ups
    # 10 ms ticks: a few of them either way (the interpreters' last instructions)
    assert window.parties["busy"] == pytest.approx(reported, abs=0.05)
    assert window.parties["idle"] < 0.1
    assert sum(window.parties.values()) <= window.machine + 0.05
    shares = window.shares()
    assert set(shares) == {*parties, procs.REST, procs.IDLE}
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)
    assert shares["busy"] == pytest.approx(reported / (window.seconds * window.cores), abs=0.05)


def test_a_steady_window_too_short_for_the_ticks_is_not_accounted() -> None:
    samples = [procs.CpuSample(float(t), {"a": t / 2}, 10.0 + t) for t in range(10)]
    short = [(2.0, 100), (2.0 + e2e.MIN_CPU_WINDOW_SECONDS / 2, 100)]
    assert e2e.steady_cpu(samples, short) is None
    long = [(2.0, 100), (3.0, 100), (2.0 + 2 * e2e.MIN_CPU_WINDOW_SECONDS, 100)]
    window = e2e.steady_cpu(samples, long)
    assert window is not None
    assert window.seconds == pytest.approx(2 * e2e.MIN_CPU_WINDOW_SECONDS)
    assert window.events == 200  # the last commit's events end the window, outside it
    assert window.parties["a"] == pytest.approx(e2e.MIN_CPU_WINDOW_SECONDS)


def test_a_window_takes_the_cpu_between_its_ends_from_the_samples_around_them() -> None:
    samples = [
        procs.CpuSample(10.0, {"a": 0.0, "b": 5.0}, 100.0),
        procs.CpuSample(11.0, {"a": 1.0, "b": 5.0}, 102.0),
        procs.CpuSample(12.0, {"a": 3.0, "b": 5.5}, 104.0),
    ]
    window = procs.cpu_window(samples, 10.5, 11.5, events=300)
    assert window.seconds == pytest.approx(1.0)
    assert window.parties["a"] == pytest.approx(2.0 - 0.5)  # 0.5 at 10.5, 2.0 at 11.5
    assert window.parties["b"] == pytest.approx(0.25)
    assert window.machine == pytest.approx(2.0)
    assert window.per_event_us("a") == pytest.approx(1.5 / 300 * 1e6)
    # ends outside the samples take the first or the last sample
    assert procs.cpu_window(samples, 0.0, 99.0).parties["a"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        procs.cpu_window(samples, 11.0, 11.0)


def test_the_ceiling_only_run_measures_just_das_ingest_at_1_and_10_per_record() -> None:
    from bench.__main__ import parse_args, variants

    args = parse_args(["--ceiling-only", "--records", "500"])
    assert args.sizes == [1, 10]
    assert args.no_reference
    assert (args.backlog, args.archive_events) == (0, 0)
    assert [(v.label, v.flags) for v in variants(args)] == [("das-ingest", [])]
    assert parse_args(["--ceiling-only", "--events-per-record", "10"]).sizes == [10]
    for other in ("--quick", "--policy-pair"):
        with pytest.raises(SystemExit):
            parse_args(["--ceiling-only", other])


def _steady_run(window: procs.CpuWindow | None, load_average: float = 1.0) -> e2e.WorkerRun:
    """A worker run of 20,000 events (2,000 records) at a steady 2,000 events/s."""
    return e2e.WorkerRun(
        events=20_000,
        records=2_000,
        seconds=12.0,
        first_commit_seconds=2.0,
        steady_events_per_second=2_000.0,
        peak_rss_bytes=0,
        kms_calls=20,
        exit_code=0,
        steady_cpu=window,
        load_average=load_average,
    )


def test_the_cpu_row_compares_cpu_per_event_with_the_ceiling() -> None:
    """A 10 s window of 2 cores and 20,000 events: the decode processes used 2 s (100 µs per
    event) where the ceiling used 80; PostgreSQL 0.6 s (30), the main process 0.4 s (20)."""
    from bench.__main__ import cpu_row
    from bench.ceiling import DECODE, Ceiling

    used = {e2e.WORKER_MAIN: 0.4, e2e.DECODE: 2.0, e2e.POSTGRES: 0.6, e2e.BENCH: 0.2}
    window = procs.CpuWindow(10.0, 2, {p: used.get(p, 0.0) for p in e2e.PARTIES}, 16.0, 20_000)
    run = _steady_run(window, load_average=3.0)
    # the ceiling: 10,000 events in 1 s on 0.8 s of decode CPU (80 µs per event, 40% of 2 cores)
    top = Ceiling(10_000.0, procs.CpuWindow(1.0, 2, {DECODE: 0.8}, 1.0, 10_000))
    row = cpu_row(10, 0x0178, top, [run])
    assert row[:3] == ["10", "0x0178", "10.0"]
    # worker main, decode, kinesalite, PostgreSQL, moto, bench, the rest, idle
    assert row[3:11] == ["2%", "10%", "0%", "3%", "0%", "1%", "64%", "20%"]
    assert row[11:] == [
        "100",  # decode µs/event
        "80",  # the ceiling's
        "40%",  # the ceiling's decode processes' share of the cores
        "20%",  # 2,000 of 10,000 events/s
        "80%",  # 80 / 100 µs: given its CPU
        "50",  # main 20 + PostgreSQL 30 µs/event
        "62%",  # 80 / (80 + 50)
        "73%",  # 80 / (80 + 30): PostgreSQL alone
        "80%",  # 80 / (80 + 20)
        "3.0",
    ]


def test_the_warehouse_bound_needs_a_steady_window_and_a_ceiling() -> None:
    from bench.__main__ import warehouse_bound
    from bench.ceiling import DECODE, Ceiling

    # PostgreSQL: 1.2 s of CPU for 20,000 events = 60 µs an event; the ceiling decodes in 90
    used = dict.fromkeys(e2e.PARTIES, 0.0) | {e2e.POSTGRES: 1.2}
    window = procs.CpuWindow(10.0, 2, used, 16.0, 20_000)
    top = Ceiling(10_000.0, procs.CpuWindow(1.0, 2, {DECODE: 0.9}, 1.0, 10_000))
    assert warehouse_bound(top, [_steady_run(window)]) == pytest.approx(90 / 150)
    assert warehouse_bound(top, [_steady_run(None)]) is None
    idle = Ceiling(0.0, procs.CpuWindow(1.0, 2, {DECODE: 0.0}, 1.0, 0))
    assert warehouse_bound(idle, [_steady_run(window)]) is None


def test_a_bench_drops_a_developers_aws_profile_session_and_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (*e2e.STRAY_AWS_VARIABLES, "AWS_REGION"):
        monkeypatch.setenv(name, "from-the-developer")
    e2e.drop_stray_aws_variables()
    assert [n for n in e2e.STRAY_AWS_VARIABLES if n in os.environ] == []
    assert set(e2e.STRAY_AWS_VARIABLES) >= {"AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"}
    assert os.environ["AWS_REGION"] == "from-the-developer"  # only the stray ones go


def test_the_worker_runs_its_interpreters_install_not_the_working_directorys(
    tmp_path: Path,
) -> None:
    # A checkout's own ``ingest`` in the working directory must not shadow the build that the
    # given interpreter has installed (bench.ab --python compares two builds so).
    shadow = tmp_path / "ingest"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("print('the shadow build')\n")
    done = subprocess.run(
        e2e.worker_command(sys.executable, ["--version"]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "shadow" not in done.stdout
    assert done.stdout.startswith("das-ingest ")

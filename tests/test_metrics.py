"""The worker's /metrics by Prometheus's conventions, on a live worker: `promtool check metrics`
finds nothing, per-shard series carry the stream, and the gauges the alerts in
deploy/prometheus/alerts.yml need are there (build info, process, shards, unanchored tail age,
last verify)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest import __version__
from tests.cli_helpers import das_ingest
from tests.faults import http_get, metric_values, metrics_port
from tests.fleet import Fleet, committed_events, migrated, new_stream, options, produce, wait_until

PROMTOOL = shutil.which("promtool")


async def promtool_check_metrics(text: str) -> tuple[int, str]:
    assert PROMTOOL, "promtool is missing: `make setup` installs it (Debian package prometheus)"
    process = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate(text.encode())
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_promtool_catches_a_convention_breach() -> None:
    # The check itself works: a millisecond gauge is what the old metric was.
    bad = "# HELP x_lag_milliseconds Lag\n# TYPE x_lag_milliseconds gauge\nx_lag_milliseconds 1\n"
    code, out = await promtool_check_metrics(bad)
    assert code != 0 or out.strip(), out
    assert "base unit" in out


@pytest.mark.usefixtures("aws_env")
async def test_a_live_workers_metrics_pass_promtool_and_carry_the_stream(
    pg_dsn: str, fleet: Fleet
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    opts = options(stream, shards=2, instances=2, count=20)
    await produce(opts)
    worker = await fleet.start(
        "w1", stream, pg_dsn, "--processes", "0", "--metrics-port", "0", "--stop-when-idle", "60"
    )
    port = await metrics_port(worker)

    async def caught_up() -> bool:
        return await committed_events(pg_dsn) >= opts.count

    await wait_until(caught_up, 120)
    verified = await das_ingest(
        "verify", "--no-anchors", "--stream", stream, env={"DAS_DSN": pg_dsn}
    )
    assert verified.returncode == 0, verified.stderr

    status, text = await http_get(port, "/metrics")
    assert status == 200
    code, out = await promtool_check_metrics(text)
    assert (code, out.strip()) == (0, ""), out

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "das_shard_lag_milliseconds" not in families
    lag = families["das_shard_lag_seconds"].samples
    assert {s.labels["stream"] for s in lag} == {stream}
    assert len({s.labels["shard"] for s in lag}) == 2
    batches = [s for s in families["das_batches_committed"].samples if s.name.endswith("_total")]
    assert batches
    assert all(s.labels["stream"] == stream for s in batches)
    (build,) = families["das_build_info"].samples
    assert build.labels["version"] == __version__
    assert build.value == 1
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["process_resident_memory_bytes"].samples[0].value > 0

    labels = f'{{state="open",stream="{stream}"}}'
    assert metric_values(text, "das_stream_shards")[labels] == 2
    # Nothing anchors in this worker (no --anchor-key-id): the whole chain is the tail.
    assert metric_values(text, "das_chain_unanchored_age_seconds")[f'{{stream="{stream}"}}'] > 0
    assert metric_values(text, "das_verify_last_exit_code")[f'{{stream="{stream}"}}'] == 0
    assert metric_values(text, "das_verify_last_findings")[f'{{stream="{stream}"}}'] == 0
    assert (
        metric_values(text, "das_verify_last_run_timestamp_seconds")[f'{{stream="{stream}"}}'] > 0
    )
    worker.terminate()
    assert await worker.wait(30) == 0

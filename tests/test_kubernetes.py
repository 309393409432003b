"""deploy/kubernetes renders with `kubectl kustomize` (base and monitoring), and its Jobs and
CronJobs run das-ingest command lines the real CLI parses, as the roles they should; the daily
archive runs before retention (which drops only archived days) with its own AWS identity, the
archive's IAM policy and the network egress S3 needs."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from ingest.archive.location import ArchiveLocation
from ingest.cli import build_parser
from ingest.warehouse.retention import parse_keep
from tests.deploy_tools import run_tool

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"


def render(directory: Path) -> list[dict[str, Any]]:
    result = run_tool("kubectl", "kustomize", str(directory))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def das_ingest_argv(container: dict[str, Any]) -> list[str]:
    if "command" not in container:
        return list(container["args"])
    # The anchor export's shell line: sh -c 'das-ingest anchor --export "/anchors/...jsonl"'.
    assert container["command"] == ["/bin/sh", "-c"]
    (line,) = container["args"]
    words = shlex.split(line)
    assert words[0] == "das-ingest"
    return words[1:]


def test_the_base_renders_with_every_workload_in_the_namespace() -> None:
    objects = by_kind(render(KUBERNETES))
    assert {
        ("Deployment", "das-ingest"),
        ("Job", "das-ingest-migrate"),
        ("CronJob", "das-ingest-archive"),
        ("CronJob", "das-ingest-retention"),
        ("CronJob", "das-ingest-verify"),
        ("CronJob", "das-ingest-anchor-export"),
        ("NetworkPolicy", "das-ingest"),
        ("Service", "das-ingest-metrics"),
    } <= set(objects)
    for (kind, name), obj in objects.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "das-ingest", (kind, name)


def test_jobs_run_commands_the_cli_parses_as_the_right_login() -> None:
    objects = by_kind(render(KUBERNETES))
    expected = {
        ("Job", "das-ingest-migrate"): ("migrate", "das-ingest-warehouse-owner"),
        # archive reads the events and records each verified day in das.archived_days.
        ("CronJob", "das-ingest-archive"): ("archive", "das-ingest-warehouse-owner"),
        ("CronJob", "das-ingest-retention"): ("retention", "das-ingest-warehouse-owner"),
        ("CronJob", "das-ingest-verify"): ("verify", "das-ingest-warehouse-auditor"),
        ("CronJob", "das-ingest-anchor-export"): ("anchor", "das-ingest-warehouse-auditor"),
    }
    accounts = {name for kind, name in objects if kind == "ServiceAccount"}
    for key, (command, secret) in expected.items():
        pod = pod_spec(objects[key])
        (container,) = pod["containers"]
        argv = das_ingest_argv(container)
        args = build_parser().parse_args(argv)
        assert argv[0] == command, key
        assert args.func is not None, key
        env = {e["name"]: e for e in container["env"]}
        assert env["DAS_DSN"]["valueFrom"]["secretKeyRef"]["name"] == secret, key
        assert env["PGSSLMODE"]["value"] == "verify-full"
        assert pod["serviceAccountName"] in accounts
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        if key[0] == "CronJob":
            spec = objects[key]["spec"]
            assert spec["concurrencyPolicy"] == "Forbid"
            # Only exit 3 (a dependency unavailable) is retried; 1 and 2 fail the Job at once.
            (rule,) = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
            assert rule["onExitCodes"]["values"] == [1, 2]
    # Retention keeps a period the CLI accepts; verify pins the anchor key.
    retention = pod_spec(objects[("CronJob", "das-ingest-retention")])["containers"][0]
    assert build_parser().parse_args(retention["args"]).keep == "90d"
    verify = pod_spec(objects[("CronJob", "das-ingest-verify")])["containers"][0]
    assert "DAS_ANCHOR_KEY_ID" in {e["name"] for e in verify["env"]}


#: Seconds between two runs of a cron schedule, for the shapes the CronJobs use.
def schedule_period(schedule: str) -> int:
    minute, hour, day, month, weekday = schedule.split()
    assert minute.isdigit(), schedule
    assert (day, month, weekday) == ("*", "*", "*"), schedule
    return 3600 if hour == "*" else 86400


def test_every_cronjob_run_ends_before_the_next_one_is_due() -> None:
    """With concurrencyPolicy Forbid, a run hung on a connection that never answers would hold
    back every later run: each Job has a deadline (retries included) shorter than its period."""
    objects = by_kind(render(KUBERNETES))
    cronjobs = {name: obj for (kind, name), obj in objects.items() if kind == "CronJob"}
    assert cronjobs
    for name, cronjob in cronjobs.items():
        job = cronjob["spec"]["jobTemplate"]["spec"]
        deadline = job.get("activeDeadlineSeconds")
        assert isinstance(deadline, int), f"{name}: no activeDeadlineSeconds"
        assert deadline > 0, name
        period = schedule_period(cronjob["spec"]["schedule"])
        assert deadline < period, (name, deadline, period)


def daily_minute(schedule: str) -> int:
    """The minute of the day a daily cron schedule ("M H * * *") fires at."""
    minute, hour, *rest = schedule.split()
    assert rest == ["*", "*", "*"], f"not a daily schedule: {schedule!r}"
    return int(hour) * 60 + int(minute)


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_archive_runs_daily_before_retention_which_never_drops_unarchived_days() -> None:
    objects = by_kind(render(KUBERNETES))
    archive_job = objects[("CronJob", "das-ingest-archive")]
    retention_job = objects[("CronJob", "das-ingest-retention")]
    for job in (archive_job, retention_job):
        assert job["spec"]["timeZone"] == "Etc/UTC"
    # Same day, archive first (with time to finish: the Job's history is kept, not piled up).
    assert daily_minute(archive_job["spec"]["schedule"]) < daily_minute(
        retention_job["spec"]["schedule"]
    )
    (archive,) = pod_spec(archive_job)["containers"]
    (retention,) = pod_spec(retention_job)["containers"]
    archive_args = build_parser().parse_args(das_ingest_argv(archive))
    retention_args = build_parser().parse_args(das_ingest_argv(retention))
    # Retention refuses unarchived days: nothing may tell it to drop them anyway.
    assert retention_args.no_archive is False
    assert retention_args.dry_run is False
    # A day is archived long before retention reaches it, so a failed archive run has slack.
    assert archive_args.older_than is not None
    assert archive_args.before is None
    slack = parse_keep(retention_args.keep) - parse_keep(archive_args.older_than)
    assert slack.days >= 7, slack
    # The Parquet files go through temporary files: /tmp must be writable on a read-only root.
    assert archive["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod_spec(archive_job)["volumes"]}
    (tmp,) = [m for m in archive["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert not tmp.get("readOnly", False)


def test_the_archive_has_its_own_aws_identity_with_the_archive_policy() -> None:
    objects = by_kind(render(KUBERNETES))
    archive_job = objects[("CronJob", "das-ingest-archive")]
    pod = pod_spec(archive_job)
    (container,) = pod["containers"]
    args = build_parser().parse_args(das_ingest_argv(container))
    env = container_env(container)
    # Its own ServiceAccount, used by nothing else, with an IRSA role of its own.
    account = pod["serviceAccountName"]
    users = {
        key
        for key, obj in objects.items()
        if obj["kind"] in ("Deployment", "Job", "CronJob")
        and pod_spec(obj)["serviceAccountName"] == account
    }
    assert users == {("CronJob", "das-ingest-archive")}
    roles = {
        name: obj["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
        for (kind, name), obj in objects.items()
        if kind == "ServiceAccount"
    }
    role = roles.pop(account)
    assert role is not None
    assert role.startswith("arn:aws:iam::111122223333:role/")
    assert role not in roles.values()
    assert objects[("ServiceAccount", account)]["automountServiceAccountToken"] is False
    # The policy that role carries allows writing where the job writes, and checking anchors
    # with the key the job pins, in the job's region.
    policy = json.loads((ROOT / "deploy" / "iam-policy-archive.json").read_text())
    allowed = [s for s in policy["Statement"] if s["Effect"] == "Allow"]

    def resources_allowing(action: str) -> list[str]:
        return [
            r
            for s in allowed
            if action in s["Action"]
            for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
        ]

    location = ArchiveLocation.parse(args.to)
    key = f"{location.prefix.strip('/')}/stream=x/day=2025-01-01/_manifest.json"
    for action in ("s3:PutObject", "s3:GetObject"):
        assert any(
            fnmatch.fnmatchcase(f"arn:aws:s3:::{location.bucket}/{key}", r)
            for r in resources_allowing(action)
        ), (action, args.to)
    assert f"arn:aws:s3:::{location.bucket}" in resources_allowing("s3:ListBucket")
    assert env["DAS_ANCHOR_KEY_ID"] in resources_allowing("kms:VerifyMac")
    assert env["DAS_ANCHOR_KEY_ID"].split(":")[3] == env["AWS_REGION"]


def test_the_network_policy_admits_only_scrapes_and_needed_egress() -> None:
    policy = by_kind(render(KUBERNETES))[("NetworkPolicy", "das-ingest")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {53, 443, 5432}


def test_the_network_policy_lets_every_workload_reach_aws_and_the_warehouse() -> None:
    """Every pod (the archive's included, which talks to S3) is selected by the policy and may
    reach AWS's HTTPS endpoints (S3's addresses are not stable: by port, to anywhere) and the
    warehouse."""
    objects = by_kind(render(KUBERNETES))
    policy = objects[("NetworkPolicy", "das-ingest")]["spec"]
    selector = policy["podSelector"]["matchLabels"]
    open_ports = {
        (p["port"], p["protocol"]) for rule in policy["egress"] if "to" not in rule
        for p in rule["ports"]
    }  # fmt: skip
    assert {(443, "TCP"), (5432, "TCP")} <= open_ports
    workloads = [o for o in objects.values() if o["kind"] in ("Deployment", "Job", "CronJob")]
    assert ("CronJob", "das-ingest-archive") in {
        (o["kind"], o["metadata"]["name"]) for o in workloads
    }
    for obj in workloads:
        template = (
            obj["spec"]["jobTemplate"]["spec"]["template"]
            if obj["kind"] == "CronJob"
            else obj["spec"]["template"]
        )
        assert selector.items() <= template["metadata"]["labels"].items(), obj["metadata"]["name"]


def test_the_monitoring_overlay_renders_service_monitor_and_rule() -> None:
    objects = by_kind(render(KUBERNETES / "monitoring"))
    monitor = objects[("ServiceMonitor", "das-ingest")]
    service = by_kind(render(KUBERNETES))[("Service", "das-ingest-metrics")]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    rule = objects[("PrometheusRule", "das-ingest")]
    assert rule["metadata"]["namespace"] == "das-ingest"
    assert rule["spec"]["groups"][0]["rules"]


def test_the_operations_guide_lists_the_scheduled_jobs_and_what_each_exit_code_asks() -> None:
    """docs/operations.md, "Scheduled jobs": every CronJob with its schedule, ServiceAccount and
    command; then archive, verify --archive and retention in that order, each with what exit
    0, 1, 2 and 3 mean and what the operator does."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert "### Scheduled jobs" in doc
    section = doc.split("### Scheduled jobs", 1)[1].split("\n### ", 1)[0]
    objects = by_kind(render(KUBERNETES))
    rows = {
        cells[0].strip("` "): cells
        for line in section.splitlines()
        if line.startswith("| `das-ingest-")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    cronjobs = {name: obj for (kind, name), obj in objects.items() if kind == "CronJob"}
    assert set(rows) == set(cronjobs)
    for name, cronjob in cronjobs.items():
        _, schedule, command, _, account = rows[name]
        assert schedule == f"`{cronjob['spec']['schedule']}`", name
        assert account.startswith(f"`{pod_spec(cronjob)['serviceAccountName']}`"), name
        (container,) = pod_spec(cronjob)["containers"]
        assert command.strip("`").split()[0] == das_ingest_argv(container)[0], name
    archive_args = " ".join(
        das_ingest_argv(pod_spec(cronjobs["das-ingest-archive"])["containers"][0])
    )
    assert f"`{archive_args}`" in section
    # archive, then verify --archive, then retention: each with the whole exit-code contract.
    headings = [
        "`das-ingest archive`",
        "`das-ingest verify --archive`",
        "`das-ingest retention`",
    ]
    parts = re.split(r"^#### \d\. ", section, flags=re.M)[1:]
    assert [p.split(" (", 1)[0] for p in parts] == headings
    for part in parts:
        table = [line for line in part.splitlines() if line.startswith("| ")]
        assert table[0] == "| exit | means | what to do |"
        codes = [int(m[1]) for line in table if (m := re.match(r"\| (\d) \|", line))]
        assert codes == [0, 1, 2, 3], part.splitlines()[0]
        for line in table[2:]:
            assert all(cell.strip() for cell in line.strip("|").split("|")), line

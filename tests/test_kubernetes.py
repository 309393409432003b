"""deploy/kubernetes renders with `kubectl kustomize` (base and monitoring), and its Jobs and
CronJobs run das-ingest command lines the real CLI parses, as the roles they should."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from ingest.cli import build_parser
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


def test_the_network_policy_admits_only_scrapes_and_needed_egress() -> None:
    policy = by_kind(render(KUBERNETES))[("NetworkPolicy", "das-ingest")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {53, 443, 5432}


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

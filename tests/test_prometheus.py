"""deploy/prometheus/alerts.yml: valid (`promtool check rules`), unit-tested (`promtool test
rules`), the same groups as the PrometheusRule, built only on metrics the worker exports, and
the alerts docs/operations.md describes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, cast

import yaml
from prometheus_client.metrics import MetricWrapperBase

from ingest.alerts.notifiers import WebhookNotifier
from ingest.alerts.outbox import Deliverer, DeliveryMetrics
from ingest.metrics import Metrics
from tests.deploy_tools import run_tool

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = run_tool("promtool", "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_test_rules_covers_every_alert() -> None:
    result = run_tool("promtool", "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}


def test_the_rule_tests_fail_when_an_alert_changes(tmp_path: Path) -> None:
    # The unit tests can fail: a lag threshold ten times higher is caught.
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace(
            "(das_shard_lag_seconds) > 300", "(das_shard_lag_seconds) > 3000"
        )
    )
    result = run_tool("promtool", "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "DasIngestFallingBehind" in result.stdout + result.stderr


def test_the_prometheus_rule_carries_the_same_groups() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_alerts_use_only_exported_metrics() -> None:
    metrics = Metrics("s")
    # The worker registers the alert delivery metrics on the same registry (worker.py).
    delivery = DeliveryMetrics(metrics.registry)
    families = {
        str(v._name)
        for source in (metrics, delivery)
        for v in vars(source).values()
        if isinstance(v, MetricWrapperBase)
    }
    assert "das_alert_delivery_failures" in families
    for rule in rules():
        for name in re.findall(r"\b(das_[a-z_]+)\b", rule["expr"]):
            assert name.removesuffix("_total") in families, f"{rule['alert']}: {name}"


def test_the_operations_guide_describes_every_alert() -> None:
    doc = OPERATIONS.read_text()
    for rule in rules():
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is not in docs/operations.md"


def test_delivery_series_start_at_zero_so_a_first_failure_is_alerted() -> None:
    # DasIngestAlertDeliveryFailing uses increase(): a series born at 1 shows no increase, so
    # each notifier's counters must exist at 0 before its first attempt.
    metrics = Metrics("s")
    notifier = WebhookNotifier("https://hooks.example.com/das")
    Deliverer(cast(Any, None), [notifier], metrics=DeliveryMetrics(metrics.registry))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    n = ("notifier", notifier.name)
    assert samples[("das_alerts_delivered_total", (n,))] == 0
    assert samples[("das_alert_delivery_failures_total", (("final", "false"), n))] == 0
    assert samples[("das_alert_delivery_failures_total", (("final", "true"), n))] == 0

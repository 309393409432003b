"""Alerts: state and alerts in the warehouse (store), the alert chain, delivery (outbox,
notifiers). The pure rule evaluation is ``ingest.policy``."""

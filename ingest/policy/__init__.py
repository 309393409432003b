"""Policies (pure): rules read from YAML, compiled once per decode process, evaluated beside
normalize. No asyncio, boto or database here: the warehouse side lives in ``ingest.alerts``."""

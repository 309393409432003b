"""das-ingest: an exactly-once consumer for Amazon Aurora Database Activity Streams."""

__version__ = "0.1.0"

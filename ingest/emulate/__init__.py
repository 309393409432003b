"""das-ingest emulate: an Aurora-faithful DAS producer."""

"""The Kinesis consumer: per-shard readers, a process pool for decoding, PostgreSQL leases."""

"""The archive: whole UTC days of events exported to Parquet on S3, verifiable without the
warehouse (docs/archive.md)."""

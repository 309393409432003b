"""The audit warehouse: schema migrations, the COPY sink, leases, retention, dead letters."""
